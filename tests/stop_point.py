"""``python stop_point.py POINT ARGS...``: ``moetool ARGS`` in this process, which stops itself (SIGSTOP,
the whole process) at POINT, so that a supervising test kills it there with SIGKILL (or lets it go on)
however loaded the machine is and however fast the run.

POINT is ``lock`` (OUT.partial made and its lock taken, nothing written yet) or ``shards:N`` (the progress
record has just been written listing N finished shards), optionally prefixed ``once:``. Without the
prefix the process stops again whenever continued, so it never runs past POINT and ends only by a
signal that cannot be caught; with ``once:`` it stops once and goes on when continued (SIGCONT), as a
run that was merely slow. Nothing else changes: the same code writes the same files in the same order.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from moetool.cli.main import main
from moetool.io.writer import OutputDir
from moetool.pipeline import PROGRESS_NAME


def _stop(forever: bool) -> None:
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
        if not forever:
            return


def arm(point: str) -> None:
    forever = not point.startswith("once:")
    point = point.removeprefix("once:")
    stopped = [False]

    def stop() -> None:
        if not stopped[0]:
            stopped[0] = True
            _stop(forever)

    if point == "lock":
        take = OutputDir._lock

        def lock_then_stop(self: OutputDir) -> int:
            fd = take(self)
            stop()
            return fd

        OutputDir._lock = lock_then_stop  # type: ignore[method-assign]
        return
    kind, _, count = point.partition(":")
    if kind != "shards" or not count.isdigit():
        raise SystemExit(f"stop_point: unknown point {point!r}")
    want = int(count)
    write_json = OutputDir.write_json

    def write_then_stop(self: OutputDir, rel: str, data: Any) -> None:
        write_json(self, rel, data)
        if rel == PROGRESS_NAME and sum(k.endswith(".safetensors") for k in data) >= want:
            stop()

    OutputDir.write_json = write_then_stop  # type: ignore[method-assign]


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.argv = ["moetool", *sys.argv[2:]]
    main()

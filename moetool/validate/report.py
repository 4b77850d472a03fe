"""What ``validate`` reports: one :class:`Check` record per check and scope, gathered in a :class:`Report`
(printed as a table by the CLI, written as JSON with ``--report``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: ``Report.timings``, seconds. The checks overlap, so the parts do not add up to ``total``:
#: structure is the wall time of the sha256 hashing (running beside everything else) plus the rest of
#: the structure check; tensors, kernels, moe, ssm the time spent computing each check; transfer the
#: copies of each step (or chunk of a layer) to the device, and of a chunked layer's whole tensors;
#: read_wait the time the checks waited for a step to be read.
TIMING_KEYS = ("structure", "tensors", "kernels", "moe", "ssm", "transfer", "read_wait", "total")


@dataclass
class Check:
    group: str  # structure | tensors | kernels | moe | ssm
    scope: str  # what was checked ("layer 3", "files", ...)
    metric: str
    value: Any
    threshold: str
    passed: bool
    detail: str = ""  # names the culprit on failure


@dataclass
class Report:
    original: str
    converted: str
    device: str
    backend: str
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # TIMING_KEYS, seconds
    io: dict[str, int] = field(default_factory=dict)  # bytes in and read from each checkpoint
    #: where the wall time went besides the stages: seconds after the process started at which
    #: validate was called (``called``) and its one pass began (``pass_started``); seconds the reader
    #: waited for a free buffer (``reader_blocked``) and buffers stayed taken after their checks, for
    #: the hashes alone (``held_by_hashes``, summed over buffers); whether the buffers are pinned; and per converted file its sha256's
    #: ``PlannedHashes.timeline`` row (``hashes``)
    timeline: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "converted": self.converted,
            "device": self.device,
            "backend": self.backend,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "timings": dict(self.timings),
            "io": dict(self.io),
            "timeline": dict(self.timeline),
        }

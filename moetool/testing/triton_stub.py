"""Triton's dispatch without a GPU: a stand-in driver and stand-in compiled kernels.

``JITFunction.run`` asks the active driver for the current device, stream and target, binds and
specializes the arguments, builds its cache key and, on a miss, compiles. With :class:`StubDriver` active
and a ``JITFunction`` from :func:`stub_jit` (whose compiler hands out one :class:`StubKernel` per Triton
cache key), all of that runs as on a card, on the CPU, and every launch lands in a log instead of on a
GPU. The launcher tests use it to hold ``kernels/_launch.py`` to Triton's own dispatch, and
``scripts/host_cost_cpu.py`` to time the host side of both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


class StubDriver:
    """What Triton's dispatch asks of the active driver: an SM90 target, a device index that tests may
    change, one stream per device."""

    def __init__(self) -> None:
        self.device = 0

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int) -> int:
        return 0x5000 + device

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def stub_driver() -> Iterator[StubDriver]:
    """Make a :class:`StubDriver` Triton's active driver within the block."""
    drv = StubDriver()
    before = driver._active
    driver._active = drv
    try:
        yield drv
    finally:
        driver._active = before


class StubKernel(CompiledKernel):
    """A compiled kernel as a launcher sees one. Its launch entry appends ``(kernel, grid, stream, args,
    launch_enter_hook, launch_metadata)`` to ``log`` (when a list) and calls a hook that is not None, as
    Triton's launchers do."""

    def __init__(self, triton_key: str, log: list | None) -> None:
        self.triton_key = triton_key  # the cache key Triton's dispatch compiled it under
        self.function = object()  # a loaded function handle
        self.packed_metadata = (4, 1, 0)
        self.module = object()  # handles loaded: _init_handles does nothing
        self.name = "stub"
        self.src = None
        self._log = log
        self._run = self._launch

    def _launch(self, gx, gy, gz, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        if function is not self.function or packed is not self.packed_metadata:
            raise AssertionError("launched with another kernel's function or metadata")
        if self._log is not None:
            self._log.append((self, (gx, gy, gz), stream, args, enter_hook, launch_metadata))
        for hook in (enter_hook, exit_hook):
            if hook is not None:
                hook(launch_metadata)

    def __del__(self) -> None:  # nothing was loaded
        pass


def stub_jit(raw_fn, log: list | None = None) -> JITFunction:
    """A ``JITFunction`` of the undecorated kernel ``raw_fn`` whose compiler hands out one
    :class:`StubKernel` per Triton cache key (and caches it as Triton's compiler does)."""
    fn = JITFunction(raw_fn)

    def do_compile(key, signature, device, constexprs, options, attrs, warmup):
        kernel = StubKernel(key, log)
        fn.device_caches[device][0][key] = kernel
        return kernel

    fn._do_compile = do_compile
    return fn

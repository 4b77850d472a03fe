"""Launching a Triton kernel through its compiled kernel once Triton has compiled it for a specialization.

``kernel[grid](*args)`` costs tens of µs of host time at every call, most of it before the launch: Triton's
``JITFunction.run`` reads its knobs, binds every argument and specializes it (type, a pointer's 16-byte
alignment, an integer's width, divisibility by 16 and whether it is 1), builds a cache key from that and the
options, looks the compiled kernel up, builds launch metadata for profiler hooks and only then calls the
compiled kernel's launcher. A caller that already knows which specialization its call has can skip all of it.

:class:`Launcher` does that. The caller gives each call a key: a hashable value such that two calls with
equal keys have equal specializations and equal launch options (the key is the caller's promise; the
kernels' tests check it against Triton's own dispatch). The first call with a key on a device goes through
Triton's dispatch, which compiles or finds the kernel and launches it; the launcher keeps the
``CompiledKernel`` Triton returned. Later calls with that key on that device call its launch entry directly,

    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, launch_enter_hook, launch_exit_hook, *every_parameter)

which is the call ``JITFunction.run`` ends with in Triton 3.6 to 3.9 (``runtime/jit.py``), on the stream
it uses (``driver.active.get_current_stream`` of the current device) with the arguments it passes (every
parameter in signature order, constexprs included). Launch metadata and hooks are passed as None: the
launchers of those versions call a hook only when it is not None, and the fast path is only taken while no
hook is registered, so nothing observable differs. The compiled kernel object is held, not only its
function handle: from Triton 3.8 on a ``CompiledKernel`` unloads its module when collected.

Everything else Triton's dispatch reads is checked at every call, and any difference sends the call through
Triton's dispatch instead: the Triton version (3.6 to 3.9, whose dispatch this mirrors), a ``JITFunction``
(never Triton's interpreter), no launch hook, pre-run hook or stage-inspection hook, the knobs Triton folds
into the compile options (``debug``, the instrumentation mode and, from 3.9, floating-point-sanitizer casts)
as they were when the kernel was recorded, and the module globals the kernel reads unchanged (Triton
refuses a launch otherwise, and then so do we, through it). :func:`triton_dispatch` turns the fast path
off for a block of code (tests and benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import triton

try:  # the pieces of Triton the fast path reads; without any of them it is never taken
    from triton import knobs as _knobs
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - Triton before 3.4
    _knobs = _CompiledKernel = _HookChain = _driver = _JITFunction = None


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


# Triton versions whose dispatch (runtime/jit.py) and compiled-kernel launch entry (compiler/compiler.py)
# the fast path was written against.
SUPPORTED_TRITON = ((3, 6), (3, 9))
_SUPPORTED = (
    _JITFunction is not None and SUPPORTED_TRITON[0] <= _version(triton.__version__) <= SUPPORTED_TRITON[1]
)
# Entries kept per launcher; past it the table starts over (each key then costs one dispatch again).
MAX_ENTRIES = 1024

_enabled = True
_MISSING = object()


def rebased(proto, base):
    """The host TMA descriptor ``proto`` over the tensor ``base`` instead of its own: ``proto`` was built
    (and so checked) by ``TensorDescriptor(...)`` over a tensor of ``base``'s dtype, shape, strides and
    16-byte alignment, which the caller guarantees. In Triton 3.6 to 3.9 the descriptor is a dataclass whose
    ``__post_init__`` only checks, deriving nothing, so a copy of its fields with ``base`` replaced equals
    what the constructor would build, without the checks' cost at every call; elsewhere the constructor
    builds it (``dataclasses.replace``)."""
    if not _SUPPORTED:
        return dataclasses.replace(proto, base=base)
    desc = object.__new__(type(proto))
    desc.__dict__.update(proto.__dict__)
    desc.base = base
    return desc


@contextlib.contextmanager
def triton_dispatch() -> Iterator[None]:
    """Within the block every :class:`Launcher` launches through Triton's own dispatch."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before


def _empty_hook(hook: object) -> bool:
    """Whether a launch hook knob holds nothing to call: None, or an empty hook chain (Triton ≥ 3.6)."""
    return hook is None or (isinstance(hook, _HookChain) and not hook.calls)


def _dispatch_state(fn) -> tuple | None:
    """What Triton's dispatch of ``fn`` reads besides the arguments, or None when the fast path must not be
    taken (a hook is registered, or a global the kernel reads has changed)."""
    rt = _knobs.runtime
    if (
        not _empty_hook(rt.launch_enter_hook)
        or not _empty_hook(rt.launch_exit_hook)
        or getattr(rt, "add_stages_inspection_hook", None) is not None
        or fn.pre_run_hooks
    ):
        return None
    for (name, _), (value, globals_dict) in fn.used_global_vals.items():
        if globals_dict.get(name, _MISSING) != value:
            return None
    compilation = _knobs.compilation
    return (
        fn.debug,
        rt.debug,
        compilation.instrumentation_mode,
        getattr(compilation, "fpsan_homomorphic_casts", None),
    )


class Launcher:
    """Launches one ``@triton.jit`` kernel: through Triton's dispatch the first time a key is seen on a
    device, through the compiled kernel Triton picked then at later calls (module docstring).

    ``launcher(grid, args, key, options)``: ``grid`` three ints; ``args`` every parameter of the kernel in
    signature order, constexprs included (what Triton's dispatch passes on); ``options`` Triton's launch
    keywords (``num_warps``, ``num_stages``, ``launch_pdl``); ``key`` hashable, equal only for calls that
    Triton specializes alike with equal options (same argument types and tensor dtypes, same 16-byte
    alignment of every pointer, same integers — exact values are the simple choice — same constexprs)."""

    __slots__ = ("_entries", "_usable", "fast_launches", "fn")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.fast_launches = 0  # calls that skipped Triton's dispatch (tests check the path is taken)
        self._entries: dict = {}
        self._usable = _SUPPORTED and isinstance(fn, _JITFunction)

    def __call__(self, grid: tuple[int, int, int], args: tuple, key: object, options: dict) -> None:
        if self._usable and _enabled:
            drv = _driver.active
            device = drv.get_current_device()
            entry = self._entries.get((device, key))
            if entry is not None and entry[0] == _dispatch_state(self.fn):
                _, _, run, function, packed = entry
                run(grid[0], grid[1], grid[2], drv.get_current_stream(device), function, packed, None, None, None,
                    *args)  # fmt: skip
                self.fast_launches += 1
                return
            self._dispatch(grid, args, key, options, device)
            return
        self.fn[grid](*args, **options)

    def _dispatch(self, grid, args, key, options, device) -> None:
        """Launch through Triton's dispatch and keep the compiled kernel it used for ``key``."""
        state = _dispatch_state(self.fn)
        kernel = self.fn[grid](*args, **options)
        if (
            state is None
            or not isinstance(kernel, _CompiledKernel)
            or kernel.function is None
            or _dispatch_state(self.fn) != state
            or _driver.active.get_current_device() != device
        ):
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[(device, key)] = (state, kernel, kernel.run, kernel.function, kernel.packed_metadata)

"""``moetool validate``: prove a converted checkpoint (or state file) right against its original, or
name what is wrong (SPEC §6). Every check returns plain ``Check`` records; the CLI prints them.

1. structure  every original tensor accounted for, nothing extra, shapes/dtypes/config consistent,
              output sha256 as moetool.json records.
2. tensors    each FP8 tensor equals the SPEC §3 recipe applied to the original, byte for byte (scales
              bit for bit); copied and fused BF16 tensors equal their source bytes.
3. kernels    the FP8 block grouped GEMM on the stored layout against the float32 GEMM of the original:
              DeepGEMM where it is importable on an SM90 card, else Triton (``--backend`` forces one;
              torch reference on ``--device cpu``). A failure names the experts that disagree.
4. moe        the model's routing + experts (+ fused slots) on the converted weights, through the
              kernel, against the original layer in float32: same top-k ids, calc_diff bounded.
5. ssm        T decode steps from the converted state (Triton K-last, pool-indexed) against the
              k-first reference from the original state.

Checks 1-4 run in one pass (``Validator``): each MoE layer's experts of both checkpoints are read once,
by several threads, while the previous read is checked, and serve the tensors, kernels and MoE checks
alike; the sha256 of the converted files is computed on other threads meanwhile. The report keeps the
order above whatever order the work ran in, and adds seconds per stage and bytes read.

Memory: a layer larger than ``ValidateOptions.read_budget`` is read in chunks of whole experts, so
the read buffers hold two chunks whatever the number of experts per layer. Each chunk is checked as it
arrives (copied to the GPU, or where it was read on ``--device cpu``) and its buffer given back: the
byte comparison, the kernels check and the MoE check take its experts in turn (the same operations in
the same order as on the whole layer, so the report is the same). Host and device hold the layer's
other tensors (router, shared expert) besides the chunks, never the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moetool import tolerances as tol
from moetool.errors import InputError, MoetoolError, UsageError
from moetool.io import prefetch
from moetool.io.checkpoint import MANIFEST_NAME, Checkpoint
from moetool.io.prefetch import Batch, Field, FileHashes, Prefetcher, ReadPlan, reader_threads
from moetool.model import FP8_DTYPES, CheckpointView, analyze, scale_name
from moetool.pipeline import pick_device
from moetool.plan import Src

if TYPE_CHECKING:
    from moetool.moe import MoeLayerWeights

ADDED_CONFIG_KEYS = ("quantization_config", "moetool_fused_shared_experts")
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
        }


@dataclass(frozen=True)
class ValidateOptions:
    device: str = "auto"
    backend: str = "auto"  # auto | triton | deepgemm (torch references when the device is the CPU)
    layers: tuple[int, ...] | None = None
    experts: int | None = None  # sample this many experts per layer (all when None)
    tokens: int = 128
    seed: int = 0
    checks: tuple[str, ...] = ("structure", "tensors", "kernels", "moe")
    ssm_steps: int = 4
    #: most bytes of one read step; a layer above it is read in chunks of whole experts (a tensor larger
    #: than the budget gets a step of its own). None: ``default_read_budget``.
    read_budget: int | None = None
    family: str | None = None  # --family: read an unknown model_type as this family (both checkpoints)


MIN_READ_BUDGET = 1 << 30


def default_read_budget(largest: int) -> int:
    """Bytes per read step for a checkpoint pair whose largest tensor read whole (anything but the
    stacked experts, which are read expert by expert) has ``largest`` bytes: twice that, so a tensor
    and its original fit one step, and at least 1 GiB, so a step's reads still spread over every reader
    thread in 32 MiB pieces. Two buffers of it bound the host memory like quantize's 4 x largest tensor
    (+ 1 GB), whatever the number of experts per layer."""
    return max(MIN_READ_BUDGET, 2 * largest)


# -- backends ---------------------------------------------------------------------------------
BACKENDS = ("auto", "triton", "deepgemm")


def _deepgemm_importable() -> bool:
    import importlib.util
    import sys

    if importlib.util.find_spec("deep_gemm") is None:
        return False
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its import may print; stdout is for --json
            import deep_gemm  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """The GEMM the kernels and MoE checks run on ``device``: ``torch`` (the references) on the CPU; on
    CUDA ``triton`` or ``deepgemm`` as asked, and for ``auto`` DeepGEMM where ``deep_gemm`` is importable
    and the card is SM90 (Hopper), else Triton. (DeepGEMM's SM100 kernels take scales as UE8M0 only, so
    float32 scales would be rounded there: ``--backend deepgemm`` is for UE8M0 outputs on such a card.)"""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", fix=f"one of {', '.join(BACKENDS)}")
    if device.type == "cpu":
        return "torch"
    if name != "auto":
        return name
    if torch.cuda.get_device_capability(device)[0] == 9 and _deepgemm_importable():
        return "deepgemm"
    return "triton"


class Backend:
    """Per-token activation quantization and the FP8 grouped GEMM on one device."""

    def __init__(self, device: torch.device, name: str) -> None:
        """``name``: as :func:`resolve_backend` gives it (``auto`` is resolved here too)."""
        self.device, self.name = device, resolve_backend(name, device)
        name = self.name
        from moetool.kernels.fp8_grouped_gemm_ref import contiguous_layout, grouped_gemm_ref
        from moetool.kernels.fp8_quant_ref import block_quant_ref

        self.layout = contiguous_layout
        if device.type == "cpu":
            self.name = "torch"
            self.act_quant = lambda x: block_quant_ref(x, block=(1, 128))
            self.gemm = grouped_gemm_ref
            return
        from moetool.kernels.fp8_quant import token_quant

        # MN-major scales: what DeepGEMM takes and what the Triton GEMM reads fastest (no transpose there).
        self.act_quant = functools.partial(token_quant, mn_major=True)
        if name == "deepgemm":
            try:
                import deep_gemm  # type: ignore[import-not-found]
            except ImportError:
                from moetool.errors import EnvironmentError_

                raise EnvironmentError_(
                    "--backend deepgemm but deep_gemm is not importable",
                    fix="install DeepGEMM or use --backend triton",
                ) from None

            def dg(a_q, a_s, b_q, b_s, m_idx):
                out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=torch.bfloat16, device=a_q.device)
                deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), out, m_idx)
                return out

            self.gemm = dg
        else:
            from moetool.kernels.fp8_grouped_gemm import m_grouped_fp8_gemm_nt_contiguous

            self.gemm = m_grouped_fp8_gemm_nt_contiguous

    def grouped(
        self, x: torch.Tensor, ids: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor
    ) -> torch.Tensor:
        """``y[t] = x[t] @ W[ids[t]]ᵀ`` through the FP8 path: x [T, K] float, ids [T]; returns [T, N] f32."""
        dev = self.device
        x, ids = x.to(dev), ids.to(dev)
        a, m_idx, rows = self.layout(x.float(), ids, w_q.shape[0])
        a_q, a_s = self.act_quant(a)
        d = self.gemm(a_q, a_s, w_q.to(dev), w_s.to(dev), m_idx)
        return d.float()[rows]

    def expert_rows(self, x, ids, w13_q, w13_s, w2_q, w2_s) -> torch.Tensor:
        """``y[r] = expert_{ids[r]}(x[r])`` through the FP8 path for rows x [P, H] float, ids [P] into the
        stacked experts (w13 [E, 2I, H], w2 [E, H, I]); returns [P, H] float32. Each row's result depends
        only on the row and its expert, not on which other rows share the call."""
        inter = w13_q.shape[1] // 2
        h = self.grouped(x, ids, w13_q, w13_s)
        act = F.silu(h[:, :inter]) * h[:, inter:]
        return self.grouped(act, ids, w2_q, w2_s)


def weighted_sum(y: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """``out[t] = Σ_c wts[t, c] · y[t, c]`` for expert outputs y [T, k, H]: float32 [T, H]."""
    return (y * wts.to(y.device, torch.float32)[..., None]).sum(1)


# -- helpers ----------------------------------------------------------------------------------
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    from moetool.kernels.fp8_grouped_gemm_ref import calc_diff as cd

    return float(cd(x, y))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.contiguous().view(torch.uint8)
        if t.element_size() == 1
        else t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    )


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    if a.shape != b.shape:
        return ()
    ne = _bits(a) != _bits(b)
    if not bool(ne.any()):
        return None
    return tuple(int(i) for i in ne.nonzero()[0])


def _expected_sources(
    orig: CheckpointView, conv: CheckpointView, layer: int, e: int
) -> tuple[tuple[Src, ...], Src]:
    """Original sources of converted expert ``e``: routed expert e, or a fused shared-expert slice."""
    inter, n_routed = orig.info.moe_intermediate_size, orig.info.num_experts
    if e < n_routed:
        store = orig.stores[layer]
        return store.gate_up(e, inter), store.down(e)
    sh = orig.shared.get(layer)
    if sh is None or not conv.fused:
        raise InputError(
            f"expert {e} exists in the converted layer {layer} but not in the original",
            tensor=conv.stores[layer].prefix,
        )
    j = (e - n_routed) % int(conv.fused["num_slots"])
    rows = (j * inter, (j + 1) * inter)
    return (Src(sh.gate, rows=rows), Src(sh.up, rows=rows)), Src(sh.down, cols=rows)


def region_name(src: Src, *, scale: bool = False) -> str:
    """How a report names a converted region: the tensor (its ``weight_scale_inv`` with ``scale``),
    with the expert index and row range of a stacked tensor."""
    name = scale_name(src.name) if scale else src.name
    if src.expert is None:
        return name
    rows = f", rows {src.rows[0]}:{src.rows[1]}" if src.rows else ""
    if scale and src.rows:
        rows = f", scale rows {src.rows[0] // 128}:{-(-src.rows[1] // 128)}"
    return f"{name}[{src.expert}{rows}]"


def _stored(conv: CheckpointView, layer: int, e: int) -> list[Src]:
    """Converted expert ``e``'s regions: gate, up, down."""
    store = conv.stores[layer]
    gu, d = store.gate_up(e, conv.info.moe_intermediate_size), store.down(e)
    return [*gu, d]


# -- one pass: what each step reads ---------------------------------------------------------------
class _Stack:
    """Experts stacked in a batch: ``{p}w13`` ``[n, R, H]`` (row ranges ``parts`` hold the gate/up
    sources of ``w13[k]``, in order), ``{p}w2`` ``[n, H, I]``, and for FP8 their scales ``{p}s13`` (rows
    ``sparts`` per source) and ``{p}s2``; ``whole_scales``: ``s13[k]``/``s2[k]`` are an expert's whole
    scale tensors (SM100 int32 layout), not split by source. Expert ``experts[k]`` is at index k."""

    def __init__(
        self,
        prefix: str,
        experts: list[int],
        parts: list[tuple[int, int]],
        sparts: list[tuple[int, int]] | None,
        fp8: bool,
        whole_scales: bool,
    ) -> None:
        self.prefix, self.experts, self.parts, self.sparts = prefix, experts, parts, sparts
        self.fp8, self.whole_scales = fp8, whole_scales
        self.pos = {e: k for k, e in enumerate(experts)}

    def region(self, b: Tensors, e: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Source ``j`` of expert ``e`` (gate/up sources, then down) with its scale blocks, as
        ``read_source`` returns it."""
        k, p = self.pos[e], self.prefix
        if j < len(self.parts):
            r0, r1 = self.parts[j]
            t = b[p + "w13"][k, r0:r1]
            if not self.fp8:
                return t, None
            if self.sparts is None:
                raise InputError("internal: whole-expert scales have no per-source rows", tensor=p)
            s0, s1 = self.sparts[j]
            return t, b[p + "s13"][k, s0:s1]
        return b[p + "w2"][k], b[p + "s2"][k] if self.fp8 else None

    def select(self, t: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """Rows of stacked ``t`` for ``experts``, in that order (``t`` itself when that is all of them)."""
        if experts == self.experts:
            return t
        idx = torch.tensor([self.pos[e] for e in experts], device=t.device)
        if t.element_size() == 1:  # gathered as bytes: index kernels need not cover FP8 on every device
            return t.view(torch.uint8)[idx].view(t.dtype)
        return t[idx]


@dataclass
class _LayerStep:
    """One MoE layer's work: the stored experts read (all of them when the MoE check runs), the
    experts each check takes (None: the check does not run here), and the other tensors compared
    from this batch because the MoE check reads them anyway (router, unfused shared expert)."""

    layer: int
    experts: list[int]
    tensors: list[int] | None
    kernels: list[int] | None
    moe: bool
    others: list[str] = field(default_factory=list)
    orig: _Stack | None = None
    conv: _Stack | None = None
    layout: dict[str, Field] = field(default_factory=dict)  # the whole layer's fields
    bad: str | None = None  # the tensors check's first mismatch, found chunk by chunk
    errs: list[float] = field(default_factory=list)


@dataclass
class _Chunk:
    """Part ``index`` of ``count`` of a layer step read in several: whole tensors (``experts`` empty) or
    the experts ``step.experts[start:start + len(experts)]``, which are at index ``start`` on in the
    step's converted stack and, for the routed ones, in its original stack too (routed experts come
    first). ``orig``/``conv``: the same experts as stacked in this chunk's own batch."""

    step: _LayerStep
    index: int
    count: int
    start: int = 0
    experts: list[int] = field(default_factory=list)
    orig: _Stack | None = None
    conv: _Stack | None = None


@dataclass
class _KernelsRun:
    """The kernels check of one layer, filled expert by expert: tokens ``ids`` (into ``experts``) with
    activations ``x`` per weight (``w13``/``w2``), the FP8 GEMM's rows ``got`` and the float32 GEMM's
    rows ``ref``."""

    experts: list[int]
    ids: torch.Tensor
    x: dict[str, torch.Tensor]
    got: dict[str, torch.Tensor]
    ref: dict[str, torch.Tensor]


@dataclass
class _MoeRun:
    """The MoE check of one layer, filled expert by expert: tokens ``x``, each layer's weights but its
    routed experts (``ow``, ``cw``), the expert ids and weights their routing gives the tokens, the
    original layer's expert sum ``ref`` and the converted one's ``got`` (one row per token and expert
    column when ``fp8``, weighed at the end; else the sum)."""

    x: torch.Tensor
    ow: MoeLayerWeights
    cw: MoeLayerWeights
    o_ids: torch.Tensor
    o_wts: torch.Tensor
    c_ids: torch.Tensor
    c_wts: torch.Tensor
    ref: torch.Tensor
    got: torch.Tensor
    fp8: bool


@dataclass
class _Streamed:
    """A layer checked chunk by chunk: its whole tensors (router, shared expert, other tensors of the
    step) kept as they arrive, and the kernels and MoE checks in progress."""

    whole: _LayerTensors
    kernels: _KernelsRun | None = None
    moe: _MoeRun | None = None


class _LayerTensors:
    """A layer step's fields as tensors of their own (``step.layout``), filled chunk by chunk; read by
    the checks like a :class:`Batch`."""

    def __init__(self, layout: dict[str, Field], device: torch.device) -> None:
        self.tensors = {k: torch.empty(f.shape, dtype=f.dtype, device=device) for k, f in layout.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)


class _Overlay:
    """A chunk's batch (its experts) over the whole tensors of the layer kept so far; read by the checks
    like a :class:`Batch`."""

    def __init__(self, batch: Batch, whole: _LayerTensors) -> None:
        self.batch, self.whole = batch, whole

    def __contains__(self, key: str) -> bool:
        return key in self.batch or key in self.whole

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.batch[key] if key in self.batch else self.whole[key]

    def get(self, key: str) -> torch.Tensor | None:
        found = self.batch.get(key)
        return found if found is not None else self.whole.get(key)


Tensors = Batch | _LayerTensors | _Overlay


@dataclass
class _OthersStep:
    """Non-expert tensors compared byte for byte (or against the recipe when quantized in place)."""

    names: list[str]


def _slice(b: Tensors, side: str, src: Src, root: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``src`` cut from the whole tensor read into field ``{side}:{name}`` (and its scale blocks), exactly
    as ``read_source`` reads it from the checkpoint at ``root``."""
    t = b[f"{side}:{src.name}"]
    s = None
    if t.dtype == torch.float8_e4m3fn:
        s = b.get(f"{side}:{scale_name(src.name)}")
        if s is None:
            raise InputError("FP8 tensor without its weight_scale_inv", file=str(root), tensor=src.name)
    if src.expert is not None:
        t = t[src.expert]
        s = None if s is None else s[src.expert]
    if src.rows:
        r0, r1 = src.rows
        t = t[r0:r1]
        s = None if s is None else s[r0 // 128 : -(-r1 // 128)]
    if src.cols:
        c0, c1 = src.cols
        t = t[:, c0:c1]
        s = None if s is None else s[:, c0 // 128 : -(-c1 // 128)]
    return t, s


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat view of the widest integer type that divides them (a comparison of
    int64 words runs several times faster than one of bytes)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if flat.numel() % size == 0 and flat.storage_offset() % size == 0:
            return flat.view(dtype)
    return flat


EQUAL_CHUNK = 1 << 24  # words compared per thread call on the CPU


def _same_bytes(a: torch.Tensor, b: torch.Tensor, pool: ThreadPoolExecutor | None) -> bool:
    """Whether two tensors of one shape hold the same bytes; large CPU tensors are compared in pieces on
    ``pool`` (torch releases the GIL)."""
    if a.dtype != b.dtype:
        return False
    x, y = _wide(a), _wide(b)
    if x.dtype != y.dtype:  # differently aligned: compare element by element
        x, y = _bits(a).reshape(-1), _bits(b).reshape(-1)
    if pool is None or x.device.type != "cpu" or x.numel() <= EQUAL_CHUNK:
        return torch.equal(x, y)
    parts = [(x[i : i + EQUAL_CHUNK], y[i : i + EQUAL_CHUNK]) for i in range(0, x.numel(), EQUAL_CHUNK)]
    return all(pool.map(lambda p: torch.equal(*p), parts))


class Validator:
    """Runs the checks of SPEC §6 in one pass over both checkpoints.

    Every MoE layer is one read step: the original's experts (and shared expert), the converted
    experts, and the router tensors, read once, into one buffer, by several threads, while the
    previous step is checked on the device; the tensors, kernels and MoE checks all take their
    weights from that step. A layer larger than the read budget is read in chunks instead (its whole
    tensors, then runs of experts), each checked as it arrives, every check taking its experts in
    turn, so neither host nor device holds the layer. The
    remaining non-expert tensors follow in steps of at most the largest step. The sha256 of every
    converted file is computed on other threads meanwhile. Checks are reported in a fixed order
    whatever the order they ran in.
    """

    def __init__(self, orig: CheckpointView, conv: CheckpointView, opts: ValidateOptions) -> None:
        self.o_ck, self.c_ck, self.opts = orig.ckpt, conv.ckpt, opts
        self.orig, self.conv = orig, conv
        self.device = pick_device(opts.device)
        self.rng = random.Random(opts.seed)
        q = self.conv.quantization or {}
        self.ue8m0 = q.get("scale_fmt") == "ue8m0"
        self.report = Report(
            str(self.o_ck.root),
            str(self.c_ck.root),
            str(self.device),
            resolve_backend(opts.backend, self.device),
        )
        self.timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)
        self._pool: ThreadPoolExecutor | None = None
        self._results: dict[str, dict[int, Check]] = {"tensors": {}, "kernels": {}, "moe": {}}
        self._other_results: dict[str, str | Exception | None] = {}
        self._others: list[str] | None = None
        self._orig_cache: tuple[_LayerStep, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._streamed: _Streamed | None = None  # the layer being checked chunk by chunk
        self.read_budget = (
            max(1, opts.read_budget) if opts.read_budget is not None else default_read_budget(self._largest())
        )

    def _largest(self) -> int:
        """Bytes of the largest tensor read whole (stacked experts are read expert by expert)."""
        stacked = {n for v in (self.orig, self.conv) for s in v.stores.values() for n in s.names}
        return max(
            (t.nbytes for ck in (self.o_ck, self.c_ck) for n, t in ck.tensors.items() if n not in stacked),
            default=0,
        )

    def layers(self) -> list[int]:
        layers = sorted(self.conv.stores)
        if self.opts.layers is not None:
            bad = sorted(set(self.opts.layers) - set(layers))
            if bad:
                raise UsageError(f"--layers {bad} are not MoE layers (MoE layers: {layers})")
            layers = [x for x in layers if x in self.opts.layers]
        return layers

    def experts(self, layer: int) -> list[int]:
        n = self.conv.stores[layer].num_experts
        if self.opts.experts is None or self.opts.experts >= n:
            return list(range(n))
        routed = self.orig.info.num_experts
        pick = sorted(self.rng.sample(range(routed), min(self.opts.experts, routed)))
        return pick + list(range(routed, n))  # fused slots are always checked

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - t0

    # -- running ------------------------------------------------------------------------------
    def run(self) -> Report:
        t0 = time.perf_counter()
        checks = self.opts.checks
        layers = self.layers()
        hashes = self._start_hashes() if "structure" in checks and self.conv.manifest is not None else None
        try:
            steps = self._steps(layers)
            plans = [p for step in steps for p in self._layer_plans(step)]
            plans += [self._plan(s) for s in self._others_steps(steps, plans)]
            if plans:
                self._pool = ThreadPoolExecutor(
                    max_workers=reader_threads(), thread_name_prefix="moetool-compare"
                )
                with Prefetcher(plans, threads=reader_threads()) as pf:
                    for batch in pf:
                        if isinstance(batch.label, _LayerStep):
                            self._run_layer(batch)
                        elif isinstance(batch.label, _Chunk):
                            self._run_chunk(batch)
                        else:
                            self._run_others(batch)
                    self.timings["read_wait"] = pf.wait_s
                    self.report.io = self._io(pf)
            structure = self._check_structure(hashes) if "structure" in checks else []
        finally:
            if hashes is not None:
                hashes.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.report.checks = structure + self._assemble(layers)
        self.timings["total"] = time.perf_counter() - t0
        self.report.timings = {k: round(v, 3) for k, v in self.timings.items()}
        return self.report

    def _assemble(self, layers: list[int]) -> list[Check]:
        """The layer checks in the report's order: tensors per layer, other tensors, then kernels and
        MoE layer by layer. Other tensors count in name order up to the first mismatch, and an error met
        comparing one is raised only if no earlier tensor mismatched, whatever order they were read in."""
        out: list[Check] = []
        if "tensors" in self.opts.checks:
            out += [self._results["tensors"][layer] for layer in layers]
            bad, count = None, 0
            for name in self._others_names():
                count += 1
                result = self._other_results[name]
                if isinstance(result, Exception):
                    raise result
                if result:
                    bad = result
                    break
            out.append(
                Check(
                    "tensors",
                    "other tensors",
                    f"{count} tensors",
                    "mismatch" if bad else "equal",
                    "bytes equal",
                    bad is None,
                    bad or "",
                )
            )
        for layer in layers:
            for name in ("kernels", "moe"):
                check = self._results[name].get(layer)
                if check is not None:
                    out.append(check)
        return out

    def _io(self, pf: Prefetcher) -> dict[str, int]:
        """Bytes of tensor data in each checkpoint and bytes the checks read from it (the sha256 of the
        converted files reads them once more, apart), and the bytes of the read buffers."""
        out: dict[str, int] = {}
        for side, ck in (("original", self.o_ck), ("converted", self.c_ck)):
            out[f"{side}_bytes"] = sum(t.nbytes for t in ck.tensors.values())
            out[f"{side}_read"] = sum(pf.bytes_read.get(f, 0) for f in {t.file for t in ck.tensors.values()})
        out["buffer_bytes"] = pf.buffer_bytes
        return out

    # -- planning -----------------------------------------------------------------------------
    def _steps(self, layers: list[int]) -> list[_LayerStep]:
        """One step per layer with work. Expert samples are drawn in a fixed order (every layer's tensors
        sample, then each layer's kernels sample), so a seed always picks the same experts."""
        checks = self.opts.checks
        t_exp = {layer: self.experts(layer) for layer in layers} if "tensors" in checks else {}
        k_exp = {}
        if "kernels" in checks:
            k_exp = {layer: self.experts(layer) for layer in layers if self.conv.stores[layer].fp8}
        steps = []
        for layer in layers:
            store = self.conv.stores[layer]
            moe = "moe" in checks and (store.fp8 or bool(self.conv.fused))
            t, k = t_exp.get(layer), k_exp.get(layer)
            if moe:
                experts = list(range(store.num_experts))
            else:
                experts = sorted(set(t or []) | set(k or []))
            if t is None and k is None and not moe:
                continue
            steps.append(_LayerStep(layer, experts, t, k, moe))
        return steps

    def _others_names(self) -> list[str]:
        """Converted tensors outside the routed experts that the original also has, in name order: copied
        (bytes equal) or quantized in place (the recipe), an unfused shared expert included."""
        if self._others is None:
            routed = {n for s in self.conv.stores.values() for n in s.names}
            self._others = [
                name
                for name in sorted(self.c_ck.tensors)
                if name not in routed and not name.endswith("_scale_inv") and name in self.o_ck.tensors
            ]
        return self._others

    def _plan_whole(self, plan: ReadPlan, side: str, name: str) -> None:
        """Field ``{side}:{name}``: the whole tensor, and its ``weight_scale_inv`` when it is FP8."""
        ck = self.o_ck if side == "o" else self.c_ck
        key = f"{side}:{name}"
        if key in plan.fields:
            return
        plan.tensor(key, ck, name)
        sname = scale_name(name)
        if ck.info(name).dtype == "F8_E4M3" and sname in ck and f"{side}:{sname}" not in plan.fields:
            plan.tensor(f"{side}:{sname}", ck, sname)

    def _plan_stack(
        self, plan: ReadPlan, prefix: str, ck: Checkpoint, items: list[tuple[int, tuple[Src, ...], Src]]
    ) -> _Stack:
        """Read each expert's gate/up sources straight into ``{prefix}w13[k]`` and its down source into
        ``{prefix}w2[k]`` (scales alike), so the stacks the kernels take need no copy."""

        def region(src: Src, scale: bool = False) -> tuple[str, tuple[int, int] | None, list[int]]:
            if src.cols:
                raise InputError("internal: a stacked expert source cannot slice columns", tensor=src.name)
            name, rows = src.name, src.rows
            if scale:
                name = scale_name(src.name)
                if name not in ck:
                    raise InputError(
                        "FP8 tensor without its weight_scale_inv", file=str(ck.root), tensor=src.name
                    )
                rows = (rows[0] // 128, -(-rows[1] // 128)) if rows else None
            info, _, _, shape = ck.region(name, rows, expert=src.expert)
            return info.dtype, rows, shape

        n = len(items)
        _, gu0, d0 = items[0]
        info0 = ck.info(gu0[0].name)
        fp8 = info0.dtype == "F8_E4M3"
        parts, shapes, r = [], [], 0
        for src in gu0:
            _, _, shape = region(src)
            parts.append((r, r + shape[0]))
            shapes.append(shape)
            r += shape[0]
        inner = shapes[0][1:]
        row = math.prod(inner)
        _, _, d_shape = region(d0)
        plan.field(prefix + "w13", info0.torch_dtype, (n, r, *inner))
        plan.field(prefix + "w2", info0.torch_dtype, (n, *d_shape))
        sparts: list[tuple[int, int]] | None = None
        whole = False
        if fp8:
            s_dtype, _, _ = region(gu0[0], scale=True)
            s_torch = ck.info(scale_name(gu0[0].name)).torch_dtype
            whole = s_dtype == "I32"  # SM100 scales: one packed block per expert, not per source
            if whole:
                w_scale = Src(gu0[0].name, expert=gu0[0].expert)
                _, _, s13_shape = region(w_scale, scale=True)
                s13_shape = [n, *s13_shape]
            else:
                sparts, sr = [], 0
                for src in gu0:
                    _, _, shape = region(src, scale=True)
                    sparts.append((sr, sr + shape[0]))
                    sr += shape[0]
                s13_shape = [n, sr, *shape[1:]]
            _, _, s2_shape = region(d0, scale=True)
            plan.field(prefix + "s13", s_torch, s13_shape)
            plan.field(prefix + "s2", ck.info(scale_name(d0.name)).torch_dtype, (n, *s2_shape))
        for k, (_, gu, d) in enumerate(items):
            if len(gu) != len(parts):
                raise InputError("experts of one layer differ in their sources", tensor=gu[0].name)
            for src, (r0, r1) in zip(gu, parts):
                if region(src)[2] != [r1 - r0, *inner]:
                    raise InputError("experts of one layer differ in shape", tensor=src.name)
                plan.read(prefix + "w13", ck, src.name, src.rows, expert=src.expert, at=(k * r + r0) * row)
            if region(d)[2] != d_shape:
                raise InputError("experts of one layer differ in shape", tensor=d.name)
            plan.read(prefix + "w2", ck, d.name, d.rows, expert=d.expert, at=k * math.prod(d_shape))
            if not fp8:
                continue
            if whole:
                f = plan.fields[prefix + "s13"]
                per = math.prod(f.shape[1:])
                plan.read(prefix + "s13", ck, scale_name(gu[0].name), expert=gu[0].expert, at=k * per)
            else:
                f = plan.fields[prefix + "s13"]
                per, srow = math.prod(f.shape[1:]), math.prod(f.shape[2:])
                for src, (s0, _) in zip(gu, sparts or []):
                    _, rows, _ = region(src, scale=True)
                    at = k * per + s0 * srow
                    plan.read(prefix + "s13", ck, scale_name(src.name), rows, expert=src.expert, at=at)
            _, rows, _ = region(d, scale=True)
            at = k * math.prod(plan.fields[prefix + "s2"].shape[1:])
            plan.read(prefix + "s2", ck, scale_name(d.name), rows, expert=d.expert, at=at)
        return _Stack(prefix, [e for e, _, _ in items], parts, sparts, fp8, whole)

    def _items(
        self, step: _LayerStep
    ) -> tuple[list[tuple[int, tuple[Src, ...], Src]], list[tuple[int, tuple[Src, ...], Src]]]:
        """The (expert, gate/up sources, down source) of the step's routed original experts and of its
        converted experts, in ``step.experts`` order."""
        o, c, layer = self.orig, self.conv, step.layer
        routed = [e for e in step.experts if e < o.info.num_experts]
        o_items = [(e, *_expected_sources(o, c, layer, e)) for e in routed]
        c_items: list[tuple[int, tuple[Src, ...], Src]] = []
        for e in step.experts:
            gate, up, down = _stored(c, layer, e)
            c_items.append((e, (gate, up), down))
        return o_items, c_items

    def _layer_plans(self, step: _LayerStep) -> list[ReadPlan]:
        """The step as one plan when it fits the read budget, else as chunks of at most the budget:
        its whole tensors, then runs of experts (an expert's tensors never split; anything larger
        than the budget alone in its chunk). Chunks are labelled ``_Chunk`` in reading order."""
        full = self._plan(step)
        step.layout = dict(full.fields)
        budget = self.read_budget
        if full.nbytes <= budget:
            return [full]
        groups: list[tuple[list[str], list[int]]] = []  # (whole-tensor keys, expert positions)
        size = 0
        for key, f in full.fields.items():
            if key[1] == "|":
                continue
            need = f.nbytes + prefetch.ALIGN
            if not groups or size + need > budget:
                groups.append(([], []))
                size = 0
            groups[-1][0].append(key)
            size += need
        n_orig = len(step.orig.experts) if step.orig is not None else 0
        per = {k: f.nbytes // max(f.shape[0], 1) for k, f in full.fields.items() if k[1] == "|"}
        base = len(per) * prefetch.ALIGN
        first_experts = len(groups)
        for i in range(len(step.experts)):
            need = sum(n for k, n in per.items() if k[0] == "c" or i < n_orig)
            if len(groups) == first_experts or size + need > budget:
                groups.append(([], []))
                size = base
            groups[-1][1].append(i)
            size += need
        o_items, c_items = self._items(step)
        plans = []
        for index, (keys, positions) in enumerate(groups):
            start = positions[0] if positions else 0
            chunk = _Chunk(step, index, len(groups), start, [step.experts[i] for i in positions])
            plan = ReadPlan(chunk)
            for key in keys:
                plan.tensor(key, self.o_ck if key[0] == "o" else self.c_ck, key[2:])
            if positions:
                end = positions[-1] + 1
                if start < n_orig:
                    chunk.orig = self._plan_stack(plan, "o|", self.o_ck, o_items[start : min(end, n_orig)])
                chunk.conv = self._plan_stack(plan, "c|", self.c_ck, c_items[start:end])
            plans.append(plan)
        return plans

    def _plan(self, step: _LayerStep | _OthersStep) -> ReadPlan:
        plan = ReadPlan(step)
        if isinstance(step, _OthersStep):
            for name in step.names:
                self._plan_whole(plan, "o", name)
                self._plan_whole(plan, "c", name)
            return plan
        o, c, layer = self.orig, self.conv, step.layer
        o_items, c_items = self._items(step)
        if o_items:
            step.orig = self._plan_stack(plan, "o|", self.o_ck, o_items)
        sh = o.shared.get(layer)
        if sh is not None and (step.moe or len(o_items) < len(step.experts)):
            for name in (sh.gate, sh.up, sh.down):  # the fused slots are slices of it
                self._plan_whole(plan, "o", name)
        step.conv = self._plan_stack(plan, "c|", self.c_ck, c_items)
        if step.moe:
            for side, view in (("o", o), ("c", c)):
                ck = view.ckpt
                for name in (
                    view.arch.router_weight(layer),
                    view.arch.router_bias(layer),
                    view.arch.shared_gate_weight(layer),
                ):
                    if name and name in ck:
                        self._plan_whole(plan, side, name)
                csh = view.shared.get(layer)
                if csh is not None:
                    for name in (csh.gate, csh.up, csh.down):
                        self._plan_whole(plan, side, name)
        if step.tensors is not None:
            step.others = [
                n for n in self._others_names() if f"o:{n}" in plan.fields and f"c:{n}" in plan.fields
            ]
        return plan

    def _others_steps(self, steps: list[_LayerStep], plans: list[ReadPlan]) -> list[_OthersStep]:
        """The other tensors not read with a layer, in name order, in steps of at most the largest layer
        step or chunk (at least one tensor each), so that they never widen the buffers much."""
        if "tensors" not in self.opts.checks:
            return []
        done = {n for s in steps for n in s.others}
        budget = min(max((p.nbytes for p in plans), default=self.read_budget), self.read_budget)
        steps: list[_OthersStep] = []
        size = 0
        for name in self._others_names():
            if name in done:
                continue
            need = sum(
                ck.tensors[n].nbytes + prefetch.ALIGN
                for ck in (self.o_ck, self.c_ck)
                for n in (name, scale_name(name))
                if n in ck.tensors
            )
            if not steps or size + need > budget:
                steps.append(_OthersStep([]))
                size = 0
            steps[-1].names.append(name)
            size += need
        return steps

    # -- 1. structure ---------------------------------------------------------------------------
    def _start_hashes(self) -> FileHashes:
        """Hash every file moetool.json records whose size is right, on threads, while the other checks
        run; ``self._recorded`` keeps (name, path, record, size right) for the structure check."""
        self._hash_t0 = time.perf_counter()
        files = (self.conv.manifest or {}).get("files") or {}
        self._recorded = []
        for rel, rec in sorted(files.items()):
            p = self.c_ck.root / rel
            self._recorded.append((rel, p, rec, p.is_file() and p.stat().st_size == rec.get("size")))
        return FileHashes([p for _, p, _, size_ok in self._recorded if size_ok])

    def _check_structure(self, hashes: FileHashes | None) -> list[Check]:
        out: list[Check] = []
        t_start = time.perf_counter()

        def add(*args: Any) -> None:
            out.append(Check("structure", *args))

        o, c = self.orig, self.conv
        manifest = c.manifest
        if manifest is None:
            add(
                "manifest",
                "moetool.json",
                "missing",
                "present",
                False,
                f"{self.c_ck.root / MANIFEST_NAME} not found: not a moetool output",
            )
        else:
            bad = []
            waited = 0.0
            for rel, p, rec, size_ok in self._recorded if hashes is not None else []:
                if not size_ok:
                    bad.append(rel)
                    continue
                t_wait = time.perf_counter()
                digest = hashes.result(p)
                waited += time.perf_counter() - t_wait
                if digest != rec.get("sha256"):
                    bad.append(rel)
            if hashes is not None:
                self.timings["structure"] += hashes.done_at - self._hash_t0
            t_start += waited
            add(
                "files",
                "sha256 as recorded",
                f"{len(bad)} differ",
                "0 differ",
                not bad,
                f"file {bad[0]} does not match its recorded sha256" if bad else "",
            )
            listed = set(manifest.get("tensors") or {})
            extra = sorted(set(self.c_ck.tensors) - listed)
            missing = sorted(listed - set(self.c_ck.tensors))
            ok = not extra and not missing
            add(
                "manifest tensors",
                "listed == stored",
                f"{len(extra)} extra, {len(missing)} missing",
                "0",
                ok,
                f"tensor {(extra or missing)[0]} " + ("not in the manifest" if extra else "missing")
                if not ok
                else "",
            )
        # every original tensor accounted for, nothing extra
        o_experts, c_experts = o.expert_names(), c.expert_names()
        fused_shared = {n for s in o.shared.values() for n in s.names} if c.fused else set()
        problems: list[str] = []
        for name, info in sorted(self.o_ck.tensors.items()):
            if name in o_experts or name in fused_shared:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in self.o_ck.tensors:
                continue  # travels with its weight
            ct = self.c_ck.tensors.get(name)
            if ct is None:
                problems.append(f"tensor {name} of the original is missing")
            elif ct.shape != info.shape:
                problems.append(f"tensor {name} has shape {list(ct.shape)}, original {list(info.shape)}")
            elif ct.dtype != info.dtype and ct.dtype not in FP8_DTYPES:
                problems.append(f"tensor {name} changed dtype {info.dtype} -> {ct.dtype}")
        for name in sorted(self.c_ck.tensors):
            if name in c_experts or name in self.o_ck.tensors:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in self.c_ck.tensors:
                continue
            problems.append(f"tensor {name} is not in the original and not an expert tensor")
        for layer in sorted(o.stores):
            if layer not in c.stores:
                problems.append(f"MoE layer {layer} has no experts in the converted checkpoint")
                continue
            want = o.info.num_experts + (
                int(c.fused["num_slots"]) * int(c.fused["replicas"]) if c.fused else 0
            )
            if c.stores[layer].num_experts != want:
                problems.append(
                    f"layer {layer} stores {c.stores[layer].num_experts} experts, expected {want}"
                )
        if c.fused:
            m_expected = o.info.shared_slots
            if int(c.fused["num_slots"]) != m_expected or int(c.fused["first_slot"]) != o.info.num_experts:
                problems.append(
                    f"moetool_fused_shared_experts {c.fused} does not match the original's shared "
                    f"expert ({m_expected} slots after {o.info.num_experts} experts)"
                )
            if c.fused.get("slot_weight") != o.arch.slot_weight:
                problems.append(
                    f"moetool_fused_shared_experts.slot_weight is {c.fused.get('slot_weight')!r}, "
                    f"the family's shared expert weighs {o.arch.slot_weight!r}"
                )
        for key in sorted(set(o.config) | set(c.config)):
            if key in ADDED_CONFIG_KEYS and key not in o.config:
                continue
            if key == "quantization_config":
                continue
            if o.config.get(key) != c.config.get(key):
                problems.append(f"config.json key {key!r} differs from the original")
        has_fp8 = any(t.dtype in FP8_DTYPES for t in self.c_ck.tensors.values())
        if has_fp8 != bool(c.quantization):
            problems.append("FP8 tensors and quantization_config disagree")
        add("tensors & config", "problems", len(problems), "0", not problems, problems[0] if problems else "")
        self.timings["structure"] += time.perf_counter() - t_start
        return out

    # -- per step -------------------------------------------------------------------------------
    def _run_layer(self, batch: Batch) -> None:
        step: _LayerStep = batch.label
        with self._timed("transfer"):
            b = batch.to(self.device)
            if b is not batch:
                batch.release()  # the host buffer is free for the step after next
        if step.tensors is not None:
            with self._timed("tensors"):
                self._tensors_part(step, b, step.tensors)
        self._finish_layer(step, b)

    def _run_chunk(self, batch: Batch) -> None:
        """Check a chunk of a layer on the device (one transfer, its read buffer given back as soon as
        it is done; on the CPU the read buffer itself): keep its whole tensors, byte-check its experts,
        add them to the kernels and MoE checks; the layer's results follow its last chunk. The checks
        take the same operations in the same order as on the whole layer, so the report is the same,
        and neither host nor device ever holds the layer: the host two read buffers, the device one
        chunk, besides the layer's tensors that are not experts."""
        chunk: _Chunk = batch.label
        step = chunk.step
        if chunk.index == 0 or self._streamed is None:
            self._streamed = None  # a previous layer's tensors go before the next are allocated
            whole = {k: f for k, f in step.layout.items() if k[1] != "|"}
            self._streamed = _Streamed(_LayerTensors(whole, self.device))
        st = self._streamed
        with self._timed("transfer"):
            b = batch.to(self.device)
            if b is not batch:
                batch.release()  # the reader can refill it while this chunk is checked
            for key in b.plan.fields:
                if key[1] != "|":
                    st.whole[key].copy_(b[key])
        if chunk.experts:
            view = _Overlay(b, st.whole)
            part = dataclasses.replace(step, experts=chunk.experts, orig=chunk.orig, conv=chunk.conv)
            if step.tensors is not None:
                wanted = set(step.tensors)
                with self._timed("tensors"):
                    self._tensors_part(part, view, [e for e in chunk.experts if e in wanted])
                step.bad = part.bad
            if step.kernels is not None:
                with self._timed("kernels"):
                    if st.kernels is None:
                        st.kernels = self._kernels_start(step)
                    self._kernels_part(st.kernels, part, view, chunk.experts)
            if step.moe:
                with self._timed("moe"):
                    if st.moe is None:
                        st.moe = self._moe_start(step, view)
                    self._moe_part(st.moe, part, view, chunk.experts)
            self._orig_cache = None  # views of this chunk
        b.release()
        if chunk.index == chunk.count - 1:
            self._finish_layer(step, st.whole, st)
            self._streamed = None

    def _finish_layer(self, step: _LayerStep, b: Tensors, st: _Streamed | None = None) -> None:
        """The checks that take the whole layer, once it is all in ``b`` (or, with ``st``, once its
        chunks have all been added to the checks in progress)."""
        layer = step.layer
        if step.tensors is not None:
            with self._timed("tensors"):
                self._results["tensors"][layer] = self._tensors_result(step)
                for name in step.others:
                    self._other_results[name] = self._other(name, b)
        if step.kernels is not None:
            with self._timed("kernels"):
                run = st.kernels if st is not None else None
                if run is None:
                    run = self._kernels_start(step)
                    self._kernels_part(run, step, b, step.experts)
                self._results["kernels"][layer] = self._kernels_result(run, step)
        if step.moe:
            with self._timed("moe"):
                moe = st.moe if st is not None else None
                if moe is None:
                    moe = self._moe_start(step, b)
                    self._moe_part(moe, step, b, step.experts)
                self._results["moe"][layer] = self._moe_result(moe, step)
        self._orig_cache = None  # the layer's weights go with its step

    def _run_others(self, batch: Batch) -> None:
        with self._timed("tensors"):
            for name in batch.label.names:
                self._other_results[name] = self._other(name, batch)

    # -- 2. tensors -----------------------------------------------------------------------------
    def _quant(self, w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Block FP8 of ``w`` on the device (Triton on CUDA, the torch reference on the CPU: same bytes)."""
        w = w.to(self.device)
        if self.device.type == "cuda":
            from moetool.kernels.fp8_quant import block_quant

            return block_quant(w.contiguous(), ue8m0=self.ue8m0, name=name)
        from moetool.kernels.fp8_quant_ref import block_quant_ref

        return block_quant_ref(w, ue8m0=self.ue8m0, name=name)

    def _expected_quant(
        self, src: Src, orig: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the recipe makes of an original region: block FP8 of a float region; an FP8 region's own
        bytes when its scales already satisfy the scale format, else its float32 dequantization requantized."""
        from moetool.kernels.fp8_quant_ref import ceil_to_ue8m0, dequant_ref

        t, s = orig
        if s is None:
            return self._quant(t, src.describe())
        t, s = t.to(self.device), s.to(self.device).float()
        if not self.ue8m0 or torch.equal(ceil_to_ue8m0(s), s):
            return t, s
        return self._quant(dequant_ref(t, s), src.describe())

    def _first_diff(self, a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
        if a.shape != b.shape:
            return ()
        if _same_bytes(a, b, self._pool):
            return None
        return _first_diff(a, b)

    def _compare(
        self,
        conv_src: Src,
        orig_src: Src,
        got: tuple[torch.Tensor, torch.Tensor | None],
        orig: tuple[torch.Tensor, torch.Tensor | None],
        errs: list[float] | None,
    ) -> str | None:
        """None when the converted region is what the recipe makes of the original region, else why."""
        display = region_name(conv_src)
        got_q, got_s = got
        if got_s is None:  # not quantized: bytes must equal the source's
            want = orig[0].to(got_q.device)
            pos = self._first_diff(got_q, want)
            return None if pos is None else f"{display} differs from {orig_src.describe()} at {list(pos)}"
        want_q, want_s = self._expected_quant(orig_src, orig)
        got_q, got_s = got_q.to(want_q.device), got_s.to(want_q.device)
        pos = self._first_diff(got_q, want_q)
        if pos is not None:
            return (
                f"{display} FP8 bytes differ from the recipe applied to {orig_src.describe()} at {list(pos)}"
            )
        pos = self._first_diff(got_s.float(), want_s.float())
        if pos is not None:
            return (
                f"{region_name(conv_src, scale=True)} differs from the recipe at block {list(pos)} "
                f"({float(got_s.float()[pos]):.9g} vs {float(want_s.float()[pos]):.9g})"
            )
        w = orig[0]
        if errs is not None and w.dtype != torch.float8_e4m3fn:  # quantization error for the report
            from moetool.kernels.fp8_quant_ref import dequant_ref

            wf = w.to(self.device).float()
            d = dequant_ref(got_q, got_s)
            errs.append(float((d - wf).norm() / wf.norm().clamp_min(1e-30)))
        return None

    def _orig_region(
        self, step: _LayerStep, b: Tensors, e: int, j: int
    ) -> tuple[Src, tuple[torch.Tensor, torch.Tensor | None]]:
        """Original source ``j`` (gate, up, down) of converted expert ``e`` and its data."""
        gu, d = _expected_sources(self.orig, self.conv, step.layer, e)
        src = (*gu, d)[j]
        if step.orig is not None and e in step.orig.pos:
            return src, step.orig.region(b, e, j)
        return src, _slice(b, "o", src, self.o_ck.root)

    def _tensors_part(self, step: _LayerStep, b: Tensors, experts: list[int]) -> None:
        """Compare ``experts`` (the next of ``step.tensors``, in order) with the recipe, up to the first
        mismatch of the layer (kept in ``step.bad``); the error statistics come from the first expert."""
        assert step.tensors is not None and step.conv is not None
        if step.bad:
            return
        first = step.tensors[0]
        for e in experts:
            bad: str | None = None
            if step.conv.whole_scales:
                bad = self._compare_sm100(step, b, e)
            else:
                for j, csrc in enumerate(_stored(self.conv, step.layer, e)):
                    osrc, orig = self._orig_region(step, b, e, j)
                    got = step.conv.region(b, e, j)
                    bad = self._compare(csrc, osrc, got, orig, step.errs if e == first else None)
                    if bad:
                        break
            if bad:
                step.bad = bad
                return

    def _tensors_result(self, step: _LayerStep) -> Check:
        assert step.tensors is not None
        layer, experts, bad, errs = step.layer, step.tensors, step.bad, step.errs
        metric = f"{len(experts)} experts byte-equal"
        value = "mismatch" if bad else (f"rel err {max(errs):.2e} (expert {experts[0]})" if errs else "equal")
        return Check("tensors", f"layer {layer}", metric, value, "bytes equal", bad is None, bad or "")

    def _compare_sm100(self, step: _LayerStep, b: Tensors, e: int) -> str | None:
        from moetool.kernels.fp8_quant_ref import pack_sm100_scales_ref, sm100_scales_to_storage

        assert step.conv is not None
        names = self.conv.arch.deepgemm_names(step.layer)
        k = step.conv.pos[e]
        for tag, parts in (("w13", (0, 1)), ("w2", (2,))):
            expected = []
            for j in parts:
                src, orig = self._orig_region(step, b, e, j)
                expected.append(self._expected_quant(src, orig))
            want_q = torch.cat([p[0] for p in expected])
            want_s = sm100_scales_to_storage(
                pack_sm100_scales_ref(torch.cat([p[1] for p in expected]), want_q.shape[0])
            )
            got_q = b[f"c|{tag}"][k]
            got_s = b[f"c|{'s13' if tag == 'w13' else 's2'}"][k]
            pos = self._first_diff(got_q, want_q)
            if pos is not None:
                return f"{names[tag + '_weight']}[{e}] FP8 bytes differ from the recipe at {list(pos)}"
            pos = self._first_diff(got_s, want_s.reshape(got_s.shape))
            if pos is not None:
                return f"{names[tag + '_weight_scale_inv']}[{e}] packed scales differ at {list(pos)}"
        return None

    def _other(self, name: str, b: Tensors) -> str | Exception | None:
        """A non-expert tensor against its original (the error, if one stops the comparison, is kept to
        be raised only where the report reaches this tensor)."""
        try:
            src = Src(name)
            got, orig = _slice(b, "c", src, self.c_ck.root), _slice(b, "o", src, self.o_ck.root)
            return self._compare(src, src, got, orig, None)
        except MoetoolError as e:
            return e

    # -- 3. / 4. kernels and MoE layers -------------------------------------------------------------
    def _conv_fp8(self, step: _LayerStep, b: Tensors, experts: list[int]) -> tuple[torch.Tensor, ...]:
        """Converted experts as stacked (w13_q, w13_s, w2_q, w2_s) in the order of ``experts``, SM100
        scales unpacked to float32 blocks."""
        st = step.conv
        assert st is not None
        if not st.fp8:
            raise InputError("experts are not FP8", tensor=self.conv.stores[step.layer].prefix)
        out = [st.select(b[f"c|{k}"], experts) for k in ("w13", "s13", "w2", "s2")]
        if st.whole_scales:
            from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage, unpack_sm100_scales_ref

            n13, h = out[0].shape[1:]
            n2, i = out[2].shape[1:]
            out[1] = unpack_sm100_scales_ref(sm100_scales_from_storage(out[1], n13), n13, h)
            out[3] = unpack_sm100_scales_ref(sm100_scales_from_storage(out[3], n2), n2, i)
        return tuple(out)

    def _orig_all(self, step: _LayerStep, b: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """The original weights behind every expert of the step, in ``step.experts`` order: w13
        [n, 2I, H], w2 [n, H, I] in the original's float dtype (bf16 stays bf16, exact; FP8 is
        dequantized in float32). Routed experts are the read stacks themselves (no copy for bf16); fused
        slots are cut from the shared expert. Built once per layer for the kernels and MoE checks."""
        if self._orig_cache is not None and self._orig_cache[0] is step:
            return self._orig_cache[1]
        from moetool.kernels.fp8_quant_ref import dequant_ref

        def f(data: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            t, s = data
            return dequant_ref(t, s) if s is not None else t

        st = step.orig
        parts13, parts2 = [], []
        if st is not None:
            w13, w2 = b["o|w13"], b["o|w2"]
            if st.fp8:
                s13, s2 = b["o|s13"], b["o|s2"]
                assert st.sparts is not None
                w13 = torch.cat(
                    [f((w13[:, r0:r1], s13[:, s0:s1])) for (r0, r1), (s0, s1) in zip(st.parts, st.sparts)],
                    dim=1,
                )
                w2 = f((w2, s2))
            parts13.append(w13)
            parts2.append(w2)
        slots = [e for e in step.experts if st is None or e not in st.pos]  # after the routed experts
        if slots:
            parts13.append(
                torch.stack(
                    [torch.cat([f(self._orig_region(step, b, e, j)[1]) for j in (0, 1)]) for e in slots]
                )
            )
            parts2.append(torch.stack([f(self._orig_region(step, b, e, 2)[1]) for e in slots]))
        weights = (parts13[0], parts2[0]) if len(parts13) == 1 else (torch.cat(parts13), torch.cat(parts2))
        self._orig_cache = (step, weights)
        return weights

    def _orig_weights(
        self, step: _LayerStep, b: Tensors, experts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_orig_all`` for ``experts`` (a view when they lead the step's experts)."""
        w13, w2 = self._orig_all(step, b)
        where = {e: i for i, e in enumerate(step.experts)}
        pos = [where[e] for e in experts]
        if pos == list(range(len(pos))):
            return w13[: len(pos)], w2[: len(pos)]
        idx = torch.tensor(pos, device=w13.device)
        return w13[idx], w2[idx]

    def _backend(self) -> Backend:
        if not hasattr(self, "_be"):
            self._be = Backend(self.device, self.opts.backend)
        return self._be

    def _kernels_start(self, step: _LayerStep) -> _KernelsRun:
        """The kernels check's random tokens for the layer: ids into ``step.kernels`` (irregular group
        sizes, one expert left empty when there are several) and activations for w13 and w2."""
        gen = torch.Generator().manual_seed(self.opts.seed * 100_003 + step.layer)
        experts = step.kernels
        assert experts is not None
        n, t = len(experts), max(self.opts.tokens, 1)
        ids = torch.randint(0, n, (t,), generator=gen)
        if n > 1:
            ids[ids == n - 1] = 0
        _, rows13, hidden = step.layout["c|w13"].shape
        _, rows2, inter = step.layout["c|w2"].shape
        x = {"w13": torch.randn(t, hidden, generator=gen), "w2": torch.randn(t, inter, generator=gen)}
        got = {"w13": torch.zeros(t, rows13), "w2": torch.zeros(t, rows2)}
        return _KernelsRun(experts, ids, x, got, {k: torch.zeros_like(v) for k, v in got.items()})

    def _kernels_part(self, run: _KernelsRun, step: _LayerStep, b: Tensors, present: list[int]) -> None:
        """The kernels check's rows whose expert is among ``present`` (held by ``step``/``b``): the FP8
        grouped GEMM and the float32 GEMM on the original weights. A row's result depends only on the row
        and its expert, so the check gives the same bits run at once or part by part."""
        inside = set(present)
        here = [e for e in run.experts if e in inside]
        if not here:
            return
        q13, s13, q2, s2 = self._conv_fp8(step, b, here)
        w13, w2 = self._orig_weights(step, b, here)
        where = {e: i for i, e in enumerate(run.experts)}
        local = torch.full((len(run.experts),), -1, dtype=torch.int64)
        for i, e in enumerate(here):
            local[where[e]] = i
        lid = local[run.ids]
        rows = torch.nonzero(lid >= 0).squeeze(1)
        be = self._backend()
        for tag, wq, ws, wf in (("w13", q13, s13, w13), ("w2", q2, s2, w2)):
            x = run.x[tag]
            run.got[tag][rows] = be.grouped(x[rows], lid[rows], wq, ws).cpu()
            xd = x.to(wf.device)
            for i in lid[rows].unique().tolist():  # float32 GEMM per expert on the original weights
                sel = lid == i
                run.ref[tag][sel] = (xd[sel.to(wf.device)] @ wf[i].float().T).cpu()

    def _kernels_result(self, run: _KernelsRun, step: _LayerStep) -> Check:
        worst = (0.0, "")
        for tag in ("w13", "w2"):
            diff = calc_diff(run.got[tag], run.ref[tag])
            if diff > worst[0] or not worst[1]:
                worst = (diff, tag)
        ok = worst[0] < tol.GEMM_CALC_DIFF
        prefix = self.conv.stores[step.layer].prefix
        detail = ""
        if not ok:
            tag = worst[1]
            per_expert = {
                run.experts[i]: calc_diff(run.got[tag][run.ids == i], run.ref[tag][run.ids == i])
                for i in run.ids.unique().tolist()
            }
            bad = [e for e, d in per_expert.items() if not d < tol.GEMM_CALC_DIFF]
            bad.sort(
                key=lambda e: per_expert[e] if per_expert[e] == per_expert[e] else math.inf, reverse=True
            )
            named = ", ".join(f"expert {e} ({per_expert[e]:.2e})" for e in bad[:8])
            if len(bad) > 8:
                named += f" and {len(bad) - 8} more"
            detail = (
                f"{prefix} {tag}: FP8 GEMM disagrees with the original weights: "
                f"{named or 'no single expert over the bar, the error is spread over them'}"
            )
        return Check(
            "kernels",
            f"layer {step.layer}",
            f"calc_diff ({self._backend().name} grouped GEMM, {len(run.experts)} experts, "
            f"{run.ids.numel()} tokens)",
            f"{worst[0]:.2e}",
            f"< {tol.GEMM_CALC_DIFF:g}",
            ok,
            detail,
        )

    def _layer_weights(self, view: CheckpointView, side: str, b: Tensors, layer: int, w13, w2):
        from moetool.kernels.fp8_quant_ref import dequant_ref
        from moetool.moe import FusedSlots, MoeLayerWeights

        arch = view.arch
        dev = self.device
        shared = None
        sh = view.shared.get(layer)
        if sh is not None:

            def f(name: str) -> torch.Tensor:
                t, s = _slice(b, side, Src(name), view.ckpt.root)
                if s is not None:
                    return dequant_ref(t.to(dev), s.to(dev))
                return t.to(dev).float()

            shared = (f(sh.gate), f(sh.up), f(sh.down))

        def read(name: str | None) -> torch.Tensor | None:
            return b[f"{side}:{name}"].to(dev).float() if name and name in view.ckpt else None

        return MoeLayerWeights(
            router_weight=read(arch.router_weight(layer)),
            score_bias=read(arch.router_bias(layer)),
            w13=w13.to(dev),
            w2=w2.to(dev),
            shared_w13=torch.cat([shared[0], shared[1]]) if shared else None,
            shared_w2=shared[2] if shared else None,
            shared_gate=read(arch.shared_gate_weight(layer)),
            fused=FusedSlots.from_config(view.config),
        )

    def _moe_start(self, step: _LayerStep, b: Tensors) -> _MoeRun:
        """The MoE check's tokens and both layers' weights but the routed experts (router, shared
        expert or fused-slot metadata), and the expert ids and weights each layer's routing gives them
        (``moe_forward`` run once with an experts function that only records what it is asked)."""
        from moetool.moe import moe_forward

        layer = step.layer
        gen = torch.Generator().manual_seed(self.opts.seed * 100_003 + layer + 1)
        store = self.conv.stores[layer]
        t = max(self.opts.tokens, 1)
        x = torch.randn(t, self.orig.info.hidden_size, generator=gen).to(self.device)
        inter = self.conv.info.moe_intermediate_size
        n_routed = self.orig.info.num_experts
        # The routed experts come in parts, through ``_moe_part``: the layers carry empty stand-ins.
        ow = self._layer_weights(
            self.orig, "o", b, layer, torch.empty(n_routed, 2 * inter, 0), torch.empty(n_routed, 0, inter)
        )
        cw = self._layer_weights(
            self.conv,
            "c",
            b,
            layer,
            torch.empty(store.num_experts, 2 * inter, 0),
            torch.empty(store.num_experts, 0, inter),
        )
        asked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(side: str) -> Callable:
            def fn(xx: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
                asked[side] = (ids, wts)
                return torch.zeros(xx.shape[0], xx.shape[1], device=xx.device)

            return fn

        for side, view, w in (("o", self.orig, ow), ("c", self.conv, cw)):
            unshared = dataclasses.replace(w, shared_w13=None, shared_w2=None)
            moe_forward(x, unshared, view.info.routing, view.arch.slot_weight, experts_fn=record(side))
        c_ids, c_wts = asked["c"]
        if store.fp8:  # one row per (token, expert column), weighed and summed at the end
            got = torch.zeros(c_ids.numel(), x.shape[1], device=self.device)
        else:
            got = torch.zeros(t, x.shape[1], device=self.device)
        return _MoeRun(x, ow, cw, *asked["o"], c_ids, c_wts, torch.zeros_like(x), got, store.fp8)

    def _moe_part(self, run: _MoeRun, step: _LayerStep, b: Tensors, present: list[int]) -> None:
        """Add the experts ``present`` (consecutive ids, held by ``step``/``b``) to both layers' sums:
        the original's through the float32 reference, the converted one's through the FP8 kernels (or
        float32 when it is not FP8). Parts in ascending order give the bits of one part."""
        from moetool.moe import experts_reference_into

        if not present:
            return
        first = present[0]
        if present != list(range(first, first + len(present))):
            raise InputError("internal: the MoE check takes consecutive experts", tensor=str(present[:4]))
        dev = self.device
        routed = [e for e in present if e < self.orig.info.num_experts]
        if routed:
            ow13, ow2 = self._orig_weights(step, b, routed)
            experts_reference_into(run.ref, run.x, run.o_ids, run.o_wts, ow13.to(dev), ow2.to(dev), first)
        assert step.conv is not None
        if run.fp8:
            q13, s13, q2, s2 = self._conv_fp8(step, b, present)
            flat_ids = run.c_ids.reshape(-1)
            rows = torch.nonzero((flat_ids >= first) & (flat_ids < first + len(present))).squeeze(1)
            if rows.numel():
                k = run.c_ids.shape[1]
                x_rows = run.x.float()[rows // k]
                run.got[rows] = self._backend().expert_rows(x_rows, flat_ids[rows] - first, q13, s13, q2, s2)
        else:
            cw13 = step.conv.select(b["c|w13"], present).float().to(dev)
            cw2 = step.conv.select(b["c|w2"], present).float().to(dev)
            experts_reference_into(run.got, run.x, run.c_ids, run.c_wts, cw13, cw2, first)

    def _moe_result(self, run: _MoeRun, step: _LayerStep) -> Check:
        from moetool.moe import moe_forward

        layer = step.layer
        store = self.conv.stores[layer]
        ref, ref_ids = moe_forward(
            run.x, run.ow, self.orig.info.routing, self.orig.arch.slot_weight, experts_fn=lambda *_: run.ref
        )
        if run.fp8:
            t, k = run.c_ids.shape
            summed = weighted_sum(run.got.reshape(t, k, -1), run.c_wts).to(run.x.device)
            label = f"{self._backend().name} FP8 experts"
        else:
            summed, label = run.got, "float32 experts"
        got, got_ids = moe_forward(
            run.x, run.cw, self.conv.info.routing, self.conv.arch.slot_weight, experts_fn=lambda *_: summed
        )
        same_ids = torch.equal(torch.sort(got_ids.cpu(), 1).values, torch.sort(ref_ids.cpu(), 1).values)
        diff = calc_diff(got.cpu(), ref.cpu())
        ok = same_ids and diff < tol.MOE_CALC_DIFF
        why = (
            ""
            if ok
            else (
                f"{store.prefix}: top-k ids differ from the original's routing"
                if not same_ids
                else f"{store.prefix}: layer output disagrees with the original layer"
            )
        )
        return Check(
            "moe",
            f"layer {layer}",
            f"calc_diff ({label}, {run.x.shape[0]} tokens), top-k ids",
            f"{diff:.2e}, ids {'equal' if same_ids else 'DIFFER'}",
            f"< {tol.MOE_CALC_DIFF:g}, equal",
            ok,
            why,
        )


def validate_checkpoints(original: str | Path, converted: str | Path, opts: ValidateOptions) -> Report:
    t0 = time.perf_counter()
    with Checkpoint(original) as o, Checkpoint(converted) as c:
        orig = analyze(o, family=opts.family)  # an unreadable original: a usage problem (exit 2)
        try:
            conv = analyze(c, family=opts.family)
            if conv.arch.family != orig.arch.family:
                raise InputError(
                    f"it is a {conv.arch.family} checkpoint, the original a {orig.arch.family} one",
                    file=str(c.root),
                    fix="give the original it was converted from",
                )
        except InputError as e:
            # the converted checkpoint contradicts itself (e.g. a fused slot dropped but still in
            # config.json): that is what validate exists to find, so it is a failed check (exit 1)
            dev = pick_device(opts.device)
            report = Report(str(o.root), str(c.root), str(dev), resolve_backend(opts.backend, dev))
            report.checks.append(
                Check(
                    "structure",
                    "converted checkpoint",
                    "consistent with its config",
                    "inconsistent",
                    "consistent",
                    False,
                    e.line(),
                )
            )
            report.timings = {"total": round(time.perf_counter() - t0, 3)}
            return report
        return Validator(orig, conv, opts).run()


# -- 5. SSM state files -----------------------------------------------------------------------
def validate_states(original: str | Path, converted: str | Path, opts: ValidateOptions) -> Report:
    """The converted state file decodes like the original: T steps of the K-last pool-indexed kernel
    (Triton; torch reference on the CPU) on the converted state against the k-first reference on the
    original; outputs and final states compared (relative error)."""
    from moetool.gdn import gdn_decode_gated_ref, relative_error
    from moetool.ssm import read_state_file, recurrent_state_name, slot_ids_name, state_layers
    from moetool.transforms.ssm_layout import convert_layout, from_pool

    t0 = time.perf_counter()
    device = pick_device(opts.device)
    report = Report(str(original), str(converted), str(device), "torch" if device.type == "cpu" else "triton")
    report.timings = {"ssm": 0.0, "total": 0.0}
    o_t, o_meta = read_state_file(original)
    c_t, c_meta = read_state_file(converted)
    o_t, o_meta = convert_layout(*from_pool(o_t, o_meta), "k-first")
    o_layers, c_layers = state_layers(o_t), state_layers(c_t)
    same = (o_meta.num_value_heads, o_meta.head_k_dim, o_meta.head_v_dim) == (
        c_meta.num_value_heads,
        c_meta.head_k_dim,
        c_meta.head_v_dim,
    )
    report.checks.append(
        Check(
            "structure",
            "state file",
            "layers and head dims match",
            "equal" if o_layers == c_layers and same else "differ",
            "equal",
            o_layers == c_layers and same,
            ""
            if o_layers == c_layers and same
            else f"layers {o_layers} vs {c_layers}, dims {o_meta} vs {c_meta}",
        )
    )
    if o_layers != c_layers or not same:
        report.timings["total"] = round(time.perf_counter() - t0, 3)
        return report
    t_ssm = time.perf_counter()
    if device.type == "cpu":
        from moetool.kernels.gdn_decode_ref import gdn_decode_klast_ref as kernel
    else:
        from moetool.kernels.gdn_decode import gdn_decode_klast as kernel
    gen = torch.Generator().manual_seed(opts.seed)
    hv, kd, vd = c_meta.num_value_heads, c_meta.head_k_dim, c_meta.head_v_dim
    h = c_meta.num_key_heads or o_meta.num_key_heads or hv
    steps = max(opts.ssm_steps, 1)
    for layer in (opts.layers and [x for x in c_layers if x in opts.layers]) or c_layers:
        orig_state = o_t[recurrent_state_name(layer)]
        n = orig_state.shape[0]
        if c_meta.pooled:
            pool = c_t[recurrent_state_name(layer)].clone()
            slots = c_t[slot_ids_name(layer)].to(torch.int32)
        else:
            dense, _ = (
                convert_layout(
                    {recurrent_state_name(layer): c_t[recurrent_state_name(layer)]}, c_meta, "k-last"
                )
                if c_meta.layout == "k-first"
                else (c_t, c_meta)
            )
            st = dense[recurrent_state_name(layer)]
            pool = torch.cat([torch.zeros_like(st[:1]), st]).contiguous()
            slots = torch.arange(1, n + 1, dtype=torch.int32)
        q = torch.randn(n, steps, h, kd, generator=gen)
        k = torch.randn(n, steps, h, kd, generator=gen)
        v = torch.randn(n, steps, hv, vd, generator=gen)
        a = torch.randn(n, steps, hv, generator=gen)
        b = torch.randn(n, steps, hv, generator=gen)
        A_log = torch.randn(hv, generator=gen) * 0.5
        dt_bias = torch.randn(hv, generator=gen) * 0.5
        bf16 = orig_state.dtype == torch.bfloat16
        # the kernel keeps the state in float32 across the T steps of one launch and rounds it once
        ref_o, ref_s = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, orig_state, layout="k-first")
        dev = device
        pool_d = pool.to(dev)
        out = kernel(
            q.to(dev),
            k.to(dev),
            v.to(dev),
            a.to(dev),
            b.to(dev),
            A_log.to(dev),
            dt_bias.to(dev),
            pool_d,
            slots.to(dev),
        )
        got_s = pool_d.cpu()[slots.long()].transpose(-1, -2)
        err = max(
            relative_error(out.cpu().float(), ref_o.float()), relative_error(got_s.float(), ref_s.float())
        )
        bound = tol.SSM_REL_ERROR_BF16 if bf16 or pool.dtype == torch.bfloat16 else tol.SSM_REL_ERROR_FP32
        ok = err <= bound
        report.checks.append(
            Check(
                "ssm",
                f"layer {layer}",
                f"rel error of {steps} decode steps (outputs, final state)",
                f"{err:.2e}",
                f"<= {bound:g}",
                ok,
                ""
                if ok
                else f"{recurrent_state_name(layer)}: decoding from the converted state disagrees "
                f"(labelled {c_meta.layout}; a mislabelled layout does this)",
            )
        )
    report.timings = {
        "ssm": round(time.perf_counter() - t_ssm, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    return report

"""The GEMM backend the kernels and MoE checks run converted experts through: per-token activation
quantization and the FP8 block grouped GEMM on one device (Triton or DeepGEMM on CUDA, the torch
references on the CPU)."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from moetool.errors import UsageError
from moetool.kernels import dispatch

BACKENDS = ("auto", "triton", "deepgemm")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's ``calc_diff`` (``1 - 2<x,y>/(|x|^2+|y|^2)``) as a Python float."""
    from moetool.kernels.fp8_grouped_gemm_ref import calc_diff as cd

    return float(cd(x, y))


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


def deepgemm_takes(dims: tuple[int, ...]) -> bool:
    """Whether DeepGEMM's grouped GEMM takes operands of these N and K sizes: its TMA descriptors need
    the FP8 rows' byte strides aligned: a 200-wide K makes the driver reject them (CUDA
    ``INVALID_VALUE``) where 320 ran bit-identical to the Triton GEMM on an H200. We ask for multiples of
    64, which every released MoE's sizes are."""
    return all(d % 64 == 0 for d in dims)


def model_dims(info) -> tuple[int, int]:
    """The GEMM sizes (N and K) of a model's experts: hidden and expert intermediate size."""
    return (info.hidden_size, info.moe_intermediate_size)


def resolve_backend(name: str, device: torch.device, dims: tuple[int, ...] = ()) -> str:
    """The GEMM the kernels and MoE checks run on ``device``: ``torch`` (the references) on the CPU; on
    CUDA ``triton`` or ``deepgemm`` as asked, and for ``auto`` DeepGEMM where ``deep_gemm`` is importable,
    the card is SM90 (Hopper) and every GEMM size in ``dims`` (hidden and expert intermediate size) is a
    multiple of 64, else Triton. (DeepGEMM's SM100 kernels take scales as UE8M0 only, so float32 scales
    would be rounded there: ``--backend deepgemm`` is for UE8M0 outputs on such a card.) Asking for
    ``deepgemm`` on sizes it does not take is a usage error naming them."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", fix=f"one of {', '.join(BACKENDS)}")
    if not dispatch.uses_kernels(device):
        return "torch"
    if name == "deepgemm" and not deepgemm_takes(dims):
        raise UsageError(
            f"--backend deepgemm: DeepGEMM's grouped GEMM takes sizes that are multiples of 64, this model's "
            f"hidden and expert intermediate sizes are {', '.join(map(str, dims))}",
            fix="use --backend auto or triton",
        )
    if name != "auto":
        return name
    if torch.cuda.get_device_capability(device)[0] == 9 and deepgemm_takes(dims) and _deepgemm_importable():
        return "deepgemm"
    return "triton"


class Backend:
    """Per-token activation quantization and the FP8 grouped GEMM on one device."""

    def __init__(self, device: torch.device, name: str, dims: tuple[int, ...] = ()) -> None:
        """``name``: as :func:`resolve_backend` gives it for the model's ``dims`` (``auto`` is resolved
        here too)."""
        self.device, self.name = device, resolve_backend(name, device, dims)
        name = self.name
        from moetool.kernels.fp8_grouped_gemm_ref import contiguous_layout

        self.layout = contiguous_layout
        # MN-major scales: what DeepGEMM takes and what the Triton GEMM reads fastest (no transpose there).
        self.act_quant = functools.partial(dispatch.token_quant, mn_major=True)
        self.gemm = dispatch.grouped_gemm
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

    def grouped(
        self, x: torch.Tensor, ids: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, *, parts: int = 1
    ) -> torch.Tensor:
        """``y[t] = x[t] @ W[ids[t]]ᵀ`` through the FP8 path: x [T, K] float, ids [T]; returns [T, N] f32.

        ``parts``: W's N rows are that many equal parts, each quantized on its own 128-row grid with its
        scale rows stored after the previous part's (w13's gate then up rows when the intermediate size
        is not a multiple of 128: part j's row blocks do not line up with one grid over all N rows).
        Each part then runs as a GEMM of its own.

        A row whose activations are not finite (a converted expert upstream gave NaN or infinity) is not
        quantized: its output is NaN, for the check comparing it to report against the converted side.
        """
        if parts > 1:
            n, sp = w_q.shape[1] // parts, w_s.shape[1] // parts
            return torch.cat(
                [
                    self.grouped(
                        x,
                        ids,
                        w_q[:, j * n : (j + 1) * n].contiguous(),
                        w_s[:, j * sp : (j + 1) * sp].contiguous(),
                    )
                    for j in range(parts)
                ],
                dim=1,
            )
        dev = self.device
        x, ids = x.to(dev).float(), ids.to(dev)
        finite = torch.isfinite(x).all(dim=1)
        all_finite = bool(finite.all())
        if not all_finite:
            x = torch.where(finite[:, None], x, 0.0)
        a, m_idx, rows = self.layout(x, ids, w_q.shape[0])
        a_q, a_s = self.act_quant(a)
        d = self.gemm(a_q, a_s, w_q.to(dev), w_s.to(dev), m_idx).float()[rows]
        if not all_finite:
            d[~finite] = float("nan")
        return d

    def expert_rows(self, x, ids, w13_q, w13_s, w2_q, w2_s, limit: float | None = None) -> torch.Tensor:
        """``y[r] = expert_{ids[r]}(x[r])`` through the FP8 path for rows x [P, H] float, ids [P] into the
        stacked experts (w13 [E, 2I, H], w2 [E, H, I]); returns [P, H] float32. Each row's result depends
        only on the row and its expert, not on which other rows share the call. ``limit``: the SwiGLU
        clamp of ``moetool.moe.expert_mlp`` (DeepSeek-V4's swiglu_limit). With I not a multiple of 128,
        w13's gate and up rows each have their own scale grid (``grouped(parts=2)``)."""
        inter = w13_q.shape[1] // 2
        h = self.grouped(x, ids, w13_q, w13_s, parts=w13_parts(inter))
        gate, up = h[:, :inter], h[:, inter:]
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return self.grouped(F.silu(gate) * up, ids, w2_q, w2_s)


def w13_parts(inter: int) -> int:
    """How many scale grids a stacked w13 ``[E, 2I, H]`` holds: one when I is a multiple of 128 (the
    deepgemm layout requires it), else gate's and up's (what the hf layout's per-expert tensors give)."""
    return 1 if inter % 128 == 0 else 2

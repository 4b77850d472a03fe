"""transformers on CUDA: the outputs engines load (``--layout hf``, with and without ``--targets linear``)
load with transformers' FP8 kernels and compute what their FP8 weights say, for every family of the
engine matrix; the stacked layout is refused there too.

On a GPU of compute capability >= 8.9 transformers 5.24 keeps block-FP8 weights as FP8 and runs its own
kernels (it dequantizes only on CPU, on older GPUs or when asked to). Its ``FP8Experts`` hold stacked
experts as ``gate_up_proj [E, 2I, H]`` with ``gate_up_proj_scale_inv`` — the deepgemm layout's names —
so :func:`test_the_stacked_layout_is_native_on_cuda_but_not_on_cpu` records what transformers makes of a
deepgemm output with moetool's refusal marker taken away: right on CUDA, wrong on CPU. A config cannot
tell the two apart when it is loaded, which is why the deepgemm layout keeps the marker (docs/compat.md).

Needs a CUDA GPU of compute capability >= 8.9, transformers >= 5.24, accelerate, and transformers' FP8
kernel ``kernels-community/finegrained-fp8``: through the ``kernels`` package, or from the folder
``LOCAL_KERNELS`` names for it (scripts/assemble_hub_kernels.sh builds .hubkernels/; scripts/gpu_suite.sh
points LOCAL_KERNELS there): ``bash scripts/gpu_suite.sh tests`` or ``pytest -m gpu tests/test_engine_gpu.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from moetool.engines import REFUSED
from moetool.testing.engine_matrix import Cells, dequantized_copy, logits, sources, token_ids

pytestmark = pytest.mark.gpu
pytest.importorskip("transformers", minversion="5.24")
pytest.importorskip("accelerate")

TABLE = sources()
#: 1 - cosine of CUDA logits (FP8 weights, FP8 activations per 128-column group) to the CPU logits of
#: the same weights dequantized: activation rounding and a few routing flips of the tiny models; a
#: weight or scale grid read wrongly gives 0.3 and more
GAP = 5e-2


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them on the GPU machine)"
    major, minor = torch.cuda.get_device_capability()
    assert (major, minor) >= (8, 9), "transformers runs block FP8 from compute capability 8.9 on"
    return Cells(tmp_path_factory.mktemp("engine_gpu"), TABLE)


FP8_KERNEL = "kernels-community/finegrained-fp8"


@pytest.fixture(scope="module")
def fp8_kernels() -> None:
    """transformers' FP8 matmuls: its ``finegrained-fp8`` hub kernel, through the ``kernels`` package
    (which honours ``LOCAL_KERNELS=kernels-community/finegrained-fp8=DIR``), or, where no ``kernels``
    release transformers accepts is installed (5.24 takes only >= 0.18.2, < 0.19), imported from the
    ``LOCAL_KERNELS`` folder here and handed to transformers' own loader, which checks its entry points.
    scripts/assemble_hub_kernels.sh builds that folder (.hubkernels/, which scripts/gpu_suite.sh points
    LOCAL_KERNELS at); the GPU machine has no network to fetch the kernel from the Hub."""
    from transformers.integrations import finegrained_fp8 as tf_fp8

    try:
        tf_fp8.load_finegrained_fp8_kernel()
        return
    except ImportError as exc:
        missing = exc
    folder = _local_kernel_folder(FP8_KERNEL)
    if folder is None:
        pytest.fail(
            f"transformers' FP8 kernels are unavailable ({missing}): run scripts/assemble_hub_kernels.sh and "
            f"carry .hubkernels/ (scripts/gpu_suite.sh sets LOCAL_KERNELS={FP8_KERNEL}=.hubkernels/finegrained-fp8)"
        )
    module = _import_kernel_folder(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_fp8, "is_kernels_available", lambda: True)
        mp.setattr(tf_fp8, "lazy_load_kernel", lambda name: module if name == "finegrained-fp8" else None)
        tf_fp8.load_finegrained_fp8_kernel()  # cached by transformers for the rest of the session


def _local_kernel_folder(repo_id: str) -> Path | None:
    """The folder ``LOCAL_KERNELS`` (``repo_id=path[:repo_id=path...]``, the ``kernels`` package's
    format) names for ``repo_id``."""
    import os

    for entry in filter(None, os.environ.get("LOCAL_KERNELS", "").split(":")):
        rid, _, path = entry.partition("=")
        if rid == repo_id:
            return Path(path)
    return None


def _import_kernel_folder(folder: Path) -> Any:
    """Import a noarch kernel build as ``kernels`` does: the package in ``folder`` under the module name
    its ``metadata.json`` gives as ``id``."""
    import importlib.util
    import sys

    meta = json.loads((folder / "metadata.json").read_text())
    name = meta["id"]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None, folder
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_cuda(family: str, path: Path, **extra: Any) -> Any:
    """``from_pretrained`` onto the GPU with FP8 kept as FP8 (transformers' own kernels)."""
    # as a user loads it: no quantization_config argument (transformers keeps FP8 as FP8 on a card that
    # runs it; an argument would replace the checkpoint's, its modules_to_not_convert included)
    kwargs: dict[str, Any] = {"device_map": "cuda", **extra}
    return TABLE[family].load(path, **kwargs)


def cuda_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters()), "FP8 weights were dequantized"
    assert all(p.device.type == "cuda" for p in model.parameters())
    return logits(model, ids.cuda()).cpu()


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1 - float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def weights_logits(cells: Cells, family: str, out: Path, tmp: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the weights ``out`` stores, without FP8 kernels: the original's on the CPU where the cast
    is exact, else the original with ``out``'s FP8 tensors dequantized by moetool's reference, in its
    float dtype on the GPU (transformers picks fla's Triton kernels for Gated DeltaNet layers once fla is
    installed, and those run on CUDA tensors only)."""
    src = TABLE[family]
    if src.exact:
        return logits(src.load(cells.original(family)), ids)
    copy = tmp / "dequantized"
    shutil.rmtree(copy, ignore_errors=True)
    assert dequantized_copy(cells.original(family), out, copy) > 0
    model = src.load(copy, device_map="cuda")
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return logits(model, ids.cuda()).cpu()


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("variant", ["hf", "linear"])
@pytest.mark.parametrize("family", sorted(TABLE))
def test_engine_layouts_load_right_on_cuda(
    cells: Cells, fp8_kernels: None, tmp_path: Path, family: str, variant: str, scale_fmt: str
) -> None:
    cell = cells.output(family, variant, scale_fmt)
    if cell.path is None:  # --targets linear on a release whose Linears are FP8 already
        assert variant == "linear" and TABLE[family].fp8_linears, cell.refusal
        return
    ids = token_ids(TABLE[family].vocab)
    try:
        got = cuda_logits(load_cuda(family, cell.path), ids)
    except KeyError as exc:
        assert_the_release_fails_alike(cells, family, ids, exc)
        return
    want = weights_logits(cells, family, cell.path, tmp_path, ids)
    assert gap(got, want) < GAP, f"{family} {variant} {scale_fmt}: 1 - cos {gap(got, want):.3g}"


#: What a Triton that cannot type torch's E8M0 dtype raises when handed an E8M0 tensor (Triton 3.6 to
#: 3.9: ``canonicalize_dtype`` has no entry for it)
E8M0_UNTYPED = "'float8_e8m0fnu'"


def assert_the_release_fails_alike(cells: Cells, family: str, ids: torch.Tensor, exc: KeyError) -> None:
    """An error, never a wrong answer, and only where the release itself cannot run on this stack:
    transformers 5.24's grouped FP8 Linear (DeepSeek-V4's attention output projection ``o_a_proj``)
    hands its scales as stored to the Triton grouped matmul of its FP8 kernel, and the release's
    non-expert Linears carry E8M0 scales, which moetool keeps as the release ships them; Triton raises on
    the dtype. The original must then fail the same way, so the output runs wherever its input runs (its
    logits equal the original's bit for bit on the CPU: tests/test_engine_matrix.py)."""
    assert str(exc) == E8M0_UNTYPED, f"{family}: {exc!r}"
    with pytest.raises(KeyError) as original:
        cuda_logits(load_cuda(family, cells.original(family)), ids)
    assert str(original.value) == E8M0_UNTYPED, f"{family}: the original raised {original.value!r}"


@pytest.mark.parametrize("variant", ["deepgemm", "sm100", "fused-hf", "fused-deepgemm"])
def test_refused_layouts_are_refused_on_cuda(cells: Cells, variant: str) -> None:
    family = "deepseek_v3"
    cell = cells.output(family, variant, "ue8m0")
    assert cell.path is not None, cell.refusal
    with pytest.raises(Exception, match=REFUSED):
        load_cuda(family, cell.path)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral", "qwen3_5_moe"])
def test_the_stacked_layout_is_native_on_cuda(
    cells: Cells, fp8_kernels: None, tmp_path: Path, family: str
) -> None:
    """With its refusal marker taken away, a deepgemm output computes on CUDA what the hf output of the same
    checkpoint computes (the two hold the same FP8 bytes and scales, stacked or per expert). On the CPU
    transformers misreads it: tests/test_engine_matrix.py::
    test_transformers_on_cpu_misreads_the_stacked_layout_without_its_marker, for the same families."""
    cell = cells.output(family, "deepgemm", "float")
    same = cells.output(family, "hf", "float")
    assert cell.path is not None, cell.refusal
    assert same.path is not None, same.refusal
    ids = token_ids(TABLE[family].vocab)
    want = weights_logits(cells, family, same.path, tmp_path, ids)
    on_cuda = cuda_logits(load_cuda(family, _unmarked(cell.path, tmp_path / "unmarked")), ids)
    assert gap(on_cuda, want) < GAP, f"{family}: 1 - cos {gap(on_cuda, want):.3g} on CUDA"


def _unmarked(path: Path, out: Path) -> Path:
    """A copy of the deepgemm output ``path`` with its refusal marker taken out of the config."""
    shutil.copytree(path, out)
    cfg = json.loads((out / "config.json").read_text())
    marked = 0
    for c in (cfg, cfg.get("text_config") or {}):
        if "quantization_config" in c:
            assert REFUSED in c["quantization_config"]["activation_scheme"]
            c["quantization_config"]["activation_scheme"] = "dynamic"
            marked += 1
    assert marked, "no quantization_config in the deepgemm output"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral", "qwen3_5_moe", "glm4_moe"])
def test_the_stacked_layout_fills_fp8experts_on_cuda(
    cells: Cells, tmp_path: Path, family: str, scale_fmt: str
) -> None:
    """No kernel needed: with the marker removed, every stacked tensor of the deepgemm layout lands, byte
    for byte, in the FP8Experts parameter of the same name on the GPU (nothing missing, nothing
    unexpected); the forward is transformers' own (test above)."""
    from safetensors import safe_open

    cell = cells.output(family, "deepgemm", scale_fmt)
    assert cell.path is not None, cell.refusal
    unmarked = _unmarked(cell.path, tmp_path / "unmarked")
    model, info = load_cuda(family, unmarked, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    import re

    def tail(name: str) -> str:
        # layer and tensor: transformers may rename the module between them (Mixtral's block_sparse_moe
        # is its mlp), and a layer holds one experts module
        m = re.search(r"layers\.(\d+)\..*?(experts\.[a-z_]+)$", name)
        assert m is not None, name
        return f"{m.group(1)}.{m.group(2)}"

    named = [(tail(n), p) for n, p in model.named_parameters() if ".experts." in n]
    params = dict(named)
    assert len(params) == len(named), "two experts modules in one layer"
    checked = 0
    for f in sorted(unmarked.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                if ".experts.gate_up_proj" not in name and ".experts.down_proj" not in name:
                    continue
                stored = h.get_tensor(name)
                held = params[tail(name)].detach()
                assert held.device.type == "cuda" and held.shape == stored.shape, name
                if stored.dtype == torch.float8_e4m3fn:
                    assert held.dtype == stored.dtype, name
                    assert torch.equal(held.cpu().view(torch.uint8), stored.view(torch.uint8)), name
                else:  # scales: float32, or E8M0 where transformers holds UE8M0 scales (powers of two: exact)
                    assert torch.equal(held.cpu().float(), stored.float()), name
                checked += 1
    assert checked >= 4

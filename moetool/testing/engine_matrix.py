"""The engine-compatibility matrix's inputs: a tiny original of every family the test builders know, and
every output moetool writes from it.

Cells are ``family x variant x scale format``. A variant is a chain of moetool commands; ``fused-*`` run
``fuse-shared`` on the quantized output. Originals come from transformers' own classes (the classic
families from :mod:`moetool.testing.hf_models`, the 2026 ones from :mod:`moetool.testing.hf_families`,
DeepSeek-V4 as its FP4 release from :mod:`moetool.testing.release_formats`), so a family joins the matrix
by joining one of those tables. ``tests/test_engine_matrix.py`` loads every cell in transformers;
``scripts/engine_compat.py`` feeds the same cells to SGLang's and vLLM's config parsing and weight
loaders.

Like the rest of ``moetool.testing`` this is an oracle: it reads neither ``configs/`` nor ``moetool.arch``;
it runs moetool only through its command line.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: variant -> the moetool commands that make it from the original (each writes the next one's input)
VARIANTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "hf": (("quantize", "--layout", "hf"),),
    "deepgemm": (("quantize", "--layout", "deepgemm"),),
    "sm100": (("quantize", "--layout", "deepgemm", "--scale-layout", "sm100"),),
    "fused-hf": (("quantize", "--layout", "hf"), ("fuse-shared",)),
    "fused-deepgemm": (("quantize", "--layout", "deepgemm"), ("fuse-shared",)),
    "linear": (("quantize", "--layout", "hf", "--targets", "linear"),),
}
SCALE_FMTS = ("float", "ue8m0")
#: the variants an engine loads; every other one must be refused when loading
ENGINE_LOADABLE = frozenset({"hf", "linear"})


@dataclass(frozen=True)
class Source:
    """How to make one family's tiny original and load a checkpoint of it with transformers."""

    family: str
    build: Callable[[Path], Path]
    load: Callable[..., Any]  # (path, **from_pretrained kwargs); raises where transformers refuses
    vocab: int
    shared: bool  # the original has shared experts (fuse-shared applies)
    # the hf output holds exactly the original's values (DeepSeek-V4's FP4 -> FP8 cast), so its logits
    # must equal the original's; otherwise they must equal those of the original with every weight the
    # output quantized replaced by its dequantized value (:func:`dequantized_copy`)
    exact: bool = False
    # the original ships its Linears in FP8 already (DeepSeek-V4): ``--targets linear`` does not apply
    fp8_linears: bool = False


def _classic() -> dict[str, Source]:
    from moetool.testing import hf_models
    from moetool.testing.families import FAMILIES, family_defaults

    def build(family: str) -> Callable[[Path], Path]:
        return lambda out: hf_models.make_hf_checkpoint(
            family, out, num_layers=2, hidden_size=256, moe_intermediate_size=128, num_experts=4, seed=31
        )

    return {
        f: Source(f, build(f), hf_models.load_hf_model, 512, family_defaults(f).shared_kind is not None)
        for f in FAMILIES
    }


def _current() -> dict[str, Source]:
    from moetool.testing import hf_families as hf

    def build(family: str) -> Callable[[Path], Path]:
        return lambda out: hf.make_checkpoint(family, out, seed=31)

    return {
        f: Source(f, build(f), hf.load_model, hf.DIMS["vocab"], spec.shared)
        for f, spec in hf.FAMILIES.items()
    }


def _deepseek_v4() -> dict[str, Source]:
    import transformers

    if not hasattr(transformers, "DeepseekV4Config"):
        return {}
    from moetool.testing.release_formats import make_deepseek_v4_checkpoint, write_deepseek_v4_release

    def build(out: Path) -> Path:
        flt = make_deepseek_v4_checkpoint(out.parent / f"{out.name}-float", seed=31)
        return write_deepseek_v4_release(flt, out)

    def load(path: Path, **kwargs: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)

    return {"deepseek_v4": Source("deepseek_v4", build, load, 64, True, exact=True, fp8_linears=True)}


def sources() -> dict[str, Source]:
    """Every family with a transformers-made tiny original (needs transformers >= 5.24)."""
    if importlib.util.find_spec("transformers") is None:
        return {}
    return {**_classic(), **_current(), **_deepseek_v4()}


@dataclass(frozen=True)
class Converted:
    """One cell's output: ``path`` when moetool wrote it, else ``refusal`` (moetool's exit-2 line)."""

    path: Path | None
    refusal: str | None


def run_moetool(*args: str) -> tuple[int, str]:
    """One moetool command in this process through its real entry point (the error funnel that turns
    errors into exit codes): its exit code and stderr."""
    import contextlib
    import io

    from moetool.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*args, "-q"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue().strip()


class Cells:
    """Originals and converted outputs, each made once under ``root``."""

    def __init__(self, root: Path, table: dict[str, Source] | None = None) -> None:
        self.root = root
        self.table = sources() if table is None else table
        self._done: dict[tuple[str, ...], Converted] = {}

    def original(self, family: str) -> Path:
        out = self.root / family / "original"
        if not out.exists():
            self.table[family].build(out)
        return out

    def output(self, family: str, variant: str, scale_fmt: str) -> Converted:
        src = self.original(family)
        steps = VARIANTS[variant]
        for i in range(len(steps)):
            key = (family, scale_fmt, *(" ".join(s) for s in steps[: i + 1]))
            if key not in self._done:
                args = list(steps[i])
                if args[0] == "quantize":
                    args += ["--scale-fmt", scale_fmt]
                out = self.root / family / "-".join(k.replace(" ", "_").replace("--", "") for k in key[1:])
                code, err = run_moetool(args[0], str(src), str(out), *args[1:])
                if code == 2:
                    self._done[key] = Converted(None, err.splitlines()[-1] if err else "exit 2")
                elif code != 0:
                    raise AssertionError(f"{key}: moetool exited {code}: {err}")
                else:
                    self._done[key] = Converted(out, None)
            done = self._done[key]
            if done.path is None:
                return done
            src = done.path
        return self._done[key]


def dequantized_copy(original: Path, quantized: Path, out: Path) -> int:
    """``original`` with every tensor ``quantized`` stores in FP8 (with a float32 ``_scale_inv``) replaced
    by ``q * s`` per 128x128 block (moetool's reference, independent of transformers' dequantizer) in the
    original's dtype; same names, same config. Returns how many tensors were replaced."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from moetool.kernels.fp8_quant_ref import dequant_ref

    stored: dict[str, Path] = {}
    for f in sorted(quantized.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            stored.update(dict.fromkeys(h.keys(), f))
    shutil.copytree(original, out)
    replaced = 0
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name in stored and name + "_scale_inv" in stored:
                with safe_open(str(stored[name]), "pt") as h:
                    q = h.get_tensor(name)
                with safe_open(str(stored[name + "_scale_inv"]), "pt") as h:
                    s = h.get_tensor(name + "_scale_inv")
                if q.dtype == torch.float8_e4m3fn:
                    tensors[name] = dequant_ref(q, s).to(t.dtype)
                    replaced += 1
        save_file(tensors, f, metadata={"format": "pt"})
    return replaced


def fp8_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shape of every FP8 tensor a checkpoint stores."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                sl = h.get_slice(name)
                if sl.get_dtype() == "F8_E4M3":
                    out[name] = tuple(sl.get_shape())
    return out


def token_ids(vocab: int, seed: int = 5) -> torch.Tensor:
    """A seeded prompt of 11 token ids."""
    return torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(seed))


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits ``[T, V]`` of one sequence."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def config_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())

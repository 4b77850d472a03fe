"""Check 1, structure: every original tensor accounted for (unchanged, or transformed as moetool.json
says), nothing extra, shapes, dtypes and config consistent, and every file's sha256 as recorded (hashed
on threads while the other checks run)."""

from __future__ import annotations

import time
from typing import Any

from moetool.engines import declares_fp8, refusal, refusal_of
from moetool.io.checkpoint import MANIFEST_NAME
from moetool.io.hashing import FileHashes
from moetool.model import FP8_DTYPES
from moetool.validate.protocol import Context
from moetool.validate.report import Check

ADDED_CONFIG_KEYS = ("quantization_config", "moetool_fused_shared_experts")


class StructureCheck:
    """``start`` hashes the recorded files on threads; ``result`` waits for them and checks the rest.
    ``seconds``: the hashing's wall time plus the time spent in ``result`` beyond waiting for it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seconds = 0.0
        self._hashes: FileHashes | None = None
        self._recorded: list[tuple[str, Any, dict, bool]] = []
        self._t0 = 0.0

    def start(self) -> None:
        """Hash every file moetool.json records whose size is right (nothing without a manifest)."""
        manifest = self.ctx.conv.manifest
        if manifest is None:
            return
        self._t0 = time.perf_counter()
        files = manifest.get("files") or {}
        root = self.ctx.c_ck.root
        for rel, rec in sorted(files.items()):
            p = root / rel
            self._recorded.append((rel, p, rec, p.is_file() and p.stat().st_size == rec.get("size")))
        self._hashes = FileHashes([p for _, p, _, size_ok in self._recorded if size_ok])

    def close(self) -> None:
        if self._hashes is not None:
            self._hashes.close()

    def result(self) -> list[Check]:
        ctx = self.ctx
        out: list[Check] = []
        t_start = time.perf_counter()
        hashes = self._hashes

        def add(*args: Any) -> None:
            out.append(Check("structure", *args))

        o, c = ctx.orig, ctx.conv
        manifest = c.manifest
        if manifest is None:
            add(
                "manifest",
                "moetool.json",
                "missing",
                "present",
                False,
                f"{ctx.c_ck.root / MANIFEST_NAME} not found: not a moetool output",
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
                self.seconds += hashes.done_at - self._t0
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
            extra = sorted(set(ctx.c_ck.tensors) - listed)
            missing = sorted(listed - set(ctx.c_ck.tensors))
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
        for name, info in sorted(ctx.o_ck.tensors.items()):
            if name in o_experts or name in fused_shared:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in ctx.o_ck.tensors:
                continue  # travels with its weight
            ct = ctx.c_ck.tensors.get(name)
            if ct is None:
                problems.append(f"tensor {name} of the original is missing")
            elif ct.shape != info.shape:
                problems.append(f"tensor {name} has shape {list(ct.shape)}, original {list(info.shape)}")
            elif ct.dtype != info.dtype and ct.dtype not in FP8_DTYPES:
                problems.append(f"tensor {name} changed dtype {info.dtype} -> {ct.dtype}")
        for name in sorted(ctx.c_ck.tensors):
            if name in c_experts or name in ctx.o_ck.tensors:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in ctx.c_ck.tensors:
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
            if key == "text_config" and _without_quant(o.config.get(key)) == _without_quant(
                c.config.get(key)
            ):
                continue  # a wrapper's text_config carries the quantization_config too (quantize.py)
            if (
                o.arch.fp4_spec
                and key == o.arch.fp4_spec["expert_dtype_key"]
                and (
                    o.config.get(key),
                    c.config.get(key),
                )
                in (("fp4", "fp8"), ("fp8", "fp8"))
            ):
                continue  # DeepSeek-V4's FP4 experts became FP8
            if o.config.get(key) != c.config.get(key):
                problems.append(f"config.json key {key!r} differs from the original")
        has_fp8 = any(t.dtype in FP8_DTYPES for t in ctx.c_ck.tensors.values())
        if has_fp8 != declares_fp8(c.config):
            problems.append("FP8 tensors and quantization_config disagree")
        must_refuse = refusal(c.layout, fused=c.fused is not None) is not None
        if must_refuse != (refusal_of(c.config) is not None):
            problems.append(
                "config.json lets SGLang, vLLM and transformers load a layout they mis-read (no refusal "
                "marker in quantization_config.activation_scheme): rewrite it with this moetool"
                if must_refuse
                else "config.json carries a refusal marker but engines load this layout"
            )
        add("tensors & config", "problems", len(problems), "0", not problems, problems[0] if problems else "")
        self.seconds += time.perf_counter() - t_start
        return out


def _without_quant(text: object) -> object:
    if isinstance(text, dict):
        return {k: v for k, v in text.items() if k != "quantization_config"}
    return text

"""Check 1, structure: every original tensor accounted for (unchanged, or transformed as moetool.json
says), nothing extra, shapes, dtypes and config consistent, and every file's sha256 as recorded (hashed
while the other checks run: on threads from the bytes they read, ``moetool.io.hashing.PlannedHashes``,
or in a process of its own from the files themselves, ``ProcessHashes``; ``ValidateOptions.hash_source``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from moetool.engines import declares_fp8, refusal, refusal_of
from moetool.errors import InputError
from moetool.io.checkpoint import INDEX_NAME, MANIFEST_NAME, _inside
from moetool.io.fs import real_path
from moetool.io.hashing import PlannedHashes, file_hash_threads
from moetool.io.prefetch import ReadPlan
from moetool.io.process_hashes import HashesAhead, ProcessHashes
from moetool.model import FP8_DTYPES
from moetool.validate.protocol import Context
from moetool.validate.report import Check

ADDED_CONFIG_KEYS = ("quantization_config", "moetool_fused_shared_experts")


class StructureCheck:
    """``start`` finds the recorded files to hash; ``hash_with(plans)`` hashes them on threads, from the
    read buffers of the plans the other checks read (the hook it returns goes to their
    ``Prefetcher``), or each file whole in a process of its own; ``result`` waits for the digests and
    checks the rest. ``seconds``: the hashing's wall time plus the time spent in ``result`` beyond
    waiting for it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seconds = 0.0
        self._hashes: PlannedHashes | ProcessHashes | None = None
        self._recorded: list[tuple[str, Any, dict, bool]] = []
        self._t0 = 0.0
        self._problem: str | None = None
        self._undescribed: list[str] = []
        self.took_ahead = False

    def start(self) -> None:
        """Hash every file moetool.json records whose size is right (nothing without a manifest, with a
        malformed one, or with one that does not describe the checkpoint's files)."""
        manifest = self.ctx.conv.manifest
        if manifest is None:
            return
        root = self.ctx.c_ck.root
        self._problem = manifest_problem(manifest, root)
        if self._problem is not None:
            return
        files = manifest["files"]
        here = [*self.ctx.c_ck.shard_files, *([INDEX_NAME] if os.path.lexists(root / INDEX_NAME) else [])]
        self._undescribed = [
            f"it lists {r}, which is not here" for r in sorted(files) if not os.path.lexists(root / r)
        ]
        self._undescribed += [f"{r} is here but not listed" for r in here if r not in files]
        tensors = manifest.get("tensors")
        for rel, header in self.ctx.c_ck.headers.items() if isinstance(tensors, dict) else []:
            for name in header.tensors:
                rec = tensors.get(name)
                wrote = rec.get("file") if isinstance(rec, dict) else None
                if isinstance(wrote, str) and wrote != rel:  # the same file names, other contents
                    self._undescribed.append(f"tensor {name} is in {rel}, moetool wrote it to {wrote}")
                    break
        if self._undescribed:
            return
        for rel, rec in sorted(files.items()):
            p = root / rel
            size_ok = p.is_file() and p.stat().st_size == rec.get("size")
            self._recorded.append((rel, os.fspath(real_path(p)), rec, size_ok))

    def hash_with(
        self, plans: list[ReadPlan], *, from_reads: bool = True, ahead: HashesAhead | None = None
    ) -> Any:
        """Start hashing the recorded files: from the buffers of ``plans`` where they read them (the
        hook for their ``Prefetcher`` is returned), or, ``from_reads=False``, each file read whole by
        its own thread of another process (``ProcessHashes``; no hook: the reader never waits for a
        hash, and the hashes never wait for the interpreter lock the checks hold). None when nothing is
        hashed. ``ahead``: the same files' hashes started earlier (``HashesAhead``), taken over where
        ``from_reads=False`` and they are exactly the files to hash, each the file whose header was
        read; else they are stopped. ``took_ahead`` says which."""
        files = [f for _, f, _, size_ok in self._recorded if size_ok]
        self.took_ahead = bool(
            ahead is not None
            and self._recorded
            and not from_reads
            and ahead.take(files, self.ctx.c_ck.identity_of)
        )
        if self.took_ahead:
            self._t0 = ahead.started
            self._hashes = ahead.hashes
            return None
        if ahead is not None:
            ahead.close()
        if not self._recorded:
            return None
        self._t0 = time.perf_counter()
        if from_reads:
            self._hashes = PlannedHashes(files, plans, open_file=self.ctx.c_ck.open_shard)
            return self._hashes
        # reading the files itself, at most half the cores: the reader's threads need the rest
        self._hashes = ProcessHashes(
            files, open_file=self.ctx.c_ck.open_shard, max_threads=file_hash_threads()
        )
        return None

    def io(self) -> dict[str, int]:
        """Bytes of the converted files hashed from the read buffers, and read by the hashing itself."""
        h = self._hashes
        return {"converted_hashed_from_reads": h.from_buffers, "hash_read": h.read_itself} if h else {}

    def hashed_by(self) -> str | None:
        """What read the converted files for their sha256: ``"reads"`` (the checks' buffers),
        ``"process"`` (a process of its own) or ``"threads"`` (threads of this one, where no process
        could run); None where nothing was hashed. Settled once ``result()`` has the digests."""
        h = self._hashes
        if h is None:
            return None
        if isinstance(h, ProcessHashes):
            return "process" if h.pid is not None else "threads"
        return "reads"

    def timeline(self) -> list[dict[str, Any]]:
        """Per converted file, its hash's ``PlannedHashes.timeline`` row (file named relative to the
        checkpoint), seconds counted from the start of hashing."""
        if self._hashes is None:
            return []
        names = {p: rel for rel, p, _, _ in self._recorded}
        return [{**row, "file": names.get(row["file"], row["file"])} for row in self._hashes.timeline()]

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
        elif self._problem is not None:
            add(
                "manifest",
                "moetool.json",
                "malformed",
                "well-formed",
                False,
                f"{ctx.c_ck.root / MANIFEST_NAME}: {self._problem}",
            )
        elif self._undescribed:
            # re-sharded or edited after moetool wrote it: the file hashes prove nothing, the tensor checks
            # (every tensor against the original, unless sampled) prove or refute it on their own
            o_pts = ctx.opts
            whole = o_pts.layers is None and o_pts.experts is None and "tensors" in o_pts.checks
            add(
                "files",
                "described by moetool.json",
                "not described",
                "described",
                whole,
                f"manifest does not describe these files ({self._undescribed[0]}): re-sharded or edited "
                "after moetool wrote it; file hashes not checked, every tensor checked against the original "
                "instead"
                + ("" if whole else ", but --layers/--experts sampled them: run without to prove the rest"),
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
        if manifest is not None and self._problem is None:
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
        problems += declared_problems(ctx)
        add("tensors & config", "problems", len(problems), "0", not problems, problems[0] if problems else "")
        self.seconds += time.perf_counter() - t_start
        return out


def _without_quant(text: object) -> object:
    if isinstance(text, dict):
        return {k: v for k, v in text.items() if k != "quantization_config"}
    return text


def declared_problems(ctx: Context) -> list[str]:
    """What config.json, the shards' metadata and moetool.json declare about the stored tensors must be
    true of them: engines and ``moetool.layout`` read the declaration, not the bytes. (The refusal
    marker and the presence of FP8 are checked above; ``scale_fmt`` by the tensors check, whose recipe
    follows it.)"""
    from moetool.quantize import unconverted_linears
    from moetool.transforms.fp8_block import BLOCK

    c = ctx.conv
    problems: list[str] = []
    fp8 = {n for n, t in ctx.c_ck.tensors.items() if t.dtype in FP8_DTYPES}
    qc = c.config.get("quantization_config")
    if declares_fp8(c.config) and isinstance(qc, dict):
        if qc.get("quant_method") != "fp8":
            problems.append(f"quantization_config.quant_method is {qc.get('quant_method')!r}, not 'fp8'")
        if qc.get("fmt", "e4m3") != "e4m3":
            problems.append(f"quantization_config.fmt is {qc.get('fmt')!r}; the weights are e4m3")
        block = qc.get("weight_block_size")
        if not isinstance(block, list) or block != [BLOCK, BLOCK]:
            problems.append(
                f"quantization_config.weight_block_size is {block!r:.40}; the stored scales are one per "
                f"{BLOCK}x{BLOCK} block, and a loader would apply them to other blocks"
            )
        if refusal_of(c.config) is None and qc.get("activation_scheme") != "dynamic":
            problems.append(
                f"quantization_config.activation_scheme is {qc.get('activation_scheme')!r:.60}; the weights "
                "are for dynamic per-token activation scales"
            )
        want = set(unconverted_linears(c, fp8))
        o_qc = ctx.orig.config.get("quantization_config") if declares_fp8(ctx.orig.config) else None
        for key in ("modules_to_not_convert", "ignored_layers"):
            listed = qc.get(key)
            names = {m for m in listed if isinstance(m, str)} if isinstance(listed, list) else set()
            quantized = sorted(m for m in names if m + ".weight" in fp8)
            left_out = want - names
            if isinstance(o_qc, dict):
                # a release's own quantization_config kept as it is (DeepSeek-V4): a module it leaves out
                # and ships unquantized is the release's declaration, which its loaders follow
                theirs = o_qc.get(key) if isinstance(o_qc.get(key), list) else []
                left_out -= {
                    m
                    for m in left_out
                    if m not in theirs
                    and ctx.o_ck.tensors.get(m + ".weight") is not None
                    and ctx.o_ck.tensors[m + ".weight"].dtype not in FP8_DTYPES
                }
            left_out = sorted(left_out)
            if quantized:
                problems.append(
                    f"quantization_config.{key} names {quantized[0]}, whose weight is stored FP8: a loader "
                    "would read its FP8 bytes as plain weights"
                )
            elif left_out:
                problems.append(
                    f"quantization_config.{key} leaves out {left_out[0]}, whose weight is stored "
                    "unquantized: a loader would expect FP8 bytes and scales for it"
                )
    if c.layout not in ("mixed", "none"):
        shard_layout = "deepgemm" if c.layout == "deepgemm" else "hf"
        for rel, header in sorted(ctx.c_ck.headers.items()):
            said = header.metadata.get("moetool.layout")
            if said is not None and said != shard_layout:
                problems.append(
                    f"{rel} declares moetool.layout={said!r:.40} but the checkpoint stores the {c.layout} layout"
                )
                break
        said = (c.manifest or {}).get("layout") if isinstance(c.manifest, dict) else None
        if said is not None and said != c.layout:
            problems.append(
                f"{MANIFEST_NAME} declares layout {said!r:.40} but the checkpoint stores {c.layout}"
            )
    return problems


def manifest_problem(manifest: Any, root: Path) -> str | None:
    """What makes ``moetool.json`` unusable, in words, or None: an object whose ``files`` maps plain file
    names inside the checkpoint to ``{sha256, size}`` records and whose ``tensors`` (if any) is a mapping."""
    if not isinstance(manifest, dict):
        return f"is a JSON {type(manifest).__name__}, not an object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"'files' is a {type(files).__name__}, not a mapping of file names to records"
    for rel, rec in files.items():
        try:
            _inside(root, rel, file=str(root / MANIFEST_NAME))
        except InputError:
            return f"'files' names {rel!r:.80}, which is not a file inside the checkpoint"
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("sha256"), str)
            or not isinstance(rec.get("size"), int)
        ):
            return f"the 'files' record of {rel} is not {{sha256, size}}"
    if not isinstance(manifest.get("tensors", {}), dict):
        return "'tensors' is not a mapping of tensor names to records"
    return None

"""``moetool inspect``: what a checkpoint holds and what ``quantize`` would change, from headers only."""

from __future__ import annotations

from collections import Counter
from typing import Any

from moetool.errors import MoetoolError
from moetool.model import FP8_DTYPES, CheckpointView
from moetool.quantize import QuantizeOptions, plan_quantize
from moetool.transforms.fp8_block import BLOCK


def _kind(view: CheckpointView, name: str, experts: set[str], shared: set[str]) -> str:
    if name in experts:
        return "routed_experts"
    if name in shared:
        return "shared_experts"
    if name in view.router_names():
        return "routers"
    if "embed" in name or "lm_head" in name or name == "head.weight":
        return "embeddings"
    if ".linear_attn." in name:
        return "linear_attention"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if "norm" in name:
        return "norms"
    return "other"


def _source_bytes(ckpt: Any, name: str) -> int:
    """Bytes of a source tensor; an INT4 weight (named by its logical ``...weight``) counts its packed
    values, scales and shape."""
    if name in ckpt.tensors:
        return ckpt.tensors[name].nbytes
    from moetool.transforms.int4 import stored_names

    return sum(ckpt.tensors[n].nbytes for n in stored_names(name) if n in ckpt.tensors)


def inspect_checkpoint(view: CheckpointView) -> dict[str, Any]:
    ckpt, info = view.ckpt, view.info
    shared_names = {n for s in view.shared.values() for n in s.names}
    expert_names = {n for s in view.stores.values() for n in s.names}
    by_kind: Counter[str] = Counter()
    by_dtype: Counter[str] = Counter()
    for name, t in ckpt.tensors.items():
        by_kind[_kind(view, name, expert_names, shared_names)] += t.nbytes
        by_dtype[t.dtype] += t.nbytes
    fp4_names = {n for s in view.stores.values() if s.fp4 for n in s.names}
    # weights whose matrix dims (the last two; packed experts are [E, N, K]) leave partial 128-blocks
    not128 = sorted(
        n
        for n, t in ckpt.tensors.items()
        if len(t.shape) in (2, 3)
        and not n.endswith("_scale_inv")
        and t.dtype != "F8_E8M0"
        and n not in fp4_names
        and any(d % BLOCK for d in t.shape[-2:])
        and (n in expert_names or n in shared_names or view.is_linear_weight(n))
    )
    fp8 = [n for n, t in ckpt.tensors.items() if t.dtype in FP8_DTYPES]
    q = view.quantization or {}
    formats: Counter[str] = Counter(
        "fp4" if s.fp4 else "int4" if s.int4_group else "fp8" if s.fp8 else "float"
        for s in view.stores.values()
    )
    gdn = info.gdn
    moe = set(info.moe_layers)
    result: dict[str, Any] = {
        "path": str(ckpt.root),
        "family": view.arch.family,
        "model_type": info.model_type,
        "layers": info.num_layers,
        "moe_layers": list(info.moe_layers),
        "dense_layers": [i for i in range(info.num_layers) if i not in moe],
        "gdn_layers": list(gdn.layers) if gdn else [],
        "hidden_size": info.hidden_size,
        "routed_experts": info.num_experts,
        "top_k": info.routing.top_k,
        "moe_intermediate_size": info.moe_intermediate_size,
        "expert_formats": dict(sorted(formats.items())),  # MoE layers by routed-expert format
        "expert_dtype": info.expert_dtype,
        "hash_layers": list(info.hash_layers),
        "mtp_layers": [view.arch.moe_prefix(layer) for layer in view.mtp_layers],
        "swiglu_limit": info.swiglu_limit,
        "routing": {
            "scoring": info.routing.scoring,
            "topk_method": info.routing.topk_method,
            "n_group": info.routing.n_group,
            "topk_group": info.routing.topk_group,
            "norm_topk_prob": info.routing.norm_topk_prob,
            "routed_scaling_factor": info.routing.routed_scaling_factor,
        },
        "shared_expert_intermediate_size": info.shared_intermediate_size,
        "shared_expert_weight": view.arch.slot_weight,
        "fused_slots_if_fused": info.shared_slots,
        "fused_shared_experts": view.fused,
        "expert_storage": sorted({s.kind for s in view.stores.values()}),
        "expert_dtypes": sorted({s.dtype for s in view.stores.values()}),
        "text_model_root": view.arch.root,
        "layout": view.layout,
        "quantization": {
            "config": q or None,
            "fp8_tensors": len(fp8),
            "scale_fmt": q.get("scale_fmt", "float") if q else None,
        },
        "tensors": len(ckpt.tensors),
        "shards": len(ckpt.shard_files),
        "total_bytes": ckpt.total_bytes,
        "bytes_by_kind": dict(sorted(by_kind.items())),
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
        "not_divisible_by_128": not128,
        "ssm": (
            {
                "num_key_heads": gdn.num_key_heads,
                "num_value_heads": gdn.num_value_heads,
                "head_k_dim": gdn.head_k_dim,
                "head_v_dim": gdn.head_v_dim,
                "conv_kernel": gdn.conv_kernel,
            }
            if gdn
            else None
        ),
        "manifest": (
            {k: view.manifest.get(k) for k in ("moetool_version", "command", "layout")}
            if isinstance(view.manifest, dict)
            else None
        ),
        # FP4 blocks the cast to FP8 changed, as the conversion that made this checkpoint recorded them
        "fp4_lossy_blocks": view.manifest.get("fp4_lossy_blocks")
        if isinstance(view.manifest, dict)
        else None,
    }
    would: dict[str, Any] = {}
    for layout in ("deepgemm", "hf"):
        try:
            plan = plan_quantize(view, QuantizeOptions(layout=layout))
        except MoetoolError as e:
            would[layout] = {"error": e.line()}
            continue
        touched = {
            s.name for sh in plan.shards for j in sh.jobs if j.op in ("quant", "fp4_cast") for s in j.sources
        }
        would[layout] = {
            "quantized_tensors": len(touched),
            "quantized_bytes": sum(_source_bytes(ckpt, n) for n in touched),
            "output_bytes": plan.total_bytes,
            "notes": list(plan.notes),
        }
    result["quantize_would"] = would
    return result

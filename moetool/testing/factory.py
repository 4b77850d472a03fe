"""Real-named Hugging Face MoE checkpoints of any size, written with torch + safetensors + json only.

``make_checkpoint(family, out_dir, ...)`` writes what ``AutoModelForCausalLM.from_config(cfg)
.save_pretrained(out_dir)`` writes for that family — the same ``config.json`` keys, the same tensor
names, shapes and dtypes — filled with seeded random weights, optionally as transformers-v5 packed
experts, DeepSeek-V3-style block FP8, or several shards with an index. ``tests/test_factory.py`` proves
the equality against transformers' own classes.

The parts live by concern (see the package docstring): ``families.py`` (the tables), ``names.py``
(tensor names), ``specs.py`` (which tensors), ``tensors.py`` (seeded values), ``files.py``
(safetensors, shards, index), ``fp8.py`` (the FP8 release format), ``tokenizer.py``. This module puts
them together and re-exports their public names, the one import the tests, the demo and the
benchmarks need.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moetool.testing.families import (
    FAMILIES,
    FAMILY_DEFAULTS,
    MODEL_TYPES,
    NAMINGS,
    TEMPLATE_TRANSFORMERS_VERSION,
    WEIGHT_DTYPES,
    FamilyDefaults,
    Naming,
    family_config,
    family_defaults,
    flagship_arguments,
)
from moetool.testing.files import (
    SAFETENSORS_DTYPES,
    DiskTensor,
    plan_shards,
    shard_file_names,
    write_index,
    write_json,
    write_safetensors,
)
from moetool.testing.fp8 import (
    FP8_BLOCK,
    FP8_MAX,
    block_quant,
    fp8_disk_tensors,
    fp8_quantization_config,
    fp8_values,
    scale_grid,
    scale_name,
)
from moetool.testing.names import (
    DEEPGEMM_LEAVES,
    deepgemm_names,
    expert_intermediate_size,
    expert_proj_names,
    expert_weight_name,
    experts_prefix,
    is_moe_layer,
    layer_prefix,
    layer_type,
    moe_block_prefix,
    moe_layers,
    num_routed_experts,
    packed_expert_names,
    router_bias_name,
    router_weight_name,
    shared_expert_gate_name,
    shared_expert_prefix,
    shared_intermediate_size,
)
from moetool.testing.specs import TensorSpec, tensor_specs
from moetool.testing.tensors import CHUNK_ELEMS, INITS, generate, generate_chunk, generate_chunks, leaf_chunks
from moetool.testing.tokenizer import SPECIAL_TOKENS, tokenizer_json, write_extra_files

__all__ = [
    "CHUNK_ELEMS",
    "DEEPGEMM_LEAVES",
    "FAMILIES",
    "FAMILY_DEFAULTS",
    "FP8_BLOCK",
    "FP8_MAX",
    "INITS",
    "MODEL_TYPES",
    "NAMINGS",
    "SAFETENSORS_DTYPES",
    "SPECIAL_TOKENS",
    "TEMPLATE_TRANSFORMERS_VERSION",
    "WEIGHT_DTYPES",
    "DiskTensor",
    "FamilyDefaults",
    "Naming",
    "TensorSpec",
    "block_quant",
    "deepgemm_names",
    "disk_tensors",
    "expert_intermediate_size",
    "expert_proj_names",
    "expert_weight_name",
    "experts_prefix",
    "family_config",
    "family_defaults",
    "flagship_arguments",
    "fp8_disk_tensors",
    "fp8_quantization_config",
    "fp8_values",
    "generate",
    "generate_chunk",
    "generate_chunks",
    "is_moe_layer",
    "layer_prefix",
    "layer_type",
    "leaf_chunks",
    "make_checkpoint",
    "moe_block_prefix",
    "moe_layers",
    "num_routed_experts",
    "packed_expert_names",
    "plan_shards",
    "router_bias_name",
    "router_weight_name",
    "scale_grid",
    "scale_name",
    "shard_file_names",
    "shared_expert_gate_name",
    "shared_expert_prefix",
    "shared_intermediate_size",
    "tensor_specs",
    "tokenizer_json",
    "write_extra_files",
    "write_index",
    "write_json",
    "write_safetensors",
]


def disk_tensors(specs: Iterable[TensorSpec], *, fp8: bool = False) -> list[DiskTensor]:
    """The stored tensors of ``specs``; with ``fp8`` every :attr:`TensorSpec.fp8_target` becomes an
    F8_E4M3 weight plus its F32 ``weight_scale_inv`` ``[..., ceil(N/128), ceil(K/128)]``."""
    out: list[DiskTensor] = []
    for s in specs:
        if fp8 and s.fp8_target:
            out += fp8_disk_tensors(s)
        else:
            out.append(DiskTensor(s.name, s.shape, s.dtype, "value", s))
    return out


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    moe_intermediate_size: int = 128,
    intermediate_size: int | None = None,
    num_experts: int = 4,
    top_k: int = 2,
    shared: int | None = None,
    dense_layers: int | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    packed_experts: bool = False,
    fp8: bool = False,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    extra_files: bool = True,
    router_dtype: torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a real-named ``family`` checkpoint into ``out_dir`` (created; must be absent or empty).

    Dimensions as :func:`family_config` (``dense_layers`` defaults to 1 for the DeepSeek/GLM families,
    0 otherwise). ``packed_experts``: transformers-v5 ``P.gate_up_proj [E, 2I, H]`` (gate rows first)
    and ``P.down_proj [E, H, I]`` instead of per-expert tensors, holding the same values.
    ``fp8``: DeepSeek-V3 official style — every Linear but routers, ``shared_expert_gate`` and
    ``lm_head`` stored F8_E4M3 with F32 ``weight_scale_inv`` on ceil grids (``fp8.py``; packed experts get
    ``P.gate_up_proj_scale_inv [E, ceil(2I/128), ceil(H/128)]``), config gains ``quantization_config``;
    values are the quantized values of the non-FP8 checkpoint of the same seed.
    ``max_shard_bytes``: several shards and ``model.safetensors.index.json``. ``router_dtype``: router
    weight dtype (default float32 for DeepSeek/GLM, as transformers >= 5.2x saves them, else ``dtype``).
    ``config_overrides``: extra or replaced config values (shapes follow them). Byte-identical on rerun.
    Returns ``out_dir`` as a Path.
    """
    config = family_config(
        family,
        num_layers=num_layers,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        shared=shared,
        dense_layers=dense_layers,
        vocab_size=vocab_size,
        dtype=dtype,
        config_overrides=config_overrides,
    )
    specs = tensor_specs(config, dtype=dtype, packed_experts=packed_experts, router_dtype=router_dtype)
    if fp8:
        config["quantization_config"] = fp8_quantization_config(specs)
    out = _prepare_out_dir(out_dir)
    disk = disk_tensors(specs, fp8=fp8)
    shards = plan_shards(disk, max_shard_bytes)
    names = shard_file_names(len(shards))
    for shard, fname in zip(shards, names):
        values = _materialize(shard, seed)
        entries = [(t.name, t.shape, t.dtype) for t in shard]
        write_safetensors(out / fname, entries, lambda i, e=entries, v=values: [v[e[i][0]]])
    if len(shards) > 1:
        write_index(out, shards, names)
    write_json(out / "config.json", config)
    if extra_files:
        write_extra_files(out, config)
    return out


def _materialize(shard: Sequence[DiskTensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of ``shard`` by name; a release format's tensors of one source (an FP8 weight and
    its scale) come from one conversion of its values."""
    values: dict[str, torch.Tensor] = {}
    for t in shard:
        if t.name in values:
            continue
        if t.role == "value":
            values[t.name] = generate(t.source, seed)
            continue
        values.update(fp8_values(t.source, generate(t.source, seed)))
    return values

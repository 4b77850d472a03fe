"""Checkpoints in the formats models are released in, made from a float checkpoint: the inputs that
moetool converts, written with torch + safetensors + json only.

DeepSeek-V4 (:func:`write_deepseek_v4_release`) ships its routed experts in FP4 and its other Linears in
block FP8 with power-of-two scales:

- routed experts ``...ffn.experts.{E}.w1|w2|w3.weight`` I8 ``[N, K/2]`` (two e2m1 codes per byte, the low
  nibble holding the even column) with ``.scale`` F8_E8M0 ``[N, K/32]`` (one per row and 32 columns);
- shared experts and the attention projections (``wq_a``, ``wq_b``, ``wkv``, ``wo_a``, ``wo_b``,
  ``indexer.wq_b``) ``.weight`` F8_E4M3 with ``.scale`` F8_E8M0 ``[ceil(N/128), ceil(K/128)]``;
- everything else as it was (embeddings, head, norms, router, compressor and indexer projections);
- ``config.json``: ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}`` and ``"expert_dtype": "fp4"`` at the
  top level (V4) or inside ``quantization_config`` (V4.1).

Names are the ones transformers' ``save_pretrained`` writes (``model.layers.{L}.ffn...``, ``head.weight``)
or, with ``native_names``, the release's own (``layers.{L}.ffn...``, ``embed.weight``, ``norm.weight``,
``hc_head_fn``, ...). Both load in transformers >= 5.24 (its conversion mapping renames the release's).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.testing.fp8 import FP8_BLOCK

FP4_GROUP = 32
# e2m1 magnitudes by code 0..7 (code | 8 is the negative)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

#: Linears DeepSeek-V4 releases in block FP8 (name suffixes; ``e_proj``/``h_proj`` are MTP-only).
V4_FP8_LINEARS = (
    "e_proj.weight",
    "h_proj.weight",
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "ffn.shared_experts.w1.weight",
    "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w3.weight",
)
V4_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.weight$")
# transformers' save_pretrained name -> the release's, for names outside model.layers
_NATIVE_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "head.weight": "head.weight",
}


def make_deepseek_v4_checkpoint(
    out: str | Path,
    *,
    num_layers: int = 3,
    hash_layers: int = 1,
    hidden_size: int = 256,
    moe_intermediate_size: int = 128,
    num_experts: int = 4,
    top_k: int = 2,
    vocab_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """A tiny float DeepSeek-V4 made by transformers' own classes (``DeepseekV4Config`` shrunk,
    ``AutoModelForCausalLM.from_config(...).save_pretrained(out)``; needs transformers >= 5.24), its weights
    initialised by transformers under ``torch.manual_seed(seed)``; the first ``hash_layers`` layers route
    by ``tid2eid`` (filled with ``top_k`` distinct experts per token id, as a real table is), the others
    learn, with a nonzero score correction bias. Attention is as small as V4 allows."""
    from transformers import AutoModelForCausalLM, DeepseekV4Config

    cfg = DeepseekV4Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_layers,
        # 4 heads of 64 in 2 output groups: 128 columns per group, as transformers' FP8 grouped o_a_proj needs
        num_attention_heads=4,
        head_dim=64,
        q_lora_rank=32,
        o_groups=2,
        # 128 rows per group: transformers' FP8 grouped o_a_proj takes whole 128-row scale blocks per group
        o_lora_rank=128,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
        sliding_window=8,
        mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (num_layers - hash_layers),
        num_nextn_predict_layers=0,
        **dict(config_overrides or {}),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                table = torch.stack(
                    [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(vocab_size)]
                )
                gate.tid2eid.copy_(table)
            else:
                gate.e_score_correction_bias.copy_(torch.randn(num_experts, generator=gen) * 0.1)
    model.save_pretrained(out)
    return Path(out)


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``w [N, K]`` (K a multiple of 32) to DeepSeek-V4's FP4: per row and 32 columns the smallest
    power-of-two scale ``2**e`` with ``amax / 2**e <= 6`` (``e`` in [-127, 127]; 2**-127 for a zero group),
    each value rounded to the nearest e2m1 value of ``w / 2**e`` (ties to the smaller magnitude).
    Returns ``packed`` int8 ``[N, K/2]`` (low nibble = even column) and ``scale`` float8_e8m0fnu
    ``[N, K/32]``."""
    n, k = w.shape
    if k % FP4_GROUP:
        raise ValueError(f"FP4 needs K % {FP4_GROUP} == 0, got {k}")
    g = w.float().reshape(n, k // FP4_GROUP, FP4_GROUP)
    amax = g.abs().amax(dim=-1)
    _, exp = torch.frexp(amax / 6.0)  # amax/6 = m * 2**exp, m in [0.5, 1): 2**exp >= amax/6
    exact_pow2 = torch.frexp(amax / 6.0)[0] == 0.5
    e = torch.where(exact_pow2, exp - 1, exp)
    e = torch.where(amax > 0, e, torch.full_like(e, -127)).clamp(-127, 127)
    x = g / torch.ldexp(torch.ones_like(amax), e)[..., None]
    grid = torch.tensor(E2M1_GRID)
    code = (x.abs()[..., None] - grid).abs().argmin(dim=-1)  # first minimum: ties to the smaller
    code = code | ((x < 0) & (code > 0)).long() << 3
    code = code.reshape(n, k).to(torch.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    scale = (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed.contiguous(), scale.contiguous()


def fp8_e8m0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``w [N, K]`` to block FP8 with power-of-two scales as DeepSeek releases its Linears: per
    128 x 128 block ``s = 2**ceil(log2(amax / 448))``, ``q = e4m3(w / s)``. Returns ``q`` float8_e4m3fn
    and ``scale`` float8_e8m0fnu ``[ceil(N/128), ceil(K/128)]``."""
    n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(2.0**-100)
    mant, exp = torch.frexp(amax / 448.0)
    e = torch.where(mant == 0.5, exp - 1, exp).clamp(-127, 127)
    s = torch.ldexp(torch.ones_like(amax), e)
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.view(nb * FP8_BLOCK, kb * FP8_BLOCK)[:n, :k].contiguous()
    return q, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu).contiguous()


def native_name(name: str) -> str:
    """transformers' ``save_pretrained`` name of a DeepSeek-V4 tensor -> the release's own name."""
    if name in _NATIVE_TOP:
        return _NATIVE_TOP[name]
    return name.removeprefix("model.")


def plant_lossy_block(
    packed: torch.Tensor, scale: torch.Tensor, row_block: int, col_block: int, *, elements: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make one 128 x 128 block of FP4 weights lose exactly ``elements`` values (1..32) in the cast to FP8:
    the first row's first 32-group gets a scale 20 binades below the block's largest (byte >= 20) and
    holds ``elements`` values of ±0.5 (the rest of the group zeros). Returns new tensors."""
    if not 1 <= elements <= FP4_GROUP:
        raise ValueError("elements must lie in 1..32")
    packed, scale = packed.clone(), scale.clone()
    sb = scale.view(torch.uint8)
    r, g = row_block * FP8_BLOCK, col_block * (FP8_BLOCK // FP4_GROUP)
    block = sb[r : r + FP8_BLOCK, g : g + FP8_BLOCK // FP4_GROUP]
    top = max(int(block.max()), 20 + 1)
    block[0, 1] = top  # the largest scale of the block (kept inside it)
    block[0, 0] = top - 20
    codes = torch.zeros(FP4_GROUP, dtype=torch.uint8)
    codes[:elements] = torch.tensor([1, 9] * 16, dtype=torch.uint8)[:elements]  # +0.5, -0.5, ...
    pb = packed.view(torch.uint8)
    c0 = col_block * FP8_BLOCK // 2
    pb[r, c0 : c0 + FP4_GROUP // 2] = codes[0::2] | (codes[1::2] << 4)
    return packed, scale


# binade spans of a block's FP4 scales: exact up to 14, lossy from 15, every value flushed to zero past 20
ADVERSARIAL_SPANS = (0, 3, 11, 12, 13, 14, 15, 16, 18, 20, 21, 22, 40, 254)


def adversarial_fp4(shape: tuple[int, ...], *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 codes int8 ``[..., N, K/2]`` and E8M0 scales ``[..., N, K/32]`` (CPU) for ``shape`` ``[..., N, K]``
    that reach every case of the cast: every byte value; whole rows of code 8 (-0.0), of +0.0 and of
    bytes 0x80 (+0.0 then -0.0); per 128 x 128 block a largest scale byte ``E`` drawn from 0..254 (one
    block in ten below 6, where the FP8 scale has no E8M0 byte) and other scales spread down to ``E``
    minus a span from :data:`ADVERSARIAL_SPANS` (clamped at byte 0), both ends present in the block."""
    *lead, n, k = shape
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.int32, generator=gen).to(torch.uint8)
    rows = torch.randperm(n, generator=gen)[: max(3, n // 64)]
    packed[..., rows[0::3], :] = 0x88
    packed[..., rows[1::3], :] = 0x00
    packed[..., rows[2::3], :] = 0x80
    nb, kb = n // FP8_BLOCK, k // FP8_BLOCK
    groups = FP8_BLOCK // FP4_GROUP
    top = torch.randint(0, 255, (*lead, nb, kb), generator=gen)
    low = torch.rand(top.shape, generator=gen) < 0.1
    top = torch.where(low, torch.randint(0, 6, top.shape, generator=gen), top)
    spans = torch.tensor(ADVERSARIAL_SPANS)
    span = spans[torch.randint(0, len(spans), top.shape, generator=gen)]
    top_g = top.repeat_interleave(FP8_BLOCK, -2).repeat_interleave(groups, -1)  # [..., N, K/32]
    span_g = span.repeat_interleave(FP8_BLOCK, -2).repeat_interleave(groups, -1)
    below = (torch.rand(top_g.shape, generator=gen) * (span_g + 1)).long().minimum(span_g)
    scale = (top_g - below).clamp_min(0)
    scale[..., ::FP8_BLOCK, ::groups] = top
    scale[..., 1::FP8_BLOCK, 1::groups] = (top - span).clamp_min(0)
    return packed.view(torch.int8), scale.to(torch.uint8).view(torch.float8_e8m0fnu)


def write_deepseek_v4_release(
    src: str | Path,
    out: str | Path,
    *,
    native_names: bool = True,
    expert_dtype_in: str = "config",
    fp8_linears: Iterable[str] = V4_FP8_LINEARS,
    lossy_blocks: Mapping[str, tuple[int, int, int]] | None = None,
    mtp_layers: int = 0,
    num_shards: int = 1,
    seed: int = 0,
) -> Path:
    """Rewrite a float DeepSeek-V4 checkpoint ``src`` (as transformers' ``save_pretrained`` writes it) into
    the release format (module docstring) at ``out``.

    ``expert_dtype_in``: ``"config"`` (V4: top-level ``expert_dtype``) or ``"quantization_config"``
    (V4.1). ``lossy_blocks``: source-name -> ``(row_block, col_block, elements)`` of routed-expert
    weights to pass through :func:`plant_lossy_block`. ``mtp_layers``: multi-token-prediction layers
    ``mtp.{M}.*`` to add as the release has them (transformers does not build them): a copy of the last
    layer's block (FP4 experts, learned routing) plus ``e_proj``/``h_proj`` (FP8), ``enorm``, ``hnorm``,
    ``norm`` and ``hc_head_*``; ``config.json`` gets ``num_nextn_predict_layers``. ``num_shards`` > 1
    writes shards and an index. Other files (tokenizer, generation config) are copied. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=False)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "deepseek_v4":
        raise ValueError(f"{src} is not a deepseek_v4 checkpoint")
    fp8_suffixes = tuple(fp8_linears)
    lossy = dict(lossy_blocks or {})
    source: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            source.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    if mtp_layers:
        source.update(_mtp_tensors(source, config, mtp_layers, seed))
        config["num_nextn_predict_layers"] = mtp_layers
    tensors: dict[str, torch.Tensor] = {}
    for name, w in source.items():
        dst = native_name(name) if native_names else name
        stem = dst.removesuffix(".weight")
        if _EXPERT.search(name):
            packed, scale = fp4_quantize(w)
            if name in lossy:
                row_block, col_block, elements = lossy.pop(name)
                packed, scale = plant_lossy_block(packed, scale, row_block, col_block, elements=elements)
            tensors[dst], tensors[stem + ".scale"] = packed, scale
        elif name.endswith(fp8_suffixes) and w.dim() == 2:
            tensors[dst], tensors[stem + ".scale"] = fp8_e8m0_quantize(w)
        else:
            tensors[dst] = w.contiguous()
    if lossy:
        raise ValueError(f"no routed-expert weight named {sorted(lossy)}")
    names = sorted(tensors)
    shards = [names[i::num_shards] for i in range(num_shards)]
    if num_shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    qc: dict[str, Any] = dict(V4_QUANTIZATION_CONFIG)
    if expert_dtype_in == "config":
        config["expert_dtype"] = "fp4"
    elif expert_dtype_in == "quantization_config":
        qc["expert_dtype"] = "fp4"
    else:
        raise ValueError("expert_dtype_in is 'config' or 'quantization_config'")
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in src.iterdir():
        if (
            extra.is_file()
            and extra.suffix != ".safetensors"
            and extra.name
            not in (
                "config.json",
                "model.safetensors.index.json",
            )
        ):
            shutil.copyfile(extra, out / extra.name)
    return out


def _mtp_tensors(
    source: Mapping[str, torch.Tensor], config: Mapping[str, Any], count: int, seed: int
) -> dict[str, torch.Tensor]:
    """``mtp.{M}.*`` tensors as DeepSeek-V4 releases them, for ``count`` layers: the last decoder layer's
    tensors under the new prefix (its router is learned: the last layer is never a hash layer) and the
    MTP-only ones, seeded."""
    last = int(config["num_hidden_layers"]) - 1
    if config.get("mlp_layer_types", ["moe"] * (last + 1))[last] != "moe":
        raise ValueError("the last layer must use learned routing to serve as the MTP block")
    prefix = f"model.layers.{last}."
    hidden = int(config["hidden_size"])
    dtype = source["model.norm.weight"].dtype
    gen = torch.Generator().manual_seed(seed + 7919)
    out: dict[str, torch.Tensor] = {}
    for m in range(count):
        mp = f"mtp.{m}."
        for name, t in source.items():
            if name.startswith(prefix):
                out[mp + name[len(prefix) :]] = t.clone()
        for proj in ("e_proj", "h_proj"):
            out[f"{mp}{proj}.weight"] = (torch.randn(hidden, hidden, generator=gen) * 0.02).to(dtype)
        for norm in ("enorm", "hnorm", "norm"):
            out[f"{mp}{norm}.weight"] = torch.ones(hidden, dtype=dtype)
        for part in ("fn", "base", "scale"):
            out[f"{mp}hc_head_{part}"] = source[f"model.hc_head.hc_{part}"].clone()
    return out


# -- synthetic release-format checkpoints at real dimensions (benchmarks) ----------------------------
#: DeepSeek-V4-Flash's dimensions: transformers' ``DeepseekV4Config()`` defaults (tests check they agree)
V4_FLASH = {
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 6,
    "num_attention_heads": 64,
    "head_dim": 512,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "vocab_size": 129280,
    "hc_mult": 4,
    "num_hidden_layers": 43,
}
_SYNTH_SCALE_BYTES = (113, 125)  # FP4 scales 2**-14 .. 2**-2: a 12-binade span, every block exact
_SYNTH_FP8_SCALE_BYTES = (115, 120)


def v4_flash_specs(
    num_layers: int, num_experts: int, *, hash_layers: int = 3, vocab: int | None = None
) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...]]]]:
    """``config.json`` and ``(name, safetensors dtype, shape)`` of every tensor of a DeepSeek-V4-Flash
    release cut to ``num_layers`` layers of ``num_experts`` routed experts (the release's own names;
    the attention compressor and indexer are left out)."""
    d = {**V4_FLASH, "num_hidden_layers": num_layers, "n_routed_experts": num_experts}
    d["num_experts_per_tok"] = min(d["num_experts_per_tok"], num_experts)
    if vocab is not None:
        d["vocab_size"] = vocab
    h, i, v = d["hidden_size"], d["moe_intermediate_size"], d["vocab_size"]
    heads, hd, q, og, ol = (
        d[k] for k in ("num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank")
    )
    hc = d["hc_mult"]
    mix = (2 + hc) * hc
    nh = min(hash_layers, num_layers)
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("embed.weight", "BF16", (v, h)),
        ("head.weight", "BF16", (v, h)),
        ("norm.weight", "BF16", (h,)),
        ("hc_head_fn", "F32", (hc, hc * h)),
        ("hc_head_base", "F32", (hc,)),
        ("hc_head_scale", "F32", (1,)),
    ]

    def fp8(name: str, n: int, k: int) -> None:
        specs.extend(
            [
                (f"{name}.weight", "F8_E4M3", (n, k)),
                (f"{name}.scale", "F8_E8M0", (-(-n // 128), -(-k // 128))),
            ]
        )

    for layer in range(num_layers):
        p = f"layers.{layer}."
        fp8(p + "attn.wq_a", q, h)
        fp8(p + "attn.wq_b", heads * hd, q)
        fp8(p + "attn.wkv", hd, h)
        fp8(p + "attn.wo_a", og * ol, heads * hd // og)
        fp8(p + "attn.wo_b", h, og * ol)
        specs += [
            (p + "attn.q_norm.weight", "BF16", (q,)),
            (p + "attn.kv_norm.weight", "BF16", (hd,)),
            (p + "attn.attn_sink", "F32", (heads,)),
            (p + "attn_norm.weight", "BF16", (h,)),
            (p + "ffn_norm.weight", "BF16", (h,)),
            (p + "ffn.gate.weight", "BF16", (num_experts, h)),
        ]
        for part, shape in (("fn", (mix, hc * h)), ("base", (mix,)), ("scale", (3,))):
            specs += [(f"{p}hc_attn_{part}", "F32", shape), (f"{p}hc_ffn_{part}", "F32", shape)]
        if layer < nh:
            specs.append((p + "ffn.gate.tid2eid", "I64", (v, d["num_experts_per_tok"])))
        else:
            specs.append((p + "ffn.gate.bias", "F32", (num_experts,)))
        for proj, (n, k) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            fp8(f"{p}ffn.shared_experts.{proj}", n, k)
            for e in range(num_experts):
                specs += [
                    (f"{p}ffn.experts.{e}.{proj}.weight", "I8", (n, k // 2)),
                    (f"{p}ffn.experts.{e}.{proj}.scale", "F8_E8M0", (n, k // FP4_GROUP)),
                ]
    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        **d,
        "num_key_value_heads": 1,
        "n_shared_experts": 1,
        "num_hash_layers": nh,
        "num_nextn_predict_layers": 0,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "swiglu_limit": 10.0,
        "expert_dtype": "fp4",
        "quantization_config": dict(V4_QUANTIZATION_CONFIG),
        "torch_dtype": "bfloat16",
    }
    return config, specs


def synthetic_tensor(
    name: str, dtype: str, shape: tuple[int, ...], seed: int, *, vocab: int, experts: int
) -> torch.Tensor:
    """Seeded values for one tensor of :func:`v4_flash_specs`: random FP4 bytes with E8M0 scales spanning
    12 binades (so every block casts exactly), block FP8 with power-of-two scales, BF16/F32 normals,
    a token-id table of distinct expert ids per token."""
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    if dtype == "I8":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if dtype == "F8_E8M0":
        lo, hi = _SYNTH_SCALE_BYTES if ".experts." in name else _SYNTH_FP8_SCALE_BYTES
        return torch.randint(lo, hi + 1, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)
    if dtype == "F8_E4M3":
        return (torch.randn(shape, generator=gen) * 64).to(torch.float8_e4m3fn)
    if dtype == "I64":
        return torch.rand(shape[0], experts, generator=gen).argsort(dim=1)[:, : shape[1]].contiguous()
    t = torch.randn(shape, generator=gen) * 0.02
    return t.to(torch.bfloat16 if dtype == "BF16" else torch.float32)


def _name_seed(seed: int, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def write_v4_synthetic(
    out: str | Path,
    *,
    num_layers: int,
    num_experts: int = V4_FLASH["n_routed_experts"],
    vocab: int | None = None,
    seed: int = 0,
    max_shard_bytes: int = 5 * 10**9,
    workers: int = 8,
) -> int:
    """Write a DeepSeek-V4-Flash-shaped release checkpoint (:func:`v4_flash_specs`, values from
    :func:`synthetic_tensor`) into ``out``, shard by shard, tensors generated on ``workers`` threads and
    streamed into each file (memory holds a few tensors, never a shard). Returns the bytes of tensor data."""
    from concurrent.futures import ThreadPoolExecutor

    from moetool.io.safetensors_format import ITEMSIZE
    from moetool.io.writer import ShardWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    config, specs = v4_flash_specs(num_layers, num_experts, vocab=vocab)
    vocab_size = config["vocab_size"]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * ITEMSIZE[spec[1]]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = 0
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for file, shard in zip(names, shards):
            writer = ShardWriter(out / file, shard, {"format": "pt"})

            def fill(spec: tuple[str, str, tuple[int, ...]], writer: ShardWriter = writer) -> None:
                name, dtype, shape = spec
                writer.write(
                    name, synthetic_tensor(name, dtype, shape, seed, vocab=vocab_size, experts=num_experts)
                )

            for fut in [pool.submit(fill, spec) for spec in shard]:
                fut.result()
            writer.finish()
            for name, dtype, shape in shard:
                weight_map[name] = file
                total += math.prod(shape) * ITEMSIZE[dtype]
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return total


def v4_synthetic_layers(size_bytes: int, num_experts: int = V4_FLASH["n_routed_experts"]) -> int:
    """The fewest layers whose :func:`v4_flash_specs` checkpoint holds at least ``size_bytes``."""
    from moetool.io.safetensors_format import ITEMSIZE

    def size(layers: int) -> int:
        _, specs = v4_flash_specs(layers, num_experts)
        return sum(math.prod(s) * ITEMSIZE[d] for _, d, s in specs)

    layers = 1
    while size(layers) < size_bytes and layers < V4_FLASH["num_hidden_layers"]:
        layers += 1
    return layers

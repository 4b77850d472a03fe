"""Properties over generated input (hypothesis, derandomized so every run draws the same examples):

- the safetensors header parser, over random and mutated bytes and random header JSON, raises nothing
  but ``InputError``, and whatever it accepts describes byte ranges that lie inside the file, match
  their shapes and never overlap;
- opening a checkpoint (config.json, index) over random JSON raises nothing but ``InputError``, and
  resolving a config against the weights (``analyze``) nothing but a ``MoetoolError``;
- the SSM state-file reader, over random and mutated files and random metadata, raises nothing but a
  ``MoetoolError``;
- the block-FP8 recipe (``block_quant_ref``) over random shapes, dtypes and adversarial values: never
  crashes on finite input, names the block of a non-finite one, keeps every element within half an e4m3
  spacing of the weight (bound below), floors scales at 1e-4/448, saturates each block's largest weight
  to exactly ±448, and with UE8M0 gives power-of-two scales no smaller than the float scale.

The dequantization bound asserted, per element, in float64 with ``x = w / s`` (s the block's stored
scale) and ``h(x)`` half the e4m3 spacing at ``|x|``::

    |q·s − w| ≤ s · h(x) + s · |x| · 2^-20,   h(x) = 2^(⌊log2|x|⌋ − 4) for |x| ≥ 2^-6, else 2^-10

e4m3 carries 3 mantissa bits, so a normal value is rounded to within 2^-4 of its binade's base (at most
``|x|·2^-4``: a relative 6.25 %) and a subnormal (spacing 2^-9) to within 2^-10; the second term covers
the float32 rounding of ``1/s`` and of ``w·(1/s)`` (each 2^-24 relative) that can move ``x`` across a
rounding boundary, and of the product ``q·s``. A flat ``s·2^-4`` bound would be wrong for ``|x| ≥ 2``:
between 256 and 448 the e4m3 spacing is 32, so the absolute error reaches ``16·s`` there while staying
within the relative bound.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from moetool.errors import InputError, MoetoolError
from moetool.io import DTYPES, INDEX_NAME, Checkpoint, build_header, read_header
from moetool.io.safetensors_format import ITEMSIZE
from moetool.kernels.fp8_quant_ref import AMAX_FLOOR, FP8_MAX, block_quant_ref
from moetool.model import analyze
from moetool.ssm import StateMeta, read_state_file, read_state_header, write_state_file
from moetool.testing.factory import make_checkpoint

COMMON = {
    "derandomize": True,
    "report_multiple_bugs": False,  # one shrunk failure per property is enough to act on, and quicker
    "database": None,
    "deadline": 5000,  # ms; every example takes milliseconds, a hang is what this bounds
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
FLOOR_SCALE = (torch.tensor(AMAX_FLOOR, dtype=torch.float32) / FP8_MAX).item()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module: hypothesis reuses it across examples, each example overwrites its files."""
    return tmp_path_factory.mktemp("props")


# -- the safetensors header parser ------------------------------------------------------------------
def check_accepted(path: Path) -> None:
    """Parse ``path``; an ``InputError`` is fine, anything accepted must describe a sound file."""
    try:
        header = read_header(path)
    except InputError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    size = path.stat().st_size
    spans = []
    for name, t in header.tensors.items():
        assert t.dtype in DTYPES and all(d >= 0 for d in t.shape), name
        assert t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype], name
        assert header.data_start <= t.offset and t.offset + t.nbytes <= size, name
        spans.append((t.offset, t.offset + t.nbytes))
    spans.sort()
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert begin >= end, "accepted overlapping tensors"


@settings(max_examples=150, **COMMON)
@given(data=st.binary(max_size=300))
def test_header_parser_on_random_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "random.safetensors"
    path.write_bytes(data)
    check_accepted(path)


entries = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=10).filter(lambda s: s != "__metadata__"),
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(min_value=0, max_value=5), max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda e: e[0],
)
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
        st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
        st.tuples(st.just("length"), st.integers(min_value=0, max_value=2**64 - 1), st.just(0)),
        st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    ),
    min_size=1,
    max_size=4,
)


def _mutated(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    """``data`` after each ``(op, where, value)``: flip a byte, truncate, rewrite the 8-byte header
    length, insert a byte (positions taken modulo the current length)."""
    raw = bytearray(data)
    for op, where, value in mutations:
        if op == "flip" and raw:
            raw[where % len(raw)] ^= value
        elif op == "truncate":
            del raw[where % (len(raw) + 1) :]
        elif op == "length":
            raw[:8] = struct.pack("<Q", value)
        elif op == "insert":
            raw.insert(where % (len(raw) + 1), value)
    return bytes(raw)


@settings(max_examples=150, **COMMON)
@given(entries=entries, mutations=mutations)
def test_header_parser_on_mutated_valid_files(
    scratch: Path, entries: list[tuple[str, str, tuple[int, ...]]], mutations: list[tuple[str, int, int]]
) -> None:
    prefix, spans = build_header(entries, {"format": "pt"})
    raw = _mutated(prefix + bytes(sum(n for _, n in spans.values())), mutations)
    path = scratch / "mutated.safetensors"
    path.write_bytes(raw)
    check_accepted(path)


shape_items = st.one_of(
    st.integers(min_value=-3, max_value=2**66), st.booleans(), st.floats(allow_nan=False), st.text(max_size=2)
)
offset_items = st.one_of(st.integers(min_value=-5, max_value=2**66), st.booleans(), st.none())
header_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*DTYPES, "C64", "F8_E8M0", "bf16", ""]), json_scalars),
        "shape": st.one_of(st.lists(shape_items, max_size=9), json_values),
        "data_offsets": st.one_of(st.lists(offset_items, min_size=0, max_size=3), json_values),
    }
)


@settings(max_examples=150, **COMMON)
@given(
    header=st.dictionaries(
        st.text(max_size=6), st.one_of(header_entries, json_values), min_size=0, max_size=4
    ),
    metadata=st.one_of(st.none(), json_values, st.dictionaries(st.text(max_size=4), st.text(max_size=4))),
    data_len=st.integers(min_value=0, max_value=200),
)
def test_header_parser_on_random_header_json(
    scratch: Path, header: dict[str, Any], metadata: Any, data_len: int
) -> None:
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path = scratch / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_len))
    check_accepted(path)


# -- config.json and the index -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(scratch: Path) -> Path:
    """A folder with two small shards, for random config.json / index files."""
    root = scratch / "tiny"
    root.mkdir()
    save_file({"a.weight": torch.ones(2, 3)}, root / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(4)}, root / "model-00002-of-00002.safetensors")
    return root


shard_names = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-00003-of-00002.safetensors",
        "../model-00001-of-00002.safetensors",
        "/etc/hostname",
        "",
        ".",
        "sub/../model-00001-of-00002.safetensors",
        "nul\x00byte",
        "x" * 300,
        "config.json",
    ]
)
index_documents = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"weight_map": st.dictionaries(st.sampled_from(["a.weight", "b.weight", "c.weight"]), shard_names)},
        optional={"metadata": json_values},
    ),
    st.fixed_dictionaries({"weight_map": json_values, "metadata": json_values}),
)


@settings(max_examples=200, **COMMON)
@given(
    config=st.one_of(json_values, st.dictionaries(st.text(max_size=6), json_values)),
    index=st.one_of(st.none(), index_documents),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_checkpoint_opening_on_random_config_and_index(
    tiny_root: Path, config: Any, index: Any, raw: bytes | None
) -> None:
    (tiny_root / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    index_path = tiny_root / INDEX_NAME
    if index is None:
        index_path.unlink(missing_ok=True)
    else:
        index_path.write_text(json.dumps(index))
    try:
        with Checkpoint(tiny_root) as ckpt:
            assert set(ckpt.tensors) <= {"a.weight", "b.weight"}
    except InputError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def real_root(scratch: Path) -> tuple[Path, dict[str, Any]]:
    root = make_checkpoint(
        "qwen3_moe", scratch / "real", num_layers=2, hidden_size=256, moe_intermediate_size=128, num_experts=4
    )
    return root, json.loads((root / "config.json").read_text())


config_keys = st.sampled_from(
    [
        "num_hidden_layers",
        "hidden_size",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
        "norm_topk_prob",
        "model_type",
        "quantization_config",
        "moetool_fused_shared_experts",
        "intermediate_size",
    ]
)
config_values = st.one_of(
    json_values,
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([0, 1, 2, 3, 4, 64, 128, 256, 10**6, -1, 2**63, 1.5, "4", None, True, [1], {}]),
)


@settings(max_examples=150, **COMMON)
@given(changes=st.dictionaries(config_keys, config_values, min_size=1, max_size=3))
def test_analyze_on_random_config_values(
    real_root: tuple[Path, dict[str, Any]], changes: dict[str, Any]
) -> None:
    """Whatever values config.json holds, resolving it against the weights ends in a result or in a
    ``MoetoolError`` naming config.json or a tensor, never in another exception."""
    root, base_config = real_root
    assume(not any(k == "num_hidden_layers" and isinstance(v, int) and v > 10**5 for k, v in changes.items()))
    (root / "config.json").write_text(json.dumps({**base_config, **changes}))
    try:
        with Checkpoint(root) as ckpt:
            analyze(ckpt)
    except MoetoolError as e:
        assert "\n" not in str(e)
    finally:
        (root / "config.json").write_text(json.dumps(base_config))


# -- SSM state files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_bytes(scratch: Path) -> bytes:
    meta = StateMeta(
        layout="k-first",
        num_value_heads=4,
        head_k_dim=8,
        head_v_dim=6,
        num_key_heads=2,
        model_type="qwen3_next",
    )
    g = torch.Generator().manual_seed(3)
    path = scratch / "state-valid.safetensors"
    write_state_file(
        path,
        {
            "model.layers.0.linear_attn.recurrent_state": torch.randn(2, 4, 8, 6, generator=g),
            "model.layers.0.linear_attn.conv_state": torch.randn(2, 2 * 2 * 8 + 4 * 6, 3, generator=g),
        },
        meta,
    )
    return path.read_bytes()


def check_state_file(path: Path) -> None:
    for read in (read_state_file, read_state_header):
        try:
            read(path)
        except MoetoolError as e:
            assert "\n" not in str(e)


@settings(max_examples=120, **COMMON)
@given(mutations=mutations)
def test_state_reader_on_mutated_files(
    scratch: Path, state_bytes: bytes, mutations: list[tuple[str, int, int]]
) -> None:
    raw = _mutated(state_bytes, mutations)
    path = scratch / "state-mutated.safetensors"
    path.write_bytes(raw)
    check_state_file(path)


metadata_values = st.one_of(
    st.text(max_size=6),
    st.sampled_from(
        ["k-first", "k-last", "true", "false", "0", "-1", "3", "8", "1" * 5000, "moetool-ssm-state"]
    ),
)


@settings(max_examples=120, **COMMON)
@given(
    metadata=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "version",
                "state_layout",
                "conv_layout",
                "pooled",
                "num_key_heads",
                "num_value_heads",
                "head_k_dim",
                "head_v_dim",
                "model_type",
            ]
        ),
        metadata_values,
    ),
    shape=st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=5),
    name=st.sampled_from(
        [
            "model.layers.0.linear_attn.recurrent_state",
            "model.layers.0.linear_attn.slot_ids",
            "model.layers.7.linear_attn.conv_state",
            "model.layers.0.mlp.gate.weight",
        ]
    ),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int32, torch.float16, torch.uint8]),
)
def test_state_reader_on_random_metadata_and_shapes(
    scratch: Path, metadata: dict[str, str], shape: list[int], name: str, dtype: torch.dtype
) -> None:
    path = scratch / "state-random.safetensors"
    save_file({name: torch.zeros(shape, dtype=dtype)}, path, metadata=metadata)
    check_state_file(path)


# -- the block FP8 recipe ---------------------------------------------------------------------------
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PATTERNS = ("normal", "k448", "tiny", "zero", "dtype_max", "subnormal", "one_spike")


def half_spacing_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at ``|x|`` (float64): 2^(⌊log2|x|⌋ − 4) in the normal range, 2^-10 below 2^-6."""
    ax = x.abs()
    exp = torch.floor(torch.log2(ax.clamp_min(2.0**-6)))
    return torch.where(ax >= 2.0**-6, torch.exp2(exp - 4), torch.full_like(ax, 2.0**-10))


def build_weight(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, patterns: list[tuple[str, int, float]]
) -> torch.Tensor:
    """Normal values of a random magnitude, with 128x128 blocks overwritten by adversarial patterns."""
    g = torch.Generator().manual_seed(seed)
    fmax = torch.finfo(dtype).max
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = w.view(-1, *shape[-2:])
    n, k = shape[-2:]
    nb, kb = -(-n // 128), -(-k // 128)
    for kind, where, level in patterns:
        e, rest = divmod(where, nb * kb)
        rb, cb = divmod(rest, kb)
        blk = flat[e % flat.shape[0], rb * 128 : (rb + 1) * 128, cb * 128 : (cb + 1) * 128]
        signs = torch.where(torch.rand(blk.shape, generator=g) < 0.5, -1.0, 1.0).double()
        if kind == "normal":
            blk.mul_(10.0 ** (level * 4))  # 1e-4 .. 1e4 spread
        elif kind == "k448":
            k448 = 448.0 * 2.0 ** round(level * 20 - 10)
            blk.copy_(signs * k448 * torch.rand(blk.shape, generator=g).double().round())
        elif kind == "tiny":
            blk.mul_(10.0 ** (-8 - level * 30))
        elif kind == "zero":
            blk.zero_()
        elif kind == "dtype_max":
            blk.copy_(signs * fmax * (1 - 0.5 * torch.rand(blk.shape, generator=g).double()))
        elif kind == "subnormal":
            blk.copy_(
                signs * torch.finfo(dtype).smallest_normal * torch.rand(blk.shape, generator=g).double()
            )
        elif kind == "one_spike":
            blk.mul_(1e-3)
            if blk.numel():
                blk[0, 0] = fmax * level if level > 0 else 1.0
    return w.clamp(-fmax, fmax).to(dtype)


shapes = st.tuples(
    st.sampled_from([None, 1, 2, 3]),
    st.integers(min_value=1, max_value=300),
    st.integers(min_value=1, max_value=300),
)
pattern_lists = st.lists(
    st.tuples(
        st.sampled_from(PATTERNS), st.integers(min_value=0, max_value=30), st.floats(min_value=0, max_value=1)
    ),
    max_size=4,
)


@settings(max_examples=80, **COMMON)
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    patterns=pattern_lists,
)
def test_block_quant_ref_bounds(
    shape: tuple[int | None, int, int], dtype: torch.dtype, seed: int, patterns: list[tuple[str, int, float]]
) -> None:
    e, n, k = shape
    full = (n, k) if e is None else (e, n, k)
    w = build_weight(full, dtype, seed, patterns)
    assert bool(torch.isfinite(w).all())
    q, s = block_quant_ref(w, name="w")
    qu, su = block_quant_ref(w, ue8m0=True, name="w")
    nb, kb = -(-n // 128), -(-k // 128)
    assert q.dtype == qu.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == su.dtype == torch.float32 and s.shape == su.shape == (*full[:-2], nb, kb)
    assert bool(torch.isfinite(s).all()) and bool((s >= FLOOR_SCALE).all()), "scale below the 1e-4/448 floor"

    mantissa = su.view(torch.int32) & 0x7FFFFF
    assert bool((su > 0).all()) and bool((mantissa == 0).all()), "a UE8M0 scale is not a power of two"
    assert bool((su >= s).all()), "a UE8M0 scale is below the float scale"
    assert bool((su < 2 * s).all()), "a UE8M0 scale is not the next power of two up"

    wd = w.double()
    for qq, ss in ((q, s), (qu, su)):
        sd = ss.double().repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]
        x = wd / sd
        qd = qq.double()
        assert bool((qd.abs() <= FP8_MAX).all())
        err = (qd * sd - wd).abs()
        bound = sd * half_spacing_e4m3(x) + sd * x.abs() * 2.0**-20
        worst = (err - bound).max().item()
        assert worst <= 0.0, f"dequantization error exceeds the e4m3 bound by {worst}"

    # float scales: each block whose amax reaches the floor saturates its largest weight to exactly 448
    wb = torch.nn.functional.pad(wd.abs(), (0, kb * 128 - k, 0, nb * 128 - n))
    qb = torch.nn.functional.pad(q.double().abs(), (0, kb * 128 - k, 0, nb * 128 - n))
    amax = wb.unflatten(-1, (kb, 128)).unflatten(-3, (nb, 128)).amax(dim=(-3, -1))
    qmax = qb.unflatten(-1, (kb, 128)).unflatten(-3, (nb, 128)).amax(dim=(-3, -1))
    reached = amax >= AMAX_FLOOR
    assert bool((qmax[reached] == FP8_MAX).all()), "a block's largest weight does not map to 448"
    assert bool((qmax[amax == 0] == 0).all()), "a zero block produced non-zero FP8"


@settings(max_examples=40, **COMMON)
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    at=st.tuples(st.integers(min_value=0), st.integers(min_value=0), st.integers(min_value=0)),
    ue8m0=st.booleans(),
)
def test_block_quant_ref_names_the_non_finite_block(
    shape: tuple[int | None, int, int],
    dtype: torch.dtype,
    seed: int,
    bad: float,
    at: tuple[int, int, int],
    ue8m0: bool,
) -> None:
    e, n, k = shape
    full = (n, k) if e is None else (e, n, k)
    w = build_weight(full, dtype, seed, [])
    ei, r, c = at[0] % (e or 1), at[1] % n, at[2] % k
    if e is None:
        w[r, c] = bad
    else:
        w[ei, r, c] = bad
    with pytest.raises(InputError) as err:
        block_quant_ref(w, ue8m0=ue8m0, name="model.layers.0.mlp.experts.w13_weight")
    msg = str(err.value)
    assert "model.layers.0.mlp.experts.w13_weight" in msg and "\n" not in msg
    assert f"row block {r // 128}, column block {c // 128}" in msg, msg
    assert ("NaN" in msg) == math.isnan(bad)
    if e is not None:
        assert f"expert {ei}," in msg, msg

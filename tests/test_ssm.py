"""SSM state files (moetool.ssm) and their pure transforms (moetool.transforms.ssm_layout)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import moetool.ssm as ssm
from moetool.errors import EnvironmentError_, InputError, UsageError
from moetool.gdn import gdn_decode_ref, gdn_gates
from moetool.ssm import (
    StateMeta,
    conv_state_name,
    meta_from_config,
    read_state_file,
    read_state_header,
    recurrent_state_name,
    slot_ids_name,
    write_state_file,
)
from moetool.transforms.ssm_layout import (
    convert_dtype,
    convert_layout,
    convert_state,
    from_pool,
    to_pool,
    trim_conv_state,
)

H, HV, K, V, W = 2, 4, 12, 20, 4  # K != V so layout labels are checkable from shapes
LAYERS = (0, 2, 5)  # linear-attention layers are not every layer in Qwen3-Next
CONV_DIM = 2 * H * K + HV * V


def _meta(layout="k-first", **kw) -> StateMeta:
    return StateMeta(
        layout=layout,
        num_key_heads=H,
        num_value_heads=HV,
        head_k_dim=K,
        head_v_dim=V,
        model_type="qwen3_next",
        **kw,
    )


def _state(n=3, seed=0, dtype=torch.float32, layout="k-first", conv=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in LAYERS:
        s = torch.randn(n, HV, K, V, generator=gen).to(dtype)
        tensors[recurrent_state_name(layer)] = s if layout == "k-first" else s.transpose(-1, -2).contiguous()
        if conv:
            tensors[conv_state_name(layer)] = torch.randn(n, CONV_DIM, W, generator=gen).to(torch.bfloat16)
    return tensors, _meta(layout)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_write_read_round_trip(tmp_path):
    tensors, meta = _state()
    path = tmp_path / "state.safetensors"
    write_state_file(path, tensors, meta)
    got, got_meta = read_state_file(path)
    _assert_same(got, tensors)
    assert got_meta == meta
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary left behind


def test_header_metadata_golden(tmp_path):
    tensors, meta = _state(n=2)
    path = tmp_path / "s.safetensors"
    write_state_file(path, tensors, meta)
    header = read_state_header(path)
    assert header["__metadata__"] == {
        "format": "moetool-ssm-state",
        "version": "1",
        "state_layout": "k-first",
        "conv_layout": "dim-first",
        "pooled": "false",
        "num_key_heads": str(H),
        "num_value_heads": str(HV),
        "head_k_dim": str(K),
        "head_v_dim": str(V),
        "model_type": "qwen3_next",
    }
    entry = header[recurrent_state_name(2)]
    assert entry["dtype"] == "F32" and entry["shape"] == [2, HV, K, V]
    assert header[conv_state_name(5)]["dtype"] == "BF16"


def test_k_first_k_last_round_trip_is_exact():
    tensors, meta = _state(seed=1)
    last, meta_last = convert_layout(tensors, meta, "k-last")
    assert meta_last.layout == "k-last"
    name = recurrent_state_name(0)
    assert last[name].shape == (3, HV, V, K) and last[name].is_contiguous()
    assert torch.equal(last[name], tensors[name].transpose(-1, -2))
    assert last[conv_state_name(0)] is tensors[conv_state_name(0)]
    back, meta_back = convert_layout(last, meta_last, "k-first")
    _assert_same(back, tensors)
    assert meta_back == meta
    same, same_meta = convert_layout(tensors, meta, "k-first")
    _assert_same(same, tensors)
    assert same_meta == meta


def test_converted_state_decodes_identically():
    """The converted file is the same state: one decode step from each layout gives the same result."""
    tensors, meta = _state(n=2, seed=2, conv=False)
    last, _ = convert_layout(tensors, meta, "k-last")
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, H, K, generator=gen), torch.randn(2, 1, H, K, generator=gen)
    v = torch.randn(2, 1, HV, V, generator=gen)
    g, beta = gdn_gates(
        torch.randn(2, 1, HV, generator=gen),
        torch.randn(2, 1, HV, generator=gen),
        torch.zeros(HV),
        torch.zeros(HV),
    )
    name = recurrent_state_name(5)
    o1, s1 = gdn_decode_ref(q, k, v, g, beta, tensors[name], layout="k-first")
    o2, s2 = gdn_decode_ref(q, k, v, g, beta, last[name], layout="k-last")
    assert torch.equal(o1, o2) and torch.equal(s1, s2.transpose(-1, -2))


def test_pool_packing_and_unpacking(tmp_path):
    tensors, meta = _state(n=3, seed=4, layout="k-last")
    pooled, pmeta = to_pool(tensors, meta)
    assert pmeta.pooled
    for layer in LAYERS:
        pool = pooled[recurrent_state_name(layer)]
        assert pool.shape == (4, HV, V, K)
        assert not bool(pool[0].any())
        ids = pooled[slot_ids_name(layer)]
        assert ids.dtype == torch.int32 and ids.tolist() == [1, 2, 3]
        assert torch.equal(pool[ids.long()], tensors[recurrent_state_name(layer)])
        conv = pooled[conv_state_name(layer)]
        assert conv.shape == (4, CONV_DIM, W) and not bool(conv[0].any())
    path = tmp_path / "pool.safetensors"
    write_state_file(path, pooled, pmeta)
    assert read_state_header(path)["__metadata__"]["pooled"] == "true"
    got, got_meta = read_state_file(path)
    assert got_meta.pooled
    dense, dmeta = from_pool(got, got_meta)
    _assert_same(dense, tensors)
    assert dmeta == meta


def test_from_pool_follows_slot_order_and_null_ids():
    tensors, meta = _state(n=3, seed=5, layout="k-last", conv=False)
    pooled, pmeta = to_pool(tensors, meta)
    for layer in LAYERS:
        pooled[slot_ids_name(layer)] = torch.tensor([3, -1, 1], dtype=torch.int32)
    dense, _ = from_pool(pooled, pmeta)
    name = recurrent_state_name(2)
    assert torch.equal(dense[name][0], tensors[name][2])
    assert not bool(dense[name][1].any())
    assert torch.equal(dense[name][2], tensors[name][0])


def test_pool_requires_k_last():
    tensors, meta = _state(n=2)
    with pytest.raises(UsageError, match="k-last"):
        to_pool(tensors, meta)
    with pytest.raises(InputError, match="k-last"):
        _meta("k-first", pooled=True)


def test_dtype_conversion():
    tensors, meta = _state(n=2, seed=6)
    kept, _ = convert_dtype(tensors, meta, "keep")
    _assert_same(kept, tensors)
    bf, _ = convert_dtype(tensors, meta, "bfloat16")
    name = recurrent_state_name(0)
    assert bf[name].dtype == torch.bfloat16
    assert torch.equal(bf[name], tensors[name].to(torch.bfloat16))  # round to nearest even, as torch
    assert bf[conv_state_name(0)] is tensors[conv_state_name(0)]  # conv state keeps its dtype
    back, _ = convert_dtype(bf, meta, "float32")
    assert back[name].dtype == torch.float32
    assert torch.equal(back[name], bf[name].float())  # bf16 -> f32 is exact
    assert not torch.equal(back[name], tensors[name])  # and f32 -> bf16 did round
    with pytest.raises(UsageError):
        convert_dtype(tensors, meta, "float16")  # type: ignore[arg-type]


def test_trim_conv_state_keeps_last_columns():
    tensors, meta = _state(n=2, seed=7)
    trimmed, _ = trim_conv_state(tensors, meta, kernel_size=W)
    name = conv_state_name(2)
    assert trimmed[name].shape == (2, CONV_DIM, W - 1)
    assert torch.equal(trimmed[name], tensors[name][..., 1:])
    again, _ = trim_conv_state(trimmed, meta, kernel_size=W)
    assert torch.equal(again[name], trimmed[name])
    with pytest.raises(InputError, match="columns"):
        trim_conv_state(trimmed, meta, kernel_size=W + 2)


def test_convert_state_chain(tmp_path):
    tensors, meta = _state(n=3, seed=8)
    src = tmp_path / "in.safetensors"
    write_state_file(src, tensors, meta)
    got, got_meta = read_state_file(src)
    out, out_meta = convert_state(got, got_meta, dtype="bfloat16", pool=True, conv_kernel_size=W)
    assert out_meta.layout == "k-last" and out_meta.pooled
    name = recurrent_state_name(5)
    expected = tensors[name].transpose(-1, -2).to(torch.bfloat16)
    assert torch.equal(out[name][1:], expected)
    dst = tmp_path / "out.safetensors"
    write_state_file(dst, out, out_meta)
    back, back_meta = read_state_file(dst)
    unpooled, _ = convert_state(back, back_meta, layout="k-first")
    assert torch.equal(unpooled[name], tensors[name].to(torch.bfloat16))
    with pytest.raises(UsageError, match="pool"):
        convert_state(got, got_meta, layout="k-first", pool=True)


def test_file_without_metadata_needs_assume_layout(tmp_path):
    tensors, _ = _state(n=2, seed=9, layout="k-last", conv=False)
    path = tmp_path / "bare.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UsageError, match="assume-layout"):
        read_state_file(path)
    got, meta = read_state_file(path, assume_layout="k-last")
    _assert_same(got, tensors)
    assert meta.layout == "k-last" and (meta.head_k_dim, meta.head_v_dim) == (K, V)
    assert meta.num_key_heads is None
    # Without a label the assumption is all there is: read as k-first, K and V simply swap places.
    _, swapped = read_state_file(path, assume_layout="k-first")
    assert (swapped.head_k_dim, swapped.head_v_dim) == (V, K)


def test_shape_contradicting_metadata_is_refused(tmp_path):
    tensors, _ = _state(n=2, seed=10)  # k-first data
    path = tmp_path / "mislabelled.safetensors"
    save_file(tensors, str(path), metadata=_meta("k-last").to_metadata())
    with pytest.raises(InputError, match="k-first state: the layout label is wrong"):
        read_state_file(path)
    with pytest.raises(InputError, match="contradicts the metadata"):
        write_state_file(tmp_path / "x.safetensors", tensors, _meta("k-last"))
    assert not (tmp_path / "x.safetensors").exists()
    wrong_heads = StateMeta(
        layout="k-first", num_key_heads=H, num_value_heads=HV * 2, head_k_dim=K, head_v_dim=V
    )
    with pytest.raises(InputError, match="contradicts"):
        write_state_file(tmp_path / "y.safetensors", tensors, wrong_heads)


def test_assume_layout_cannot_override_the_label(tmp_path):
    tensors, meta = _state(n=1, seed=11)
    path = tmp_path / "s.safetensors"
    write_state_file(path, tensors, meta)
    with pytest.raises(UsageError, match="contradicts --assume-layout"):
        read_state_file(path, assume_layout="k-last")
    _, same = read_state_file(path, assume_layout="k-first")
    assert same == meta


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda t: t.__setitem__(recurrent_state_name(0), t[recurrent_state_name(0)].half()),
            "float32 or bfloat16",
        ),
        (lambda t: t[recurrent_state_name(2)].__setitem__((0, 0, 0, 0), float("nan")), "NaN"),
        (lambda t: t.__setitem__(recurrent_state_name(5), t[recurrent_state_name(5)][:2]), "rows"),
        (lambda t: t.__setitem__(conv_state_name(0), t[conv_state_name(0)][:, 1:]), "conv_state|expected"),
        (lambda t: t.__setitem__("model.layers.0.linear_attn.A_log", torch.zeros(HV)), "not a state tensor"),
        (lambda t: t.__setitem__(conv_state_name(7), torch.zeros(3, CONV_DIM, W)), "no recurrent_state"),
        (lambda t: t.__setitem__(slot_ids_name(0), torch.arange(3, dtype=torch.int32)), "pooled=false"),
    ],
)
def test_inconsistent_tensors_are_refused(tmp_path, mutate, match):
    tensors, meta = _state(n=3, seed=12)
    mutate(tensors)
    with pytest.raises(InputError, match=match):
        write_state_file(tmp_path / "bad.safetensors", tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_pooled_file_checks(tmp_path):
    tensors, meta = _state(n=3, seed=13, layout="k-last")
    pooled, pmeta = to_pool(tensors, meta)
    bad = dict(pooled)
    bad[recurrent_state_name(0)] = pooled[recurrent_state_name(0)].clone()
    bad[recurrent_state_name(0)][0, 0, 0, 0] = 1.0
    with pytest.raises(InputError, match="null slot"):
        write_state_file(tmp_path / "a.safetensors", bad, pmeta)
    bad = dict(pooled)
    bad[slot_ids_name(2)] = torch.tensor([1, 1, 2], dtype=torch.int32)
    with pytest.raises(InputError, match="twice"):
        write_state_file(tmp_path / "b.safetensors", bad, pmeta)
    bad[slot_ids_name(2)] = torch.tensor([1, 2, 4], dtype=torch.int32)
    with pytest.raises(InputError, match="slot ids must lie"):
        write_state_file(tmp_path / "c.safetensors", bad, pmeta)
    bad = {n: t for n, t in pooled.items() if n != slot_ids_name(5)}
    with pytest.raises(InputError, match="missing"):
        write_state_file(tmp_path / "d.safetensors", bad, pmeta)


def test_atomic_write_leaves_nothing_when_the_write_fails(tmp_path, monkeypatch):
    tensors, meta = _state(n=2, seed=14)
    path = tmp_path / "s.safetensors"

    def failing_save(data, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a torn partial write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ssm, "save_file", failing_save)
    with pytest.raises(EnvironmentError_, match="No space left"):
        write_state_file(path, tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_checks_what_it_wrote(tmp_path, monkeypatch):
    tensors, meta = _state(n=2, seed=15)
    path = tmp_path / "s.safetensors"
    real_save = ssm.save_file

    def corrupting_save(data, filename, metadata=None):
        data = dict(data)
        name = recurrent_state_name(0)
        data[name] = data[name].clone()
        data[name][0, 0, 0, 0] += 1.0  # a byte that differs from what was asked
        real_save(data, filename, metadata=metadata)

    monkeypatch.setattr(ssm, "save_file", corrupting_save)
    with pytest.raises(EnvironmentError_, match="read back differs"):
        write_state_file(path, tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_overwrite_and_stays_intact_on_failure(tmp_path, monkeypatch):
    tensors, meta = _state(n=2, seed=16)
    path = tmp_path / "s.safetensors"
    write_state_file(path, tensors, meta)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="exists"):
        write_state_file(path, tensors, meta)
    monkeypatch.setattr(ssm, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(EnvironmentError_):
        write_state_file(path, tensors, meta, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


def test_meta_from_config():
    config = {
        "model_type": "qwen3_next",
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
    }
    meta = meta_from_config(config)
    assert meta == StateMeta(
        layout="k-first",
        num_key_heads=16,
        num_value_heads=32,
        head_k_dim=128,
        head_v_dim=128,
        model_type="qwen3_next",
    )
    assert meta.conv_dim() == 2 * 16 * 128 + 32 * 128
    with pytest.raises(InputError, match="linear_num_key_heads"):
        meta_from_config({"model_type": "mixtral"})

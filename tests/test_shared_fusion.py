"""Shared-expert fusion transforms: exact slices, the slot sum, FP8 byte slicing, errors, order, config."""

from __future__ import annotations

import copy

import pytest
import torch

from moetool.errors import InputError, PlanError, UsageError
from moetool.moe import FUSED_KEY, FusedSlots, expert_mlp
from moetool.transforms.shared_fusion import (
    fused_config,
    replicate,
    split_shared,
    split_shared_fp8,
)

# sum over slots vs the whole shared expert in float32: the down projection is summed in m pieces
# instead of one reduction of length S (a few ulps of the output scale).
SLOT_SUM_TOL = 2e-6

FP8 = torch.float8_e4m3fn


def _shared(s: int, h: int, gen: torch.Generator, dtype=torch.float32):
    gate = torch.randn(s, h, generator=gen).to(dtype)
    up = torch.randn(s, h, generator=gen).to(dtype)
    down = torch.randn(h, s, generator=gen).to(dtype)
    return gate, up, down


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    ("s", "i", "h"),
    [(48, 12, 44), (5632 // 32, 1408 // 32, 67), (24, 24, 9), (30, 10, 1)],
    ids=["qwen1.5-like-4", "qwen1.5-ratio", "deepseek-v3-like-1", "h=1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_slices_are_exact(s: int, i: int, h: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _shared(s, h, gen, dtype)
    slots = split_shared(gate, up, down, i)
    assert len(slots) == s // i
    for j, (g, u, d) in enumerate(slots):
        assert g.shape == (i, h) and u.shape == (i, h) and d.shape == (h, i)
        assert g.dtype == u.dtype == d.dtype == dtype
        assert torch.equal(g, gate[j * i : (j + 1) * i])
        assert torch.equal(u, up[j * i : (j + 1) * i])
        assert torch.equal(d, down[:, j * i : (j + 1) * i])
        assert g.is_contiguous() and u.is_contiguous() and d.is_contiguous()
        for t, src in ((g, gate), (u, up), (d, down)):
            assert not _shares_storage(t, src)
    # Writing into a returned slot must leave the input intact.
    before = gate.clone()
    slots[0][0].fill_(7)
    assert torch.equal(gate, before)


@pytest.mark.parametrize(("s", "i"), [(48, 12), (40, 20), (17, 17)])
def test_slot_outputs_sum_to_the_shared_expert(s: int, i: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h = 37
    gate, up, down = _shared(s, h, gen)
    x = torch.randn(23, h, generator=gen)
    x[3] = 0.0
    x[5] *= 40.0  # large activations, deep into silu's linear and saturated regions
    whole = expert_mlp(x, gate, up, down)
    parts = [expert_mlp(x, g, u, d) for g, u, d in split_shared(gate, up, down, i)]
    assert _rel_err(torch.stack(parts).sum(0), whole) <= SLOT_SUM_TOL
    if len(parts) > 1:
        # Leaving one slot out is visibly wrong: the check has teeth.
        assert _rel_err(torch.stack(parts[:-1]).sum(0), whole) > 1e-2


def _fake_fp8(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes (every finite code, NaN codes excluded) and a random 128×128 scale grid."""
    codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes).to(torch.uint8)
    q = codes.view(FP8)
    grid = (-(-rows // 128), -(-cols // 128))
    s = torch.rand(grid, generator=gen) * 1e-2 + 1e-4
    return q, s


@pytest.mark.parametrize(("s", "i", "h"), [(512, 256, 200), (384, 128, 128), (256, 256, 77)])
def test_fp8_split_keeps_bytes_and_scales(s: int, i: int, h: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate_q, gate_s = _fake_fp8(s, h, gen)
    up_q, up_s = _fake_fp8(s, h, gen)
    down_q, down_s = _fake_fp8(h, s, gen)
    slots = split_shared_fp8(gate_q, gate_s, up_q, up_s, down_q, down_s, i)
    assert len(slots) == s // i
    nb, hb = i // 128, -(-h // 128)
    for j, (gq, gs, uq, us, dq, ds) in enumerate(slots):
        assert gq.dtype == uq.dtype == dq.dtype == FP8
        assert gs.shape == (nb, hb) and us.shape == (nb, hb) and ds.shape == (hb, nb)
        assert torch.equal(gq.view(torch.uint8), gate_q[j * i : (j + 1) * i].view(torch.uint8))
        assert torch.equal(uq.view(torch.uint8), up_q[j * i : (j + 1) * i].view(torch.uint8))
        assert torch.equal(dq.view(torch.uint8), down_q[:, j * i : (j + 1) * i].view(torch.uint8))
        assert torch.equal(gs, gate_s[j * nb : (j + 1) * nb])
        assert torch.equal(us, up_s[j * nb : (j + 1) * nb])
        assert torch.equal(ds, down_s[:, j * nb : (j + 1) * nb])
        for t in (gq, gs, uq, us, dq, ds):
            assert t.is_contiguous()

    # Dequantized slots are the dequantized shared expert's slices (blocks never straddle slots).
    def deq(q: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        full = sc.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
        return q.float() * full

    whole = deq(down_q, down_s)
    for j, slot in enumerate(slots):
        assert torch.equal(deq(slot[4], slot[5]), whole[:, j * i : (j + 1) * i])


def test_fp8_split_is_quantize_of_bf16_split(seed: int) -> None:
    """Slicing quantized bytes equals quantizing the slices (docs/contract.md §6 recipe, 128×128 blocks)."""
    gen = torch.Generator().manual_seed(seed)
    s, i, h = 256, 128, 200

    def quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = w.shape
        pn, pk = -(-n // 128) * 128, -(-k // 128) * 128
        wp = torch.zeros(pn, pk)
        wp[:n, :k] = w.float()
        blocks = wp.view(pn // 128, 128, pk // 128, 128)
        amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
        sc = amax / 448.0
        q = (blocks * (1.0 / sc)[:, None, :, None]).clamp(-448, 448).to(FP8).view(pn, pk)[:n, :k]
        return q.contiguous(), sc

    gate, up, down = _shared(s, h, gen, torch.bfloat16)
    fp8_slots = split_shared_fp8(*quant(gate), *quant(up), *quant(down), i)
    for bf16_slot, fp8_slot in zip(split_shared(gate, up, down, i), fp8_slots):
        for w, (q, sc) in zip(bf16_slot, (fp8_slot[0:2], fp8_slot[2:4], fp8_slot[4:6])):
            q_ref, s_ref = quant(w)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
            assert torch.equal(sc, s_ref)


def test_split_rejects_uneven_sizes(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _shared(50, 8, gen)
    with pytest.raises(PlanError, match=r"50 .*moe_intermediate_size 12"):
        split_shared(gate, up, down, 12)
    with pytest.raises(PlanError):
        split_shared(gate, up, down, 0)
    with pytest.raises(InputError):
        split_shared(gate, up, down.T.contiguous(), 10)


def test_fp8_split_rejects_unaligned_intermediate(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate_q, gate_s = _fake_fp8(384, 64, gen)
    up_q, up_s = _fake_fp8(384, 64, gen)
    down_q, down_s = _fake_fp8(64, 384, gen)
    with pytest.raises(PlanError, match=r"192 .*128.*BF16"):
        split_shared_fp8(gate_q, gate_s, up_q, up_s, down_q, down_s, 192)
    with pytest.raises(PlanError, match=r"384 .*moe_intermediate_size 256"):
        split_shared_fp8(gate_q, gate_s, up_q, up_s, down_q, down_s, 256)
    with pytest.raises(InputError, match=r"down_proj\.weight_scale_inv"):
        split_shared_fp8(gate_q, gate_s, up_q, up_s, down_q, down_s.T.contiguous(), 128)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_replicate_is_replica_major(replicas: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _shared(36, 11, gen)
    slots = split_shared(gate, up, down, 12)
    m = len(slots)
    out = replicate(slots, replicas)
    assert len(out) == m * replicas
    f = FusedSlots(first_slot=10, num_slots=m, replicas=replicas, slot_weight="one")
    for r in range(replicas):
        for j in range(m):
            idx = r * m + j
            assert f.slot_id(r, j) == f.first_slot + idx
            for a, b in zip(out[idx], slots[j]):
                assert torch.equal(a, b)
    ptrs = [t.untyped_storage().data_ptr() for s in out for t in s]
    assert len(set(ptrs)) == len(ptrs)


def test_replicate_fp8_tuples_and_rejects_zero(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, s = _fake_fp8(256, 130, gen)
    dq, ds = _fake_fp8(130, 256, gen)
    slots = split_shared_fp8(q, s, q, s, dq, ds, 128)
    out = replicate(slots, 2)
    assert len(out) == 4 and all(len(t) == 6 for t in out)
    assert torch.equal(out[3][0].view(torch.uint8), slots[1][0].view(torch.uint8))
    with pytest.raises(UsageError, match="replicas"):
        replicate(slots, 0)


def test_fused_config_adds_only_its_key() -> None:
    config = {
        "model_type": "qwen2_moe",
        "num_experts": 60,
        "quantization_config": {"fmt": "e4m3"},
        "mlp_only_layers": [1, 2],
    }
    before = copy.deepcopy(config)
    out = fused_config(config, 60, 4, 2, "sigmoid_gate")
    assert config == before
    assert list(out) == [*config, FUSED_KEY]
    assert {k: v for k, v in out.items() if k != FUSED_KEY} == config
    assert out[FUSED_KEY] == {"first_slot": 60, "num_slots": 4, "replicas": 2, "slot_weight": "sigmoid_gate"}
    assert FusedSlots.from_config(out) == FusedSlots(60, 4, 2, "sigmoid_gate")
    out["mlp_only_layers"].append(3)
    assert config["mlp_only_layers"] == [1, 2]
    with pytest.raises(PlanError, match="already"):
        fused_config(out, 60, 4, 2, "sigmoid_gate")
    with pytest.raises(InputError, match="slot_weight"):
        fused_config(config, 60, 4, 2, "half")

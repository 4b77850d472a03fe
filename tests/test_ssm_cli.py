"""``moetool convert-ssm`` and ``moetool capture-ssm`` end to end (docs/contract.md §8).

convert-ssm: k-first → k-last → k-first is byte-identical (dense and through a pool), the pool layout
(zero null slot 0, ``slot_ids``), ``--dtype``, ``--trim-conv``, files without layout metadata, and
the refusals (OUT == IN, an existing OUT) that must leave the input and the folder untouched. Files are
read back with safetensors directly, not through moetool's reader. K ≠ V here, so a transpose that did
not happen (or happened twice) shows in the shapes as well as the bytes.

capture-ssm: a tiny Qwen3-Next built by transformers' own classes runs on ``--token-ids``; the state
file must hold exactly what transformers' cache holds after the same tokens (the test runs the model
itself), carry the config's head counts and dims, and decode through moetool.gdn's k-first and k-last
references alike.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes as shared_assert_bytes
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.cli.main import main
from moetool.gdn import gdn_decode_gated_ref, relative_error
from moetool.ssm import StateMeta, conv_state_name, recurrent_state_name, slot_ids_name, write_state_file

H, HV, K, V = 2, 4, 16, 24
LAYERS = (0, 1, 3)
N = 3
W = 4  # conv_state columns as transformers keeps them (linear_conv_kernel_dim)
CONV_DIM = 2 * H * K + HV * V
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def moetool(*args: object) -> Outcome:
    """The real entry point (its error funnel and exit codes), stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return Outcome(code, out.getvalue(), err.getvalue())


def ok(*args: object) -> Outcome:
    res = moetool(*args)
    assert res.code == 0, f"exit {res.code}\n{res.out}\n{res.err}"
    return res


def fails(*args: object) -> str:
    """Exit 2 with one line on stderr and no traceback; returns the line."""
    res = moetool(*args)
    assert res.code == 2, f"exit {res.code}, expected 2\n{res.out}\n{res.err}"
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    return lines[0]


def meta(layout: str = "k-first", **kw: object) -> StateMeta:
    return StateMeta(
        layout=layout,  # type: ignore[arg-type]
        num_key_heads=H,
        num_value_heads=HV,
        head_k_dim=K,
        head_v_dim=V,
        model_type="qwen3_next",
        **kw,  # type: ignore[arg-type]
    )


def k_first(dtype: torch.dtype, seed: int, conv_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per layer: recurrent_state ``[N, HV, K, V]`` with a few adversarial values (±0, a subnormal, the
    dtype's largest finite) and conv_state ``[N, conv_dim, W]``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        s = torch.randn(N, HV, K, V, generator=gen)
        s[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-40])
        s[1, 2, 5, 7] = torch.finfo(dtype).max
        out[recurrent_state_name(layer)] = s.to(dtype)
        out[conv_state_name(layer)] = torch.randn(N, CONV_DIM, W, generator=gen).to(conv_dtype or dtype)
    return out


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata, through safetensors itself."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def assert_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.is_contiguous(), f"{what}: not contiguous"
    shared_assert_bytes(got, want, what)


def assert_same_file_content(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        assert_bytes(a[name], b[name], name)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- convert-ssm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("via", ["dense", "pool"])
def test_round_trip_is_byte_identical(tmp_path: Path, dtype: str, via: str) -> None:
    src, mid, back = (
        tmp_path / "kfirst.safetensors",
        tmp_path / "klast.safetensors",
        tmp_path / "back.safetensors",
    )
    tensors = k_first(DTYPES[dtype], seed=1, conv_dtype=torch.bfloat16)
    write_state_file(src, tensors, meta("k-first"))
    src_bytes = src.read_bytes()
    ok("convert-ssm", src, mid, "--to", "k-last", *(["--pool"] if via == "pool" else []))
    mid_t, mid_md = read(mid)
    assert mid_md["state_layout"] == "k-last"
    assert mid_md["pooled"] == ("true" if via == "pool" else "false")
    for layer in LAYERS:
        state = mid_t[recurrent_state_name(layer)]
        want = tensors[recurrent_state_name(layer)].transpose(-1, -2).contiguous()  # [N, HV, V, K]
        assert_bytes(state[1:] if via == "pool" else state, want, recurrent_state_name(layer))

    ok("convert-ssm", mid, back, "--to", "k-first")
    back_t, back_md = read(back)
    orig_t, orig_md = read(src)
    assert_same_file_content(back_t, orig_t)
    assert back_md == orig_md
    assert src.read_bytes() == src_bytes  # the input is never modified


def test_pool_layout(tmp_path: Path) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "pool.safetensors"
    tensors = k_first(torch.float32, seed=2)
    write_state_file(src, tensors, meta("k-first"))
    ok("convert-ssm", src, out, "--to", "k-last", "--pool")
    got, md = read(out)
    assert md["state_layout"] == "k-last" and md["pooled"] == "true"
    for key in ("num_key_heads", "num_value_heads", "head_k_dim", "head_v_dim"):
        assert md[key] == str(
            {"num_key_heads": H, "num_value_heads": HV, "head_k_dim": K, "head_v_dim": V}[key]
        )
    for layer in LAYERS:
        pool = got[recurrent_state_name(layer)]
        ids = got[slot_ids_name(layer)]
        conv = got[conv_state_name(layer)]
        assert pool.shape == (N + 1, HV, V, K) and pool.dtype == torch.float32
        assert ids.dtype == torch.int32 and ids.shape == (N,)
        assert conv.shape == (N + 1, CONV_DIM, W)
        assert not pool[0].any() and not conv[0].any(), "slot 0 is the zero null slot"
        assert sorted(ids.tolist()) == list(range(1, N + 1)), ids
        for n in range(N):
            slot = int(ids[n])
            assert torch.equal(pool[slot], tensors[recurrent_state_name(layer)][n].transpose(-1, -2))
            assert torch.equal(conv[slot], tensors[conv_state_name(layer)][n])


def test_pool_needs_k_last(tmp_path: Path) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    write_state_file(src, k_first(torch.float32, seed=3), meta("k-first"))
    assert "--pool" in fails("convert-ssm", src, out, "--to", "k-first", "--pool")
    assert not out.exists()


def test_dtype(tmp_path: Path) -> None:
    src = tmp_path / "s.safetensors"
    tensors = k_first(torch.float32, seed=4)
    for layer in LAYERS:
        tensors[recurrent_state_name(layer)][1, 2, 5, 7] = 3.0e38  # finite in bfloat16 too
    name = recurrent_state_name(LAYERS[0])
    # a tie between two bfloat16 neighbours and values either side of it: round to nearest even
    tensors[name][2, 1, 3, :4] = torch.tensor(
        [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, -3.0]
    )
    write_state_file(src, tensors, meta("k-first"))

    keep = tmp_path / "keep.safetensors"
    ok("convert-ssm", src, keep)  # defaults: --to k-last, --dtype keep
    kept, _ = read(keep)
    assert kept[name].dtype == torch.float32, "float32 must never be narrowed unasked"

    bf = tmp_path / "bf16.safetensors"
    ok("convert-ssm", src, bf, "--dtype", "bfloat16")
    got, md = read(bf)
    assert md["state_layout"] == "k-last"
    for layer in LAYERS:
        want = tensors[recurrent_state_name(layer)].transpose(-1, -2).contiguous().to(torch.bfloat16)
        assert_bytes(got[recurrent_state_name(layer)], want, recurrent_state_name(layer))
        assert_bytes(
            got[conv_state_name(layer)], tensors[conv_state_name(layer)], "conv_state keeps its dtype"
        )
    assert got[name][2, 1, :4, 3].tolist() == [1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -3.0]

    wide = tmp_path / "fp32.safetensors"
    ok("convert-ssm", bf, wide, "--to", "k-first", "--dtype", "float32")
    back, _ = read(wide)
    for layer in LAYERS:
        want = got[recurrent_state_name(layer)].transpose(-1, -2).contiguous().float()
        assert_bytes(back[recurrent_state_name(layer)], want, "bfloat16 -> float32 is exact")


def test_bfloat16_overflow_is_refused(tmp_path: Path) -> None:
    """float32's largest value has no finite bfloat16: the conversion names the tensor, writes nothing."""
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    write_state_file(src, k_first(torch.float32, seed=11), meta("k-first"))
    before = folder_state(tmp_path)
    assert recurrent_state_name(LAYERS[0]) in fails("convert-ssm", src, out, "--dtype", "bfloat16")
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize(("kernel", "keep"), [(None, 3), (3, 2), (4, 3)])
def test_trim_conv(tmp_path: Path, kernel: int | None, keep: int) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    tensors = k_first(torch.float32, seed=5)
    write_state_file(src, tensors, meta("k-first"))
    ok("convert-ssm", src, out, "--trim-conv", *(["--conv-kernel", kernel] if kernel else []))
    got, _ = read(out)
    for layer in LAYERS:
        want = tensors[conv_state_name(layer)][..., W - keep :].contiguous()  # the newest columns
        assert_bytes(got[conv_state_name(layer)], want, conv_state_name(layer))
        assert_bytes(
            got[recurrent_state_name(layer)],
            tensors[recurrent_state_name(layer)].transpose(-1, -2).contiguous(),
            recurrent_state_name(layer),
        )


def test_trim_conv_refuses_too_few_columns(tmp_path: Path) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    write_state_file(src, k_first(torch.float32, seed=6), meta("k-first"))
    assert conv_state_name(LAYERS[0]) in fails("convert-ssm", src, out, "--trim-conv", "--conv-kernel", W + 2)
    assert not out.exists()


@pytest.mark.parametrize("via", ["dense", "pool"])
def test_conv_layout_dim_last_is_an_exact_transpose_and_round_trips(tmp_path: Path, via: str) -> None:
    """vLLM 0.33 keeps conv state ``(state_len, dim)`` per sequence by default: ``--conv-layout dim-last``
    writes ``[N, W, conv_dim]`` (after --trim-conv: ``W = kernel - 1``), records it, and converts back
    byte for byte."""
    src, last, back = (tmp_path / f"{n}.safetensors" for n in ("s", "last", "back"))
    tensors = k_first(torch.float32, seed=11, conv_dtype=torch.bfloat16)
    write_state_file(src, tensors, meta("k-first"))
    pool = ["--pool"] if via == "pool" else []
    ok("convert-ssm", src, last, "--trim-conv", "--conv-layout", "dim-last", *pool)
    got, md = read(last)
    assert md["conv_layout"] == "dim-last"
    for layer in LAYERS:
        name = conv_state_name(layer)
        want = tensors[name][..., 1:].transpose(-1, -2).contiguous()  # the newest W - 1 columns
        assert want.shape == (N, W - 1, CONV_DIM)
        assert_bytes(got[name][1:] if pool else got[name], want, name)
    ok("convert-ssm", last, back, "--to", "k-first", "--conv-layout", "dim-first")
    got, md = read(back)
    assert md["conv_layout"] == "dim-first"
    for layer in LAYERS:
        name = conv_state_name(layer)
        assert_bytes(got[name], tensors[name][..., 1:].contiguous(), name)
        assert_bytes(got[recurrent_state_name(layer)], tensors[recurrent_state_name(layer)], name)


@pytest.mark.parametrize("label", ["dim-first", "dim-last"])
def test_a_mislabelled_conv_layout_is_refused(tmp_path: Path, label: str) -> None:
    """conv_dim is never W, so a conv_state stored in the other orientation than its label contradicts the
    metadata's conv_dim: refused with one line naming the tensor and the label."""
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    tensors = k_first(torch.float32, seed=12)
    if label == "dim-first":  # the tensors are dim-last, the label says dim-first
        tensors = {n: t.transpose(-1, -2).contiguous() if "conv" in n else t for n, t in tensors.items()}
    save_file(tensors, src, metadata=meta("k-first", conv_layout=label).to_metadata())
    before = folder_state(tmp_path)
    line = fails("convert-ssm", src, out)
    assert conv_state_name(LAYERS[0]) in line and "conv_layout label is wrong" in line, line
    assert folder_state(tmp_path) == before


def test_a_file_of_earlier_versions_without_conv_layout_is_dim_first(tmp_path: Path) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    tensors = k_first(torch.float32, seed=13)
    md = meta("k-first").to_metadata()
    del md["conv_layout"]
    save_file(tensors, src, metadata=md)
    ok("convert-ssm", src, out, "--conv-layout", "dim-last")
    got, _ = read(out)
    name = conv_state_name(LAYERS[0])
    assert_bytes(got[name], tensors[name].transpose(-1, -2).contiguous(), name)


@pytest.mark.parametrize("assume", ["k-first", "k-last"])
def test_file_without_metadata_needs_assume_layout(tmp_path: Path, assume: str) -> None:
    src, out = tmp_path / "raw.safetensors", tmp_path / "o.safetensors"
    gen = torch.Generator().manual_seed(7)
    raw = {recurrent_state_name(layer): torch.randn(N, HV, K, V, generator=gen) for layer in LAYERS}
    save_file(raw, src)  # no moetool metadata: k-first and k-last cannot be told apart
    before = folder_state(tmp_path)
    line = fails("convert-ssm", src, out)
    assert "--assume-layout" in line and str(src) in line, line
    assert folder_state(tmp_path) == before, "a refused conversion leaves nothing behind"

    ok("convert-ssm", src, out, "--assume-layout", assume, "--to", "k-last")
    got, md = read(out)
    assert md["format"] == "moetool-ssm-state" and md["state_layout"] == "k-last"
    k_dim, v_dim = (K, V) if assume == "k-first" else (V, K)  # dims follow the stated layout
    assert (md["head_k_dim"], md["head_v_dim"], md["num_value_heads"]) == (str(k_dim), str(v_dim), str(HV))
    for layer in LAYERS:
        t = raw[recurrent_state_name(layer)]
        want = t.transpose(-1, -2).contiguous() if assume == "k-first" else t
        assert_bytes(got[recurrent_state_name(layer)], want, recurrent_state_name(layer))


def test_refuses_out_equal_to_in(tmp_path: Path) -> None:
    src = tmp_path / "s.safetensors"
    write_state_file(src, k_first(torch.float32, seed=8), meta("k-first"))
    before = folder_state(tmp_path)
    for same in (src, tmp_path / "." / src.name, tmp_path / "sub" / ".." / src.name):
        (tmp_path / "sub").mkdir(exist_ok=True)
        fails("convert-ssm", src, same, "--overwrite")
        (tmp_path / "sub").rmdir()
        assert folder_state(tmp_path) == before, same  # input bytes unchanged, nothing else written


def test_refuses_an_existing_out_without_overwrite(tmp_path: Path) -> None:
    src, out = tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    tensors = k_first(torch.float32, seed=9)
    write_state_file(src, tensors, meta("k-first"))
    out.write_bytes(b"an earlier file")
    before = folder_state(tmp_path)
    assert str(out) in fails("convert-ssm", src, out)
    assert folder_state(tmp_path) == before  # input and OUT unchanged, no temporary left

    ok("convert-ssm", src, out, "--overwrite")
    got, _ = read(out)
    name = recurrent_state_name(LAYERS[-1])
    assert_bytes(got[name], tensors[name].transpose(-1, -2).contiguous(), name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "s.safetensors"]


# -- capture-ssm ------------------------------------------------------------------------------------
TOKEN_IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
QN_K, QN_V = 32, 48  # K != V: the captured shape itself says which layout it is


@pytest.fixture(scope="session")
def qwen3_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-layer Qwen3-Next (two linear-attention layers, then full attention), float32, built by
    transformers' own classes; no tokenizer."""
    from moetool.testing.hf_models import make_hf_checkpoint

    return make_hf_checkpoint(
        "qwen3_next",
        tmp_path_factory.mktemp("qwen3_next") / "model",
        num_layers=3,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        dtype=torch.float32,
        config_overrides={"linear_key_head_dim": QN_K, "linear_value_head_dim": QN_V},
    )


@pytest.fixture(scope="session")
def capture_run(qwen3_next: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Outcome]:
    out = tmp_path_factory.mktemp("capture") / "state.safetensors"
    res = ok("capture-ssm", qwen3_next, out, "--token-ids", ",".join(map(str, TOKEN_IDS)), "-q")
    return out, res


@pytest.fixture
def captured(capture_run: tuple[Path, Outcome]) -> Path:
    return capture_run[0]


def linear_layers(model_dir: Path) -> list[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return [i for i, t in enumerate(cfg["layer_types"]) if t == "linear_attention"]


def test_capture_equals_transformers_cache(qwen3_next: Path, captured: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_next, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([TOKEN_IDS]), use_cache=True).past_key_values
    got, _ = read(captured)
    layers = linear_layers(qwen3_next)
    assert layers == [0, 1]
    assert set(got) == {n for layer in layers for n in (recurrent_state_name(layer), conv_state_name(layer))}
    cfg = json.loads((qwen3_next / "config.json").read_text())
    for layer in layers:
        lay = cache.layers[layer]
        assert lay.number_of_states == 1
        want_s, want_c = lay.recurrent_states[0], lay.conv_states[0]
        state = got[recurrent_state_name(layer)]
        assert state.shape == (1, cfg["linear_num_value_heads"], QN_K, QN_V)  # k-first [N, HV, K, V]
        assert_bytes(state, want_s.float().contiguous(), recurrent_state_name(layer))
        assert_bytes(got[conv_state_name(layer)], want_c.float().contiguous(), conv_state_name(layer))
        assert state.abs().sum() > 0, "an all-zero state would prove nothing"


def test_capture_metadata_carries_the_config(qwen3_next: Path, captured: Path) -> None:
    cfg = json.loads((qwen3_next / "config.json").read_text())
    _, md = read(captured)
    assert md["format"] == "moetool-ssm-state"
    assert md["state_layout"] == "k-first" and md["pooled"] == "false" and md["conv_layout"] == "dim-first"
    assert md["model_type"] == cfg["model_type"] == "qwen3_next"
    assert md["num_key_heads"] == str(cfg["linear_num_key_heads"])
    assert md["num_value_heads"] == str(cfg["linear_num_value_heads"])
    assert md["head_k_dim"] == str(cfg["linear_key_head_dim"]) == str(QN_K)
    assert md["head_v_dim"] == str(cfg["linear_value_head_dim"]) == str(QN_V)


def test_capture_conv_layout_dim_last(qwen3_next: Path, captured: Path, tmp_path: Path) -> None:
    out = tmp_path / "state.safetensors"
    ok(
        "capture-ssm",
        qwen3_next,
        out,
        "--token-ids",
        ",".join(map(str, TOKEN_IDS)),
        "--conv-layout",
        "dim-last",
    )
    got, md = read(out)
    want, _ = read(captured)
    assert md["conv_layout"] == "dim-last"
    for layer in linear_layers(qwen3_next):
        name = conv_state_name(layer)
        assert_bytes(got[name], want[name].transpose(-1, -2).contiguous(), name)
        assert_bytes(got[recurrent_state_name(layer)], want[recurrent_state_name(layer)], name)


def test_captured_state_decodes_alike_in_both_layouts(
    qwen3_next: Path, captured: Path, tmp_path: Path
) -> None:
    klast = tmp_path / "klast.safetensors"
    ok("convert-ssm", captured, klast, "--to", "k-last")
    first, md = read(captured)
    last, _ = read(klast)
    h, hv = int(md["num_key_heads"]), int(md["num_value_heads"])
    gen = torch.Generator().manual_seed(10)
    steps = 5
    for layer in linear_layers(qwen3_next):
        s_first = first[recurrent_state_name(layer)]
        s_last = last[recurrent_state_name(layer)]
        assert s_last.shape == (1, hv, QN_V, QN_K)
        n = s_first.shape[0]
        q, k = (torch.randn(n, steps, h, QN_K, generator=gen) for _ in range(2))
        v = torch.randn(n, steps, hv, QN_V, generator=gen)
        a, b = (torch.randn(n, steps, hv, generator=gen) for _ in range(2))
        A_log, dt_bias = (torch.randn(hv, generator=gen) * 0.5 for _ in range(2))
        o1, f1 = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, s_first, layout="k-first")
        o2, f2 = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, s_last, layout="k-last")
        assert relative_error(o2, o1) <= 1e-6
        assert relative_error(f2.transpose(-1, -2), f1) <= 1e-6
        # the state matters: decoding from zeros instead gives other outputs
        o0, _ = gdn_decode_gated_ref(
            q, k, v, a, b, A_log, dt_bias, torch.zeros_like(s_first), layout="k-first"
        )
        assert relative_error(o0, o1) > 1e-3


def test_capture_quiet_writes_nothing_on_stderr(capture_run: tuple[Path, Outcome]) -> None:
    """-q: only errors on stderr; progress bars are off anyway when stderr is not a terminal."""
    assert capture_run[1].err == "", capture_run[1].err


def test_capture_refuses_an_existing_out(qwen3_next: Path, tmp_path: Path) -> None:
    out = tmp_path / "state.safetensors"
    out.write_bytes(b"keep me")
    res = moetool("capture-ssm", qwen3_next, out, "--token-ids", "1,2,3", "-q")
    assert res.code == 2, f"exit {res.code}\n{res.out}\n{res.err}"
    errors = [line for line in res.err.splitlines() if line.startswith("moetool: error")]
    assert len(errors) == 1 and str(out) in errors[0] and "--overwrite" in errors[0], res.err
    assert "Traceback" not in res.err
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_capture_prompt_without_tokenizer_is_refused(qwen3_next: Path, tmp_path: Path) -> None:
    """The model folder holds no tokenizer files: the error says to pass --token-ids."""
    out = tmp_path / "state.safetensors"
    assert "--token-ids" in fails("capture-ssm", qwen3_next, out, "--prompt", "hello", "-q")
    assert not out.exists()

"""Check 5, SSM state: T decode steps from the converted state file (Triton K-last kernel,
pool-indexed; the torch reference on ``--device cpu``) against the k-first reference from the original;
outputs and final states compared by relative error."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moetool import tolerances as tol
from moetool.kernels import dispatch
from moetool.pipeline import pick_device
from moetool.validate.options import ValidateOptions
from moetool.validate.report import Check, Report


def validate_states(original: str | Path, converted: str | Path, opts: ValidateOptions) -> Report:
    """The converted state file decodes like the original: T steps of the K-last pool-indexed kernel
    (Triton; torch reference on the CPU) on the converted state against the k-first reference on the
    original; outputs and final states compared (relative error)."""
    from moetool.gdn import gdn_decode_gated_ref, relative_error
    from moetool.ssm import read_state_file, recurrent_state_name, slot_ids_name, state_layers
    from moetool.transforms.ssm_layout import convert_layout, from_pool

    t0 = time.perf_counter()
    device = pick_device(opts.device)
    report = Report(
        str(original), str(converted), str(device), "triton" if dispatch.uses_kernels(device) else "torch"
    )
    report.timings = {"ssm": 0.0, "total": 0.0}
    o_t, o_meta = read_state_file(original)
    c_t, c_meta = read_state_file(converted)
    o_t, o_meta = convert_layout(*from_pool(o_t, o_meta), "k-first")
    o_layers, c_layers = state_layers(o_t), state_layers(c_t)
    same = (o_meta.num_value_heads, o_meta.head_k_dim, o_meta.head_v_dim) == (
        c_meta.num_value_heads,
        c_meta.head_k_dim,
        c_meta.head_v_dim,
    )
    report.checks.append(
        Check(
            "structure",
            "state file",
            "layers and head dims match",
            "equal" if o_layers == c_layers and same else "differ",
            "equal",
            o_layers == c_layers and same,
            ""
            if o_layers == c_layers and same
            else f"layers {o_layers} vs {c_layers}, dims {o_meta} vs {c_meta}",
        )
    )
    if o_layers != c_layers or not same:
        report.timings["total"] = round(time.perf_counter() - t0, 3)
        return report
    t_ssm = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    hv, kd, vd = c_meta.num_value_heads, c_meta.head_k_dim, c_meta.head_v_dim
    h = c_meta.num_key_heads or o_meta.num_key_heads or hv
    steps = max(opts.ssm_steps, 1)
    for layer in (opts.layers and [x for x in c_layers if x in opts.layers]) or c_layers:
        orig_state = o_t[recurrent_state_name(layer)]
        n = orig_state.shape[0]
        if c_meta.pooled:
            pool = c_t[recurrent_state_name(layer)].clone()
            slots = c_t[slot_ids_name(layer)].to(torch.int32)
        else:
            dense, _ = (
                convert_layout(
                    {recurrent_state_name(layer): c_t[recurrent_state_name(layer)]}, c_meta, "k-last"
                )
                if c_meta.layout == "k-first"
                else (c_t, c_meta)
            )
            st = dense[recurrent_state_name(layer)]
            pool = torch.cat([torch.zeros_like(st[:1]), st]).contiguous()
            slots = torch.arange(1, n + 1, dtype=torch.int32)
        q = torch.randn(n, steps, h, kd, generator=gen)
        k = torch.randn(n, steps, h, kd, generator=gen)
        v = torch.randn(n, steps, hv, vd, generator=gen)
        a = torch.randn(n, steps, hv, generator=gen)
        b = torch.randn(n, steps, hv, generator=gen)
        A_log = torch.randn(hv, generator=gen) * 0.5
        dt_bias = torch.randn(hv, generator=gen) * 0.5
        bf16 = orig_state.dtype == torch.bfloat16
        # the kernel keeps the state in float32 across the T steps of one launch and rounds it once
        ref_o, ref_s = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, orig_state, layout="k-first")
        dev = device
        pool_d = pool.to(dev)
        out = dispatch.gdn_decode_klast(
            q.to(dev),
            k.to(dev),
            v.to(dev),
            a.to(dev),
            b.to(dev),
            A_log.to(dev),
            dt_bias.to(dev),
            pool_d,
            slots.to(dev),
        )
        got_s = pool_d.cpu()[slots.long()].transpose(-1, -2)
        err = max(
            relative_error(out.cpu().float(), ref_o.float()), relative_error(got_s.float(), ref_s.float())
        )
        bound = tol.SSM_REL_ERROR_BF16 if bf16 or pool.dtype == torch.bfloat16 else tol.SSM_REL_ERROR_FP32
        ok = err <= bound
        report.checks.append(
            Check(
                "ssm",
                f"layer {layer}",
                f"rel error of {steps} decode steps (outputs, final state)",
                f"{err:.2e}",
                f"<= {bound:g}",
                ok,
                ""
                if ok
                else f"{recurrent_state_name(layer)}: decoding from the converted state disagrees "
                f"(labelled {c_meta.layout}; a mislabelled layout does this)",
            )
        )
    report.timings = {
        "ssm": round(time.perf_counter() - t_ssm, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    return report

"""The engine-compatibility matrix: SGLang's and vLLM's own code run on every output moetool writes.

    python scripts/engine_compat.py [--dir DIR] [--families a,b] [--detail]

Installs the pinned engine wheels with ``--no-deps`` (and the few light packages their configuration and
weight-loading modules import) into ``DIR`` (default ``/tmp/moetool-engines``), never into this
environment, then runs a child Python with them on its path. For every family of the engine matrix
(:mod:`moetool.testing.engine_matrix`: the tiny transformers-made originals) x variant x scale format
it writes the output with moetool and asks each engine:

- **config**: the engine's quantization registry resolves ``quant_method`` and its ``Fp8Config.from_config``
  parses the output's ``quantization_config`` — the step that refuses moetool's refusal marker before
  any weight is read;
- **experts**: where the config is accepted, every expert tensor name of the output goes through the
  engine's own expert-parameter mapping (``FusedMoE.make_expert_params_mapping`` in SGLang,
  ``RoutedExperts.build_expert_params_mapping`` in vLLM) the way their ``load_weights`` loops use it
  (first entry whose checkpoint name is a substring; the name rewritten to the parameter's), and must land
  on the FP8 MoE parameter of its role (``w13_weight``/``w13_weight_scale_inv`` for gate and up with the
  expert id and shard of its name, ``w2_*`` for down);
- **copy** (the ``hf`` and ``linear`` outputs): each engine's own MoE layer (SGLang's ``FusedMoE``, vLLM's
  ``RoutedExperts``) is built on CPU for every MoE layer of the output, and every expert tensor goes
  through its ``weight_loader`` as its models' ``load_weights`` call it; each filled parameter must then
  equal, byte for byte (scales by value), what the engine's forward reads for that expert (:class:`Loaders`,
  :func:`_fill_check`; DeepSeek-V4 through the engines' own V4 loading, :func:`_v4_fill_check`);
- **Linears** (the same outputs): every other matrix through the engine's ``ReplicatedLinear`` with the
  output's quantization config: FP8 ones copied as stored, unquantized ones listed in ``ignored_layers``
  and held unquantized (:func:`_linear_check`).

This runs on CPU. It does not run the engines' kernels, their conversion of the loaded parameters to a
kernel's format, or their whole-model constructors; the transformers column of docs/compat.md is
established by loading and running (``tests/test_engine_matrix.py``).

torchvision is the one module replaced by an empty stand-in: SGLang's multimodal config helpers import it
at module load, and no torchvision wheel on PyPI matches a CPU torch of another release; nothing on the
paths exercised here calls it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENGINES = ("sglang==0.5.23", "vllm==0.33.0")
#: what the engines' config and loader modules import, pinned, installed without their dependencies
LIGHT = [
    "aiohappyeyeballs==2.7.1",
    "aiohttp==3.14.5",
    "aiosignal==1.4.0",
    "apache-tvm-ffi==0.1.15.post2",
    "attrs==26.1.0",
    "cachetools==8.0.2",
    "cbor2==6.3.0",
    "certifi==2026.10.19.post1",
    "cloudpickle==3.1.3",
    "compressed-tensors",
    "dill",
    "einops==0.8.2",
    "fastapi==0.165.0",
    "frozenlist==1.8.0",
    "gguf",
    "ipython==9.18.1",
    "llguidance==1.9.1",
    "loguru",
    "msgspec==0.23.0",
    "multidict==7.2.1",
    "openai==3.57.0",
    "openai-harmony==0.0.8",
    "opentelemetry-api==1.45.2",
    "orjson==3.13.0",
    "partial-json-parser==0.2.1.1.post7",
    "pillow==13.0.0",
    "prometheus-client==0.26.0",
    "propcache==0.5.4",
    "py-cpuinfo==9.0.0",
    "pybase64==1.5.1",
    "pyzmq==27.3.0",
    "requests==2.34.2",
    "sentencepiece",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "traitlets==5.16.1",
    "urllib3==2.8.0",
    "uvloop==0.23.0",
    "xgrammar==0.2.9",
    "yarl==1.25.1",
]
STUBBED = ("torchvision",)
#: the variants whose expert tensors are also copied into each engine's MoE parameters by its own loader
COPIED = ("hf", "linear")


def install(root: Path) -> list[Path]:
    site, deps = root / "site", root / "deps"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
    ]
    for target, pkgs in ((site, ENGINES), (deps, LIGHT)):
        if not (target / ".done").exists():
            subprocess.run([*pip, "--target", str(target), *pkgs], check=True)
            (target / ".done").write_text(" ".join(pkgs))
    return [site, deps]


# -- in the child ---------------------------------------------------------------------------------
def _stub(names: tuple[str, ...]) -> None:
    """An empty stand-in module for each of ``names`` (attribute access and calls give more stand-ins)."""
    import importlib.abc
    import importlib.machinery
    import types

    class Any_(type):
        def __getattr__(cls, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return Any_(name, (), {})

        def __call__(cls, *a: object, **k: object) -> type:
            return cls

    class Module(types.ModuleType):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.__path__: list[str] = []

        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return Any_(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] not in names:
                return None
            # only for the engines' own imports: transformers probes torchvision and must not find it
            f = sys._getframe(1)
            while f is not None and (
                "importlib" in f.f_code.co_filename or f.f_code.co_filename.startswith("<")
            ):
                f = f.f_back
            caller = f.f_code.co_filename if f is not None else ""
            if "/sglang/" not in caller and "/vllm/" not in caller:
                return None
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

        def create_module(self, spec):
            return Module(spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.append(Finder())


def _qc(config: dict) -> dict | None:
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


def _expert_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(n for n in json.loads(index.read_text())["weight_map"] if ".experts." in n)
    from safetensors import safe_open

    names: list[str] = []
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names += [n for n in h.keys() if ".experts." in n]  # noqa: SIM118
    return sorted(names)


_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.(weight|weight_scale_inv)$")
_ROLE = {
    "gate_proj": ("w13", "w1"),
    "up_proj": ("w13", "w3"),
    "down_proj": ("w2", "w2"),
}
_ROLE.update({"w1": _ROLE["gate_proj"], "w3": _ROLE["up_proj"], "w2": _ROLE["down_proj"]})


def _route(names: list[str], mapping: list[tuple]) -> str:
    """Every expert tensor through an engine's expert mapping as its load_weights loop does."""
    wrong = []
    for name in names:
        m = _PER_EXPERT.search(name)
        if m is None:
            wrong.append(f"{name}: no per-expert name")
            continue
        expert, proj, suffix = int(m.group(1)), m.group(2), m.group(3)
        hit = next((e for e in mapping if e[1] in name), None)
        if hit is None:
            wrong.append(f"{name}: unmatched")
            continue
        param, _, expert_id, shard = hit
        mapped = name.replace(hit[1], param)
        want_param, want_shard = _ROLE[proj]
        if not mapped.endswith(f".experts.{want_param}_{suffix}") or (
            expert_id,
            shard,
        ) != (expert, want_shard):
            wrong.append(f"{name} -> {mapped} expert {expert_id} shard {shard}")
    if (
        wrong
        and all(n.endswith(".scale") or n.endswith(".weight") for n in names)
        and any(n.endswith(".scale") for n in names)
    ):
        # DeepSeek-V4's release names (ffn.experts.E.w1.weight + .scale): read by the engines' own V4
        # loaders, whose renaming this mapping does not cover
        return "not checked (DeepSeek-V4 release names)"
    if wrong:
        return f"WRONG ({len(wrong)}: {wrong[0]})"
    return f"routed ({len(names)} tensors)"


class Loaders:
    """Each engine's own FP8 MoE layer, built on CPU for a given size, and its ``weight_loader``.

    SGLang 0.5.23: ``FusedMoE`` as its models build it, after publishing ``ServerArgs(device="cpu")`` (its
    process-wide configuration) with MoE ranks 0 of 1. vLLM 0.33.0: ``RoutedExperts`` inside a
    ``VllmConfig(device=cpu)`` with a one-process gloo group; its FP8 kernel choice
    (``select_fp8_moe_backend``, which asks for a CUDA device) is replaced by the Triton backend without
    the device check. Parameters (names, shapes, dtypes) come from each engine's ``Fp8MoEMethod.create_weights``;
    the copy from its ``weight_loader``. The conversion each kernel applies after loading
    (``process_weights_after_loading``) is not run.
    """

    def __init__(self, root: Path) -> None:
        import socket

        from transformers import Qwen3MoeConfig

        # ServerArgs reads a model's config.json; the layers built here take their sizes from each output
        sample = root / "server-args-model"
        Qwen3MoeConfig(
            num_hidden_layers=1, hidden_size=256, intermediate_size=256, architectures=["Qwen3MoeForCausalLM"]
        ).save_pretrained(sample)

        from sglang.srt import runtime_context
        from sglang.srt.server_args import ServerArgs
        from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
        from vllm.distributed import parallel_state
        from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle
        from vllm.model_executor.layers.quantization import fp8 as vllm_fp8

        runtime_context.publish(ServerArgs(model_path=str(sample), device="cpu"), role="scheduler")
        runtime_context.get_parallel().override_permanently(moe_ep_rank=0, moe_tp_rank=0)

        def triton(config, weight_key, activation_key, allow_vllm_cutlass=False):
            return oracle.Fp8MoeBackend.TRITON, oracle.backend_to_kernel_cls(oracle.Fp8MoeBackend.TRITON)[0]

        vllm_fp8.select_fp8_moe_backend = triton
        self._vllm_ctx = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
        self._vllm_ctx.__enter__()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=0,
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(1, 1)

    @staticmethod
    def sglang(prefix: str, layer: int, experts: int, hidden: int, inter: int, qc: dict, config=None):
        import torch
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
        from sglang.srt.layers.quantization import get_quantization_config

        if config is None:
            config = get_quantization_config(qc["quant_method"]).from_config(qc)
        return FusedMoE(
            num_experts=experts,
            hidden_size=hidden,
            intermediate_size=inter,
            layer_id=layer,
            top_k=min(2, experts),
            params_dtype=torch.bfloat16,
            quant_config=config,
            prefix=prefix,
        )

    @staticmethod
    def vllm(prefix: str, layer: int, experts: int, hidden: int, inter: int, qc: dict, config=None):
        import torch
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.config import (
            FusedMoEConfig,
            FusedMoEParallelConfig,
            RoutingMethodType,
        )
        from vllm.model_executor.layers.fused_moe.expert_map_manager import ExpertMapManager
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        from vllm.model_executor.layers.quantization import get_quantization_config

        one = dict(tp_size=1, pcp_size=1, dp_size=1, ep_size=1, tp_rank=0, pcp_rank=0, dp_rank=0, ep_rank=0)
        parallel = FusedMoEParallelConfig(
            **one, sp_size=1, use_ep=False, all2all_backend="naive", enable_eplb=False
        )
        moe = FusedMoEConfig(
            num_experts=experts,
            experts_per_token=min(2, experts),
            hidden_dim=hidden,
            intermediate_size=inter,
            num_local_experts=experts,
            num_logical_experts=experts,
            activation=MoEActivation.SILU,
            device="cpu",
            routing_method=RoutingMethodType.Renormalize,
            moe_parallel_config=parallel,
            in_dtype=torch.bfloat16,
            intermediate_size_per_partition=inter,
        )
        experts_map = ExpertMapManager(
            max_num_batched_tokens=256,
            top_k=min(2, experts),
            global_num_experts=experts,
            num_redundant_experts=0,
            num_expert_group=None,
            moe_parallel_config=parallel,
            placement_strategy="linear",
            enable_eplb=False,
        )
        if config is None:
            config = get_quantization_config(qc["quant_method"]).from_config(qc)
        return RoutedExperts(prefix, torch.bfloat16, moe, config, experts_map)


def _fill_check(path: Path, qc: dict, engine: str, mapping_of, loaders: Loaders) -> str:
    """Every routed expert tensor of ``path`` through ``engine``'s own ``weight_loader`` into the FP8 MoE
    parameters its ``create_weights`` made, as its models' ``load_weights`` loops call it; then each filled
    parameter against what its forward reads: ``w13_weight[e]`` = gate rows then up rows (its SiluAndMul
    takes ``silu(x[..., :d]) * x[..., d:]``), ``w13_weight_scale_inv[e]`` = gate's then up's scale rows,
    ``w2_weight[e]`` = down, ``w2_weight_scale_inv[e]`` = down's scales. FP8 compared byte for byte,
    scales as float32 values (a ue8m0 grid holds powers of two); parameters are filled with NaN first, so
    a slot no tensor reached fails."""
    import torch
    from safetensors import safe_open

    tensors: dict[str, dict[tuple[int, str, str], Path]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118
                m = _PER_EXPERT.search(name)
                if m:
                    prefix = name[: m.start()] + ".experts"
                    tensors.setdefault(prefix, {})[(int(m.group(1)), m.group(2), m.group(3))] = f
    if not tensors:
        return "names only: no per-expert tensors"

    def get(f: Path, name: str):
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(name)

    layers = 0
    for prefix, held in sorted(tensors.items()):
        projs = {k[1] for k in held}
        g, d, u = ("w1", "w2", "w3") if "w1" in projs else ("gate_proj", "down_proj", "up_proj")
        experts = 1 + max(k[0] for k in held)
        want = {k: get(f, f"{prefix}.{k[0]}.{k[1]}.{k[2]}") for k, f in held.items()}
        fp8 = want[(0, g, "weight")].dtype == torch.float8_e4m3fn
        if any((w.dtype == torch.float8_e4m3fn) != fp8 for (_, _, s), w in want.items() if s == "weight"):
            return "names only: experts of mixed precision"
        inter, hidden = want[(0, g, "weight")].shape
        layer_no = int(re.search(r"layers\.(\d+)\.", prefix).group(1))
        try:
            layer = getattr(loaders, engine)(prefix, layer_no, experts, hidden, inter, qc)
        except Exception as exc:  # the engine's layer does not build here: say what stops it
            return f"names only: {type(exc).__name__}: {str(exc)[:120]}"
        params = dict(layer.named_parameters())
        for p in params.values():
            _nan_fill(p)
        mapping = mapping_of(g, d, u, experts)
        for (e, proj, suffix), tensor in want.items():
            name = f"{prefix}.{e}.{proj}.{suffix}"
            hit = next((m for m in mapping if m[1] in name), None)
            if hit is None:
                return f"WRONG: {name} unmatched"
            mapped = name.replace(hit[1], hit[0])
            param = params.get(mapped.rsplit(".", 1)[-1])
            if param is None:
                return f"WRONG: {name} -> {mapped}: no such parameter"
            try:
                param.weight_loader(param, tensor, mapped, shard_id=hit[3], expert_id=hit[2])
            except Exception as exc:  # loud, but an hf output must load
                return f"WRONG: its weight_loader raised on {name}: {type(exc).__name__}: {str(exc)[:100]}"
        roles = [("w13_weight", (g, u), "weight"), ("w2_weight", (d,), "weight")]
        if fp8:
            roles += [
                ("w13_weight_scale_inv", (g, u), "weight_scale_inv"),
                ("w2_weight_scale_inv", (d,), "weight_scale_inv"),
            ]
        elif any(p.dtype == torch.float8_e4m3fn for p in params.values()):
            # unquantized experts given FP8 parameters: the copy would cast them unscaled
            return f"WRONG: {prefix}: FP8 parameters for {want[(0, g, 'weight')].dtype} experts"
        for e in range(experts):
            for param_name, parts, suffix in roles:
                got = params[param_name].data[e]
                exp = torch.cat([want[(e, p, suffix)] for p in parts])
                if suffix == "weight" and fp8:
                    same = (
                        got.shape == exp.shape
                        and got.dtype == exp.dtype
                        and torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
                    )
                elif (
                    suffix == "weight"
                ):  # the engine holds unquantized experts in its model dtype (bf16 here)
                    same = got.shape == exp.shape and torch.equal(got, exp.to(got.dtype))
                else:
                    same = got.shape == exp.shape and torch.equal(got, exp.to(torch.float32))
                if not same:
                    return f"WRONG: {prefix} expert {e} {param_name} {tuple(got.shape)} vs {tuple(exp.shape)}"
        layers += 1
    return f"copied right ({layers} layers x {experts} experts)"


_V4_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")


def _v4_fill_check(path: Path, engine: str, loaders: Loaders) -> str:
    """DeepSeek-V4's routed experts (release names ``layers.L.ffn.experts.E.w1.weight`` + ``.scale``)
    through each engine's own V4 loading: SGLang's ``DeepseekV4ForCausalLM.remap_weight_name_to_dpsk_hf_format``
    then its ``FusedMoE`` mapping and ``weight_loader``; vLLM's ``DeepseekV4FP8Config`` (chosen by its
    ``override_quantization_method``, ``expert_dtype`` read from the config as its ``hf_config``), its V4
    weights mapper, and ``DeepseekV4Model.load_weights`` (the nvidia model's: it views E8M0 expert scales as
    bytes before the copy) on a stand-in model holding one real ``RoutedExperts`` per layer. Then the
    same comparison as :func:`_fill_check` (scales by value)."""
    import types

    import torch
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    qc = _qc(cfg)
    want: dict[tuple[int, int, str, str], torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118
                m = _V4_EXPERT.match(name)
                if m:
                    want[(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4))] = h.get_tensor(name)
    if not want:
        return "names only: no routed experts"
    experts, hidden, inter = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    layers = sorted({k[0] for k in want})
    names = {f"layers.{lay}.ffn.experts.{e}.{w}.{kind}": t for (lay, e, w, kind), t in want.items()}
    hf_config = types.SimpleNamespace(**cfg)
    try:
        if engine == "sglang":
            from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
            from sglang.srt.models.deepseek_v4 import DeepseekV4ForCausalLM

            mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", experts)
            built = {
                lay: Loaders.sglang(f"model.layers.{lay}.mlp.experts", lay, experts, hidden, inter, qc)
                for lay in layers
            }
            params = {lay: dict(m.named_parameters()) for lay, m in built.items()}
            for lay in layers:
                for p in params[lay].values():
                    _nan_fill(p)
            for name, tensor in names.items():
                hf = DeepseekV4ForCausalLM.remap_weight_name_to_dpsk_hf_format(
                    name, num_hidden_layers=cfg["num_hidden_layers"]
                )
                hit = next((m for m in mapping if m[1] in hf), None)
                if hit is None:
                    return f"WRONG: {name} -> {hf}: unmatched"
                mapped = hf.replace(hit[1], hit[0])
                lay = int(mapped.split(".")[2])
                param = params[lay].get(mapped.rsplit(".", 1)[-1])
                if param is None:
                    return f"WRONG: {name} -> {mapped}: no such parameter"
                param.weight_loader(param, tensor, mapped, shard_id=hit[3], expert_id=hit[2])
            filled = {lay: params[lay] for lay in layers}
        else:
            from vllm.config import get_current_vllm_config
            from vllm.model_executor.layers.quantization import get_quantization_config
            from vllm.models.deepseek_v4.nvidia import model as v4
            from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

            method = (
                DeepseekV4FP8Config.override_quantization_method(qc, None, hf_config) or qc["quant_method"]
            )
            current = get_current_vllm_config()
            saved = current.model_config
            object.__setattr__(current, "model_config", types.SimpleNamespace(hf_config=hf_config))
            try:
                config = get_quantization_config(method).from_config(qc)
                expert_dtype = config.expert_dtype if hasattr(config, "expert_dtype") else "fp8"

                class Model(torch.nn.Module):  # what DeepseekV4Model.load_weights reads of itself
                    load_weights = v4.DeepseekV4Model.load_weights
                    get_expert_mapping = v4.DeepseekV4Model.get_expert_mapping

                model = Model()
                model.layers = torch.nn.ModuleList()
                model.start_layer, model.end_layer = 0, max(layers) + 1
                model.config, model.quant_config, model.use_sequence_parallel = hf_config, config, False
                for lay in range(max(layers) + 1):
                    routed = Loaders.vllm(
                        f"model.layers.{lay}.ffn.experts.routed_experts",
                        lay,
                        experts,
                        hidden,
                        inter,
                        qc,
                        config,
                    )
                    ffn, holder, layer = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
                    holder.routed_experts = routed
                    ffn.experts, ffn.use_native_mega_moe, ffn.n_redundant_experts = holder, False, 0
                    layer.ffn = ffn
                    model.layers.append(layer)
                for p in model.parameters():
                    _nan_fill(p)
                mapper = v4._make_deepseek_v4_weights_mapper(expert_dtype)
                mapped = [(n.removeprefix("model."), t) for n, t in mapper.apply(iter(names.items()))]
                model.load_weights(mapped)
            finally:
                object.__setattr__(current, "model_config", saved)
            filled = {
                lay: dict(model.layers[lay].ffn.experts.routed_experts.named_parameters()) for lay in layers
            }
    except Exception as exc:  # loud, but an engine-loadable output must load
        return f"WRONG: its loader raised: {type(exc).__name__}: {str(exc)[:120]}"
    for lay in layers:
        for e in range(experts):
            for param_name, parts, kind in (
                ("w13_weight", ("w1", "w3"), "weight"),
                ("w13_weight_scale_inv", ("w1", "w3"), "scale"),
                ("w2_weight", ("w2",), "weight"),
                ("w2_weight_scale_inv", ("w2",), "scale"),
            ):
                got = filled[lay][param_name].data[e]
                exp = torch.cat([want[(lay, e, p, kind)] for p in parts])
                if not _same(got, exp):
                    return (
                        f"WRONG: layer {lay} expert {e} {param_name}: {got.flatten()[:2].tolist()} "
                        f"for {exp.float().flatten()[:2].tolist()}"
                    )
    shared = _v4_shared_check(path, engine, cfg)
    if shared:
        return shared
    return f"copied right ({len(layers)} layers x {experts} experts, and shared experts)"


def _v4_shared_check(path: Path, engine: str, cfg: dict) -> str:
    """DeepSeek-V4's shared experts (FP8 Linears, E8M0 ``.scale`` as the release ships them) through
    the engine's own FP8 Linear parameters and loaders, as its V4 ``load_weights`` feed them: ``w1`` and
    ``w3`` into a ``MergedColumnParallelLinear`` (shards 0 and 1), ``w2`` into a ``RowParallelLinear``.
    vLLM's FP8 Linear kernel choice (``init_fp8_linear_kernel``, which asks for CUDA; used only by the
    forward) is skipped. Empty when every byte and scale landed right."""
    import types

    import torch
    from safetensors import safe_open

    t: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for n in h.keys():  # noqa: SIM118
                if ".ffn.shared_experts." in n and n.startswith("layers."):
                    t[n] = h.get_tensor(n)
    layers = sorted({int(n.split(".")[1]) for n in t})
    qc = _qc(cfg)
    hf_config = types.SimpleNamespace(**cfg)
    if engine == "sglang":
        from sglang.srt.layers.linear import MergedColumnParallelLinear, RowParallelLinear
        from sglang.srt.layers.quantization import get_quantization_config

        config = get_quantization_config(qc["quant_method"]).from_config(qc)
        saved = None
    else:
        from vllm.config import get_current_vllm_config
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
        from vllm.model_executor.layers.quantization import fp8 as vllm_fp8
        from vllm.model_executor.layers.quantization import get_quantization_config
        from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

        vllm_fp8.init_fp8_linear_kernel = lambda *a, **k: None
        current = get_current_vllm_config()
        saved = current.model_config
        object.__setattr__(
            current, "model_config", types.SimpleNamespace(hf_config=hf_config, dtype=torch.bfloat16)
        )
        method = DeepseekV4FP8Config.override_quantization_method(qc, None, hf_config) or qc["quant_method"]
        config = get_quantization_config(method).from_config(qc)
    try:
        for lay in layers:
            pre = f"layers.{lay}.ffn.shared_experts"
            w1, w2, w3 = (t[f"{pre}.{w}.weight"] for w in ("w1", "w2", "w3"))
            s1, s2, s3 = (t[f"{pre}.{w}.scale"] for w in ("w1", "w2", "w3"))
            gate_up = MergedColumnParallelLinear(
                w1.shape[1],
                [w1.shape[0], w3.shape[0]],
                bias=False,
                quant_config=config,
                prefix=f"model.{pre}.gate_up_proj",
            )
            down = RowParallelLinear(
                w2.shape[1], w2.shape[0], bias=False, quant_config=config, prefix=f"model.{pre}.down_proj"
            )
            gp, dp = dict(gate_up.named_parameters()), dict(down.named_parameters())
            for p in (*gp.values(), *dp.values()):
                _nan_fill(p)
            for shard, (w, sc) in enumerate(((w1, s1), (w3, s3))):
                gp["weight"].weight_loader(gp["weight"], w, shard)
                gp["weight_scale_inv"].weight_loader(gp["weight_scale_inv"], sc, shard)
            dp["weight"].weight_loader(dp["weight"], w2)
            dp["weight_scale_inv"].weight_loader(dp["weight_scale_inv"], s2)
            for what, got, exp in (
                ("gate_up_proj.weight", gp["weight"].data, torch.cat([w1, w3])),
                ("gate_up_proj.weight_scale_inv", gp["weight_scale_inv"].data, torch.cat([s1, s3])),
                ("down_proj.weight", dp["weight"].data, w2),
                ("down_proj.weight_scale_inv", dp["weight_scale_inv"].data, s2),
            ):
                if not _same(got, exp):
                    return f"WRONG: {pre}.{what}: {got.flatten()[:2].tolist()} for {exp.float().flatten()[:2].tolist()}"
    except Exception as exc:  # loud, but an engine-loadable output must load
        return f"WRONG: its shared-expert loader raised: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        if saved is not None:
            object.__setattr__(current, "model_config", saved)
    return ""


def _linear_check(path: Path, engine: str) -> str:
    """Every Linear of an output outside the experts through the engine's own ``ReplicatedLinear`` with
    the output's quantization config and the checkpoint's module name as prefix: an FP8 weight must get
    the FP8 method's parameters and be copied right with its ``weight_scale_inv`` (bytes, scale values);
    every other matrix but the embeddings must be listed in ``ignored_layers`` and get unquantized
    parameters and its values. The
    engines' fused modules (``qkv_proj``, ``gate_up_proj``) and their renaming of wrapped models' prefixes
    are not modelled: the prefix is the checkpoint's. vLLM's FP8 Linear kernel choice
    (``init_fp8_linear_kernel``, which asks for CUDA; only the forward uses it) is skipped."""
    import types

    import torch
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    qc = _qc(cfg)
    ignored = set(qc.get("ignored_layers") or [])
    t: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for n in h.keys():  # noqa: SIM118
                if ".experts." not in n and (n.endswith(".weight") or n.endswith(".weight_scale_inv")):
                    t[n] = h.get_tensor(n)
    fp8 = sorted(n for n, w in t.items() if n.endswith(".weight") and w.dtype == torch.float8_e4m3fn)
    plain = sorted(
        n
        for n, w in t.items()
        if n.endswith(".weight") and w.dim() == 2 and w.dtype != torch.float8_e4m3fn and "embed" not in n
    )
    unlisted = [n for n in plain if n[: -len(".weight")] not in ignored]
    if unlisted:  # an engine would give it FP8 parameters
        return f"WRONG: {unlisted[0]} stays {t[unlisted[0]].dtype} but is not in ignored_layers"
    current = saved = None
    if engine == "sglang":
        from sglang.srt.layers.linear import ReplicatedLinear
        from sglang.srt.layers.quantization import get_quantization_config

        config = get_quantization_config(qc["quant_method"]).from_config(qc)
    else:
        from vllm.config import get_current_vllm_config
        from vllm.model_executor.layers.linear import ReplicatedLinear
        from vllm.model_executor.layers.quantization import fp8 as vllm_fp8
        from vllm.model_executor.layers.quantization import get_quantization_config

        vllm_fp8.init_fp8_linear_kernel = lambda *a, **k: None
        current = get_current_vllm_config()
        saved = current.model_config
        object.__setattr__(
            current,
            "model_config",
            types.SimpleNamespace(hf_config=types.SimpleNamespace(**cfg), dtype=torch.bfloat16),
        )
        config = get_quantization_config(qc["quant_method"]).from_config(qc)
    try:
        for name in fp8 + plain:
            w = t[name]
            module = name[: -len(".weight")]
            lin = ReplicatedLinear(w.shape[1], w.shape[0], bias=False, quant_config=config, prefix=module)
            params = dict(lin.named_parameters())
            for p in params.values():
                _nan_fill(p)
            got_fp8 = params["weight"].dtype == torch.float8_e4m3fn
            if got_fp8 != (name in fp8):
                return f"WRONG: {module}: engine holds it as {params['weight'].dtype}, stored {w.dtype}"
            params["weight"].weight_loader(params["weight"], w)
            if name in fp8:
                scale = t[name + "_scale_inv"]
                params["weight_scale_inv"].weight_loader(params["weight_scale_inv"], scale)
                if not (_same(params["weight"].data, w) and _same(params["weight_scale_inv"].data, scale)):
                    return f"WRONG: {module}: weight or scales not copied as stored"
            elif not torch.equal(params["weight"].data, w.to(params["weight"].dtype)):
                return f"WRONG: {module}: values not copied"
    except Exception as exc:  # loud, but an engine-loadable output must load
        return f"WRONG: its Linear loader raised: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        if saved is not None or current is not None:
            object.__setattr__(current, "model_config", saved)
    return f"copied right ({len(fp8)} FP8, {len(plain)} unquantized)"


def _nan_fill(p) -> None:
    import torch

    if p.dtype == torch.float8_e4m3fn:
        p.data.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
    else:
        p.data.fill_(float("nan"))


def _same(got, exp) -> bool:
    """FP8 byte for byte; scales by value (float32, from float32 or E8M0)."""
    import torch

    if got.shape != exp.shape:
        return False
    if exp.dtype == torch.float8_e4m3fn:
        return got.dtype == exp.dtype and torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    return torch.equal(got.float(), exp.float())


def child(root: Path, families: list[str] | None) -> list[dict]:
    _stub(STUBBED)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from importlib.metadata import version

    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE as SglFusedMoE
    from sglang.srt.layers.quantization import get_quantization_config as sgl_quant
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization import (
        get_quantization_config as vllm_quant,
    )

    from moetool.testing.engine_matrix import (
        SCALE_FMTS,
        VARIANTS,
        Cells,
        config_of,
        sources,
    )

    table = sources()
    if families:
        table = {f: table[f] for f in families}
    work = root / "cells"
    if work.exists():
        shutil.rmtree(work)
    cells = Cells(work, table)
    versions = {"sglang": version("sglang"), "vllm": version("vllm")}
    mapping_of = {
        "sglang": SglFusedMoE.make_expert_params_mapping,
        "vllm": lambda g, d, u, n: RoutedExperts.build_expert_params_mapping(
            g, d, u, n, routed_experts_prefix="", include_fused=True
        ),
    }
    loaders: Loaders | None = None
    rows = []
    for family in sorted(table):
        for variant in VARIANTS:
            for fmt in SCALE_FMTS:
                row = {
                    "family": family,
                    "variant": variant,
                    "scale_fmt": fmt,
                    **versions,
                }
                cell = cells.output(family, variant, fmt)
                if cell.path is None:
                    row["moetool"] = "not written: " + (cell.refusal or "")
                    rows.append(row)
                    continue
                row["moetool"] = "written"
                qc = _qc(config_of(cell.path))
                names = _expert_names(cell.path)
                per_expert = [n for n in names if _PER_EXPERT.search(n)]
                num_experts = 1 + max(
                    (int(_PER_EXPERT.search(n).group(1)) for n in per_expert),
                    default=-1,
                )
                projs = {_PER_EXPERT.search(n).group(2) for n in per_expert}
                g, d, u = ("w1", "w2", "w3") if "w1" in projs else ("gate_proj", "down_proj", "up_proj")
                mappings = {engine: make(g, d, u, num_experts) for engine, make in mapping_of.items()}
                for engine, resolve in (("sglang", sgl_quant), ("vllm", vllm_quant)):
                    try:
                        resolve(qc["quant_method"]).from_config(qc)
                    except Exception as exc:  # the engine refuses the checkpoint here
                        row[f"{engine}_config"] = f"refused: {type(exc).__name__}: {str(exc)[:90]}"
                        row[f"{engine}_experts"] = "-"
                        continue
                    row[f"{engine}_config"] = "accepted"
                    row[f"{engine}_experts"] = _route(names, mappings[engine]) if names else "no experts"
                    experts = row[f"{engine}_experts"]
                    if variant in COPIED and (
                        experts.startswith("routed") or experts.startswith("not checked")
                    ):
                        if loaders is None:
                            loaders = Loaders(root)
                        row[f"{engine}_copy"] = (
                            _fill_check(cell.path, qc, engine, mapping_of[engine], loaders)
                            if experts.startswith("routed")
                            else _v4_fill_check(cell.path, engine, loaders)
                        )
                        if experts.startswith("routed"):
                            row[f"{engine}_linears"] = _linear_check(cell.path, engine)
                rows.append(row)
    return rows


def ssm_rows() -> list[dict]:
    """The Gated DeltaNet state shapes each engine allocates per sequence (its own shape code, tensor
    parallel size 1) against what ``convert-ssm --trim-conv`` writes for the same config."""
    import torch

    from moetool.ssm import conv_state_name, meta_from_config, recurrent_state_name
    from moetool.transforms.ssm_layout import convert_state

    cfg = {
        "model_type": "qwen3_next",
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 48,
        "linear_conv_kernel_dim": 4,
    }
    meta = meta_from_config(cfg)
    kernel = cfg["linear_conv_kernel_dim"]
    conv_dim = meta.conv_dim()
    state = {
        recurrent_state_name(0): torch.zeros(1, meta.num_value_heads, meta.head_k_dim, meta.head_v_dim),
        conv_state_name(0): torch.zeros(1, conv_dim, kernel),
    }

    def ours(conv_layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, _ = convert_state(state, meta, layout="k-last", conv_kernel_size=kernel, conv_layout=conv_layout)
        return tuple(out[recurrent_state_name(0)].shape[1:]), tuple(out[conv_state_name(0)].shape[1:])

    rows = []
    from vllm.model_executor.layers.mamba import mamba_utils as vm

    for env, conv_layout in (("SD (default)", "dim-last"), ("DS", "dim-first")):
        os.environ["VLLM_SSM_CONV_STATE_LAYOUT"] = env.split()[0]
        vm.get_conv_state_layout.cache_clear()
        conv, temporal = vm.MambaStateShapeCalculator.gated_delta_net_state_shape(1, 2, 4, 32, 48, kernel)
        rows.append(
            {
                "engine": f"vLLM, VLLM_SSM_CONV_STATE_LAYOUT={env}",
                "engine_conv": tuple(conv),
                "engine_state": tuple(temporal),
                "flags": f"--to k-last --trim-conv --conv-layout {conv_layout}",
                "ours": ours(conv_layout),
            }
        )
    os.environ.pop("VLLM_SSM_CONV_STATE_LAYOUT", None)
    import sglang.srt.configs.qwen3_next as sq

    sq._is_cpu = False  # its CPU branch asks the distributed state for a TP size; ours is 1
    sq.linear_attn_tp_size = lambda: 1
    from transformers import Qwen3NextConfig

    hf = Qwen3NextConfig(
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        **{k: v for k, v in cfg.items() if k != "model_type"},
    )
    sgl_cfg = sq.Qwen3NextConfig(**{**hf.to_dict(), "full_attention_interval": 2})
    shape = sgl_cfg.mamba2_cache_params.shape
    rows.append(
        {
            "engine": "SGLang",
            "engine_conv": tuple(shape.conv[0]),
            "engine_state": tuple(shape.temporal),
            "flags": "--to k-last --trim-conv --conv-layout dim-first",
            "ours": ours("dim-first"),
        }
    )
    for r in rows:
        r["match"] = r["ours"] == (r["engine_state"], r["engine_conv"])
        r["ours"] = [list(x) for x in r["ours"]]
        r["engine_conv"], r["engine_state"] = list(r["engine_conv"]), list(r["engine_state"])
    return rows


def ssm_markdown(rows: list[dict]) -> str:
    out = [
        "Qwen3-Next-shaped GDN layer (H=2, HV=4, K=32, V=48, kernel 4), per sequence:",
        "",
        "| engine | its recurrent state | its conv state | moetool convert-ssm | moetool's shapes | same |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['engine']} | {r['engine_state']} | {r['engine_conv']} | `{r['flags']}` | "
            f"{r['ours'][0]}, {r['ours'][1]} | {'yes' if r['match'] else 'NO'} |"
        )
    return "\n".join(out)


def _cell(r: dict, engine: str) -> str:
    """One engine's verdict on one output, in a word."""
    if r["moetool"] != "written":
        return "not written"
    config, experts = r[f"{engine}_config"], r[f"{engine}_experts"]
    if config.startswith("refused: ValueError: Unsupported activation scheme"):
        return "refused"
    if config.startswith("refused"):
        return "refused (" + config.removeprefix("refused: ")[:40] + ")"
    if experts.startswith("WRONG"):
        return "WRONG"
    copy = r.get(f"{engine}_copy", "")
    if copy.startswith("WRONG") or r.get(f"{engine}_linears", "").startswith("WRONG"):
        return "WRONG"
    if copy.startswith("copied right"):
        return "copied right"
    if experts.startswith("not checked"):
        return "config accepted"
    return "read" if experts.startswith("routed") else experts


def markdown(rows: list[dict], detail: bool = False) -> str:
    """One row per family, one column per variant: ``SGLang / vLLM`` (float and ue8m0 scales alike unless
    shown as ``float: ...; ue8m0: ...``). ``detail``: one row per output with the engines' messages."""
    out = [f"SGLang {rows[0]['sglang']}, vLLM {rows[0]['vllm']}", ""]
    if detail:
        out += [
            "| family | variant | scale | moetool | SGLang config | SGLang experts | SGLang copy | SGLang Linears "
            "| vLLM config | vLLM experts | vLLM copy | vLLM Linears |"
        ]
        out += ["| --- " * 12 + "|"]
        for r in rows:
            keys = (
                "sglang_config",
                "sglang_experts",
                "sglang_copy",
                "sglang_linears",
                "vllm_config",
                "vllm_experts",
                "vllm_copy",
                "vllm_linears",
            )
            cols = [r["moetool"][:80], *(r.get(k, "") for k in keys)]
            out.append(f"| {r['family']} | {r['variant']} | {r['scale_fmt']} | " + " | ".join(cols) + " |")
        return "\n".join(out)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out += [
        "| family | " + " | ".join(variants) + " |",
        "| --- |" + " --- |" * len(variants),
    ]
    for family in dict.fromkeys(r["family"] for r in rows):
        cols = []
        for v in variants:
            per = {
                r["scale_fmt"]: "not written"
                if r["moetool"] != "written"
                else f"{_cell(r, 'sglang')} / {_cell(r, 'vllm')}"
                for r in rows
                if (r["family"], r["variant"]) == (family, v)
            }
            vals = set(per.values())
            cols.append(vals.pop() if len(vals) == 1 else "; ".join(f"{k}: {x}" for k, x in per.items()))
        out.append(f"| {family} | " + " | ".join(cols) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetool-engines"))
    ap.add_argument("--families", default="")
    ap.add_argument(
        "--detail",
        action="store_true",
        help="one row per output, with the engines' messages",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f] or None
    if args.child:
        rows = child(args.dir, families)
        print(json.dumps({"outputs": rows, "ssm": ssm_rows()}))
        return 0
    paths = install(args.dir)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--dir",
        str(args.dir),
        "--families",
        args.families,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, ssm = result["outputs"], result["ssm"]
    print(markdown(rows, args.detail))
    print()
    print(ssm_markdown(ssm))
    bad = [
        r
        for r in rows
        if "WRONG"
        in "".join(r.get(f"{e}_{k}", "") for e in ("sglang", "vllm") for k in ("experts", "copy", "linears"))
    ]
    loadable = {"hf", "linear"}
    leaks = [
        r
        for r in rows
        if r["moetool"] == "written"
        and r["variant"] not in loadable
        and "accepted" in (r.get("sglang_config"), r.get("vllm_config"))
    ]
    for r in bad + leaks:
        print(f"PROBLEM: {r}", file=sys.stderr)
    for r in ssm:
        if not r["match"]:
            print(f"PROBLEM: {r}", file=sys.stderr)
    return 1 if bad or leaks or not all(r["match"] for r in ssm) else 0


if __name__ == "__main__":
    importlib.invalidate_caches()
    sys.exit(main())

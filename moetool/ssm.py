"""SSM (Gated DeltaNet) state files: names, header metadata, checks, atomic read and write (docs/contract.md §8).

A state file is safetensors holding, per linear-attention layer ``L``:

- ``model.layers.{L}.linear_attn.recurrent_state``: ``[N, HV, K, V]`` (k-first: transformers, fla
  default) or ``[N, HV, V, K]`` (k-last: FlashInfer, SGLang, vLLM), float32 or bfloat16; pooled files
  hold ``[P+1, HV, V, K]`` (always k-last) with row 0 all zeros, the null slot;
- ``model.layers.{L}.linear_attn.slot_ids``: int32 ``[N]``, pooled files only: sequence ``n`` lives in
  pool row ``slot_ids[n]`` (``1..P``; ``-1`` would mean "no state");
- optionally ``model.layers.{L}.linear_attn.conv_state``: ``[N, conv_dim, W]`` (``dim-first``:
  transformers, SGLang, vLLM with ``VLLM_SSM_CONV_STATE_LAYOUT=DS``) or ``[N, W, conv_dim]``
  (``dim-last``: vLLM's default ``SD`` layout, ``(state_len, dim)`` per sequence); pooled: ``[P+1, ...]``,
  same slots; ``conv_dim = 2·H·K + HV·V`` (the q, k, v channels of the short convolution, in that order)
  and ``W`` the kept input columns, oldest first (see ``trim_conv_state``).

Header metadata (all strings): ``format=moetool-ssm-state``, ``version``, ``state_layout``
(``k-first``|``k-last``), ``conv_layout`` (``dim-first``|``dim-last``; a file without it is
``dim-first``, the only conv layout moetool wrote before), ``pooled`` (``true``|``false``),
``num_key_heads``, ``num_value_heads``, ``head_k_dim``, ``head_v_dim``, ``model_type``. The layout must
always be recorded: for Qwen3-Next K = V = 128, so a k-first state read as k-last has the right shape and
decodes silently wrong. A conv_state's two orientations always differ in shape (``conv_dim`` is never
``W``), so a mislabelled conv layout is refused by the shape check, naming the label as the cause.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moetool.errors import EnvironmentError_, InputError, UsageError
from moetool.gdn import LAYOUTS, STATE_DTYPES, Layout
from moetool.io.atomic import atomic_write, fsync_dir
from moetool.io.fs import open_regular
from moetool.io.safetensors_format import MAX_HEADER_BYTES

FORMAT = "moetool-ssm-state"
FORMAT_VERSION = 1
CONV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: conv_state orientation: ``dim-first`` ``[N, conv_dim, W]``, ``dim-last`` ``[N, W, conv_dim]``
ConvLayout = Literal["dim-first", "dim-last"]
CONV_LAYOUTS: tuple[ConvLayout, ...] = ("dim-first", "dim-last")

_NAME = re.compile(r"^model\.layers\.(\d+)\.linear_attn\.(recurrent_state|conv_state|slot_ids)$")
_METADATA_KEYS = (
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
)


def recurrent_state_name(layer: int) -> str:
    return f"model.layers.{layer}.linear_attn.recurrent_state"


def conv_state_name(layer: int) -> str:
    return f"model.layers.{layer}.linear_attn.conv_state"


def slot_ids_name(layer: int) -> str:
    return f"model.layers.{layer}.linear_attn.slot_ids"


def parse_state_name(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` with kind ``recurrent_state``/``conv_state``/``slot_ids``, or None for any other
    name."""
    m = _NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class StateMeta:
    """What a state file's header says about its tensors.

    layout: ``k-first`` (``[N, HV, K, V]``) or ``k-last`` (``[N, HV, V, K]``); conv_layout: ``dim-first``
    (``[N, conv_dim, W]``) or ``dim-last`` (``[N, W, conv_dim]``); pooled: recurrent states are
    ``[P+1, HV, V, K]`` pools with ``slot_ids`` (k-last only). num_key_heads is None when unknown (a
    file without metadata read with ``assume_layout``); it is then not checked against conv_state.
    """

    layout: Layout
    num_value_heads: int
    head_k_dim: int
    head_v_dim: int
    num_key_heads: int | None = None
    pooled: bool = False
    model_type: str = "unknown"
    version: int = FORMAT_VERSION
    conv_layout: ConvLayout = "dim-first"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown state layout {self.layout!r}", fix=f"use one of {', '.join(LAYOUTS)}")
        if self.conv_layout not in CONV_LAYOUTS:
            raise InputError(
                f"unknown conv layout {self.conv_layout!r}", fix=f"use one of {', '.join(CONV_LAYOUTS)}"
            )
        if self.pooled and self.layout != "k-last":
            raise InputError("a pooled state is k-last by definition", fix="convert to k-last before pooling")
        for name in ("num_value_heads", "head_k_dim", "head_v_dim"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_key_heads is not None and (
            self.num_key_heads <= 0 or self.num_value_heads % self.num_key_heads != 0
        ):
            raise InputError(
                f"num_value_heads={self.num_value_heads} is not a multiple of num_key_heads={self.num_key_heads}"
            )

    def replace(self, **changes: object) -> StateMeta:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def state_tail(self) -> tuple[int, int, int]:
        """The last three dims of every recurrent_state: ``(HV, K, V)`` k-first, ``(HV, V, K)`` k-last."""
        if self.layout == "k-first":
            return (self.num_value_heads, self.head_k_dim, self.head_v_dim)
        return (self.num_value_heads, self.head_v_dim, self.head_k_dim)

    def conv_dim(self) -> int | None:
        """``2·H·K + HV·V`` channels of the q/k/v short convolution, None when H is unknown."""
        if self.num_key_heads is None:
            return None
        return 2 * self.num_key_heads * self.head_k_dim + self.num_value_heads * self.head_v_dim

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings only); ``num_key_heads`` only when known."""
        md = {
            "format": FORMAT,
            "version": str(self.version),
            "state_layout": self.layout,
            "conv_layout": self.conv_layout,
            "pooled": "true" if self.pooled else "false",
            "num_value_heads": str(self.num_value_heads),
            "head_k_dim": str(self.head_k_dim),
            "head_v_dim": str(self.head_v_dim),
            "model_type": self.model_type,
        }
        if self.num_key_heads is not None:
            md["num_key_heads"] = str(self.num_key_heads)
        return {key: md[key] for key in _METADATA_KEYS if key in md}


def meta_from_config(
    config: Mapping[str, object], *, layout: Layout = "k-first", pooled: bool = False
) -> StateMeta:
    """``StateMeta`` of a Qwen3-Next-style ``config.json`` (``linear_num_key_heads``,
    ``linear_num_value_heads``, ``linear_key_head_dim``, ``linear_value_head_dim``, ``model_type``)."""
    keys = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    missing = [key for key in keys if key not in config]
    if missing:
        raise InputError(
            f"config.json has no {', '.join(missing)}: not a model with Gated DeltaNet layers",
            file="config.json",
        )
    return StateMeta(
        layout=layout,
        pooled=pooled,
        num_key_heads=int(config["linear_num_key_heads"]),  # type: ignore[arg-type]
        num_value_heads=int(config["linear_num_value_heads"]),  # type: ignore[arg-type]
        head_k_dim=int(config["linear_key_head_dim"]),  # type: ignore[arg-type]
        head_v_dim=int(config["linear_value_head_dim"]),  # type: ignore[arg-type]
        model_type=str(config.get("model_type", "unknown")),
    )


def state_layers(tensors: Mapping[str, torch.Tensor]) -> list[int]:
    """Sorted layer indices that hold a recurrent_state."""
    return sorted(
        parsed[0]
        for name in tensors
        if (parsed := parse_state_name(name)) is not None and parsed[1] == "recurrent_state"
    )


def _int_field(md: Mapping[str, str], key: str, file: str) -> int | None:
    if key not in md:
        return None
    try:
        return int(md[key])
    except ValueError:
        value = md[key] if len(md[key]) <= 40 else md[key][:40] + "..."
        raise InputError(f"header metadata {key}={value!r} is not an integer", file=file) from None


def _label_hint(shape: tuple[int, ...], meta: StateMeta) -> str:
    hv, k, v = meta.num_value_heads, meta.head_k_dim, meta.head_v_dim
    other: Layout = "k-last" if meta.layout == "k-first" else "k-first"
    if k != v and tuple(shape[1:]) == meta.replace(layout=other, pooled=False).state_tail():
        return f"the shape is that of a {other} state: the layout label is wrong"
    return (
        f"expected [*, {hv}, {k if meta.layout == 'k-first' else v}, {v if meta.layout == 'k-first' else k}]"
    )


def check_state_tensors(tensors: Mapping[str, torch.Tensor], meta: StateMeta, *, file: str = "") -> int:
    """Refuse anything in ``tensors`` that contradicts ``meta`` or the format; return N (sequences).

    Checks every name, every recurrent_state's shape against the metadata (with K ≠ V a mislabelled
    layout is caught here), dtypes, finiteness, one N across layers, pooled files' zero null slot and
    slot ids, and conv_state shapes. Raises ``InputError`` naming the file, tensor and fix.
    """
    layers = state_layers(tensors)
    if not layers:
        raise InputError("holds no model.layers.{L}.linear_attn.recurrent_state tensor", file=file)
    for name in tensors:
        parsed = parse_state_name(name)
        if parsed is None:
            raise InputError(
                "is not a state tensor name",
                file=file,
                tensor=name,
                fix="a state file holds only model.layers.{L}.linear_attn.{recurrent_state,conv_state,slot_ids}",
            )
        if parsed[0] not in layers:
            raise InputError("has no recurrent_state beside it", file=file, tensor=name)

    n_seq: int | None = None
    rows: int | None = None
    for layer in layers:
        name = recurrent_state_name(layer)
        state = tensors[name]
        if state.dim() != 4 or tuple(state.shape[1:]) != meta.state_tail():
            raise InputError(
                f"shape {list(state.shape)} contradicts the metadata ({meta.layout}, HV={meta.num_value_heads}, "
                f"K={meta.head_k_dim}, V={meta.head_v_dim}, pooled={meta.pooled})",
                file=file,
                tensor=name,
                fix=_label_hint(tuple(state.shape), meta),
            )
        if state.dtype not in STATE_DTYPES:
            raise InputError(
                f"dtype {state.dtype} is not float32 or bfloat16",
                file=file,
                tensor=name,
                fix="convert with --dtype float32",
            )
        if not bool(torch.isfinite(state).all()):
            raise InputError(
                "holds NaN or Inf", file=file, tensor=name, fix="the state was corrupted upstream"
            )
        if rows is not None and state.shape[0] != rows:
            raise InputError(
                f"has {state.shape[0]} rows where earlier layers have {rows}", file=file, tensor=name
            )
        rows = state.shape[0]

        ids_name = slot_ids_name(layer)
        if meta.pooled:
            if ids_name not in tensors:
                raise InputError("is missing from a pooled state file", file=file, tensor=ids_name)
            ids = tensors[ids_name]
            if ids.dtype != torch.int32 or ids.dim() != 1:
                raise InputError(
                    f"expected int32 [N], got {ids.dtype} {list(ids.shape)}", file=file, tensor=ids_name
                )
            if rows < 1 or bool(state[0].any()):
                raise InputError("pool row 0 (the null slot) is not all zeros", file=file, tensor=name)
            live = ids[ids >= 0].to(torch.int64)
            if bool(((ids < -1) | (ids == 0) | (ids >= rows)).any()):
                raise InputError(f"slot ids must lie in [1, {rows - 1}] (or -1)", file=file, tensor=ids_name)
            if int(torch.unique(live).numel()) != int(live.numel()):
                raise InputError("a slot id appears twice", file=file, tensor=ids_name)
            count = ids.shape[0]
        else:
            if ids_name in tensors:
                raise InputError(
                    "slot ids in a file whose metadata says pooled=false", file=file, tensor=ids_name
                )
            count = rows
        if n_seq is not None and count != n_seq:
            raise InputError(
                f"holds {count} sequences where earlier layers hold {n_seq}", file=file, tensor=name
            )
        n_seq = count

        conv_name = conv_state_name(layer)
        if conv_name in tensors:
            conv = tensors[conv_name]
            conv_dim = meta.conv_dim()
            dim_axis = 1 if meta.conv_layout == "dim-first" else 2
            if (
                conv.dim() != 3
                or conv.shape[0] != rows
                or (conv_dim is not None and conv.shape[dim_axis] != conv_dim)
            ):
                d = conv_dim if conv_dim is not None else "conv_dim"
                want = f"[{rows}, {d}, W]" if meta.conv_layout == "dim-first" else f"[{rows}, W, {d}]"
                hint = ""
                if conv.dim() == 3 and conv.shape[0] == rows and conv.shape[3 - dim_axis] == conv_dim:
                    other = "dim-last" if meta.conv_layout == "dim-first" else "dim-first"
                    hint = f": the shape is that of a {other} conv_state, the conv_layout label is wrong"
                raise InputError(
                    f"expected {want} ({meta.conv_layout}), got {list(conv.shape)}{hint}",
                    file=file,
                    tensor=conv_name,
                )
            if conv.dtype not in CONV_DTYPES:
                raise InputError(f"dtype {conv.dtype} is not a float type", file=file, tensor=conv_name)
            if meta.pooled and bool(conv[0].any()):
                raise InputError("pool row 0 (the null slot) is not all zeros", file=file, tensor=conv_name)
    assert n_seq is not None
    return n_seq


def _meta_from_header(
    md: Mapping[str, str], tensors: Mapping[str, torch.Tensor], file: str, assume_layout: Layout | None
) -> StateMeta:
    has_meta = md.get("format") == FORMAT and "state_layout" in md
    if not has_meta:
        if assume_layout is None:
            raise UsageError(
                "has no moetool state-layout metadata, so k-first and k-last cannot be told apart",
                file=file,
                fix="say which it is with --assume-layout k-first|k-last",
            )
        layout = assume_layout
    else:
        layout = md["state_layout"]  # type: ignore[assignment]
        if layout not in LAYOUTS:
            raise InputError(f"header metadata state_layout={layout!r} is not k-first or k-last", file=file)
        if assume_layout is not None and assume_layout != layout:
            raise UsageError(
                f"the file says state_layout={layout}, which contradicts --assume-layout {assume_layout}",
                file=file,
                fix="drop --assume-layout: the file's own label is authoritative",
            )
    version = _int_field(md, "version", file) if has_meta else FORMAT_VERSION
    if version is None or version > FORMAT_VERSION:
        raise InputError(
            f"state file format version {md.get('version')!r} is not supported (this moetool reads up to "
            f"{FORMAT_VERSION})",
            file=file,
            fix="upgrade moetool",
        )

    layers = state_layers(tensors)
    if not layers:
        raise InputError("holds no model.layers.{L}.linear_attn.recurrent_state tensor", file=file)
    first = tensors[recurrent_state_name(layers[0])]
    if first.dim() != 4:
        raise InputError(
            f"expected a 4-D state, got shape {list(first.shape)}",
            file=file,
            tensor=recurrent_state_name(layers[0]),
        )
    hv, d2, d3 = (int(x) for x in first.shape[1:])
    k_dim, v_dim = (d2, d3) if layout == "k-first" else (d3, d2)
    conv_layout = md.get("conv_layout", "dim-first") if has_meta else "dim-first"
    if conv_layout not in CONV_LAYOUTS:
        raise InputError(
            f"header metadata conv_layout={conv_layout[:40]!r} is not dim-first or dim-last", file=file
        )
    pooled_md = md.get("pooled") if has_meta else None
    if pooled_md is None:
        pooled = slot_ids_name(layers[0]) in tensors
    elif pooled_md in ("true", "false"):
        pooled = pooled_md == "true"
    else:
        raise InputError(f"header metadata pooled={pooled_md!r} is not true or false", file=file)
    try:
        return StateMeta(
            layout=layout,  # type: ignore[arg-type]
            pooled=pooled,
            num_key_heads=_int_field(md, "num_key_heads", file) if has_meta else None,
            num_value_heads=(_int_field(md, "num_value_heads", file) if has_meta else None) or hv,
            head_k_dim=(_int_field(md, "head_k_dim", file) if has_meta else None) or k_dim,
            head_v_dim=(_int_field(md, "head_v_dim", file) if has_meta else None) or v_dim,
            model_type=md.get("model_type", "unknown") if has_meta else "unknown",
            version=version,
            conv_layout=conv_layout,  # type: ignore[arg-type]
        )
    except InputError as err:
        if err.file:
            raise
        # StateMeta's own checks do not know the file; the header they reject is this one
        raise InputError(f"header metadata: {err.message}", file=file, fix=err.fix) from None


def read_state_file(
    path: str | os.PathLike[str], *, assume_layout: Layout | None = None
) -> tuple[dict[str, torch.Tensor], StateMeta]:
    """Load and check a state file; returns its tensors (CPU) and metadata.

    A file without moetool layout metadata is refused (``UsageError``) unless ``assume_layout`` says
    which layout it holds; then the head dims come from the shapes and num_key_heads stays unknown.
    ``assume_layout`` contradicting the file's own label is refused too. Every tensor is checked
    against the metadata (``check_state_tensors``).
    """
    file = str(path)
    if not os.path.lexists(file):
        raise InputError("no such file", file=file)
    os.close(open_regular(file, what="state file"))  # a FIFO or a device would block or never end
    try:
        with safe_open(file, framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"is not a readable safetensors file ({err})", file=file) from err
    meta = _meta_from_header(md, tensors, file, assume_layout)
    check_state_tensors(tensors, meta, file=file)
    return tensors, meta


def read_state_header(path: str | os.PathLike[str]) -> dict[str, object]:
    """The raw safetensors JSON header (tensor entries and ``__metadata__``), without loading tensors.

    Bounded like every header moetool reads: a length past the file or over safetensors' 100 MB limit,
    bytes that are not a JSON object, or nesting deep enough to exhaust the parser is an ``InputError``
    naming the file.
    """
    file = str(path)
    fd = open_regular(file, what="state file")
    try:
        with open(fd, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little")
            if len(head) < 8 or size > MAX_HEADER_BYTES or 8 + size > os.fstat(f.fileno()).st_size:
                raise InputError("is not a safetensors file (bad header length)", file=file)
            raw = f.read(size)
    except OSError as err:
        raise InputError(f"cannot be read ({err.strerror})", file=file) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError("has a header that is not valid JSON", file=file) from None
    if not isinstance(header, dict):
        raise InputError("has a header that is not a JSON object", file=file)
    return header


def _verify_written(tmp: str, tensors: Mapping[str, torch.Tensor], meta: StateMeta) -> None:
    with safe_open(tmp, framework="pt") as f:
        if dict(f.metadata() or {}) != meta.to_metadata():
            raise OSError("header metadata read back differs from what was written")
        if set(f.keys()) != set(tensors):
            raise OSError("tensor names read back differ from what was written")
        for name, expected in tensors.items():
            got = f.get_tensor(name)
            if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(got, expected):
                raise OSError(f"tensor {name} read back differs from what was written")


def write_state_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    meta: StateMeta,
    *,
    overwrite: bool = False,
) -> None:
    """Check ``tensors`` against ``meta``, then write them atomically with ``meta`` as header metadata.

    The bytes go to a temporary file in the destination folder, are fsynced, re-opened and compared
    with what was meant, and only then renamed over ``path``: a failure at any point leaves no file at
    ``path`` (and an existing one untouched). An existing ``path`` is refused unless ``overwrite``.
    """
    file = str(path)
    folder = os.path.dirname(os.path.abspath(file))
    if os.path.lexists(file) and not overwrite:
        raise UsageError("exists already", file=file, fix="pass --overwrite or choose another OUT")
    if not os.path.isdir(folder):
        raise UsageError("the folder to write into does not exist", file=file)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    check_state_tensors(cpu, meta, file=file)

    try:
        with atomic_write(file, fsync=True) as t:
            t.file.close()  # safetensors writes the file by its name
            save_file(cpu, str(t.path), metadata=meta.to_metadata())
            _verify_written(str(t.path), cpu, meta)
        fsync_dir(folder)
    except (OSError, SafetensorError) as err:
        raise EnvironmentError_(
            f"writing the state file failed ({err})", file=file, fix="check free space and permissions"
        ) from err

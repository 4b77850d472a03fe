"""Checkpoint I/O: safetensors headers, lazy reading, atomic writing, index and manifest.

The names below are imported on first use, so that a torch-free module of this package
(``moetool.io.hashing``, ``moetool.io.fs``) can be imported without torch: ``validate`` starts hashing
the converted files before the interpreter has finished importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "INDEX_NAME": "checkpoint",
    "MANIFEST_NAME": "fs",
    "Checkpoint": "checkpoint",
    "read_json": "checkpoint",
    "sha256_file": "hashing",
    "DTYPE_NAMES": "safetensors_format",
    "DTYPES": "safetensors_format",
    "TensorInfo": "safetensors_format",
    "build_header": "safetensors_format",
    "read_header": "safetensors_format",
    "OutputDir": "writer",
    "ShardWriter": "writer",
    "write_index": "writer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""Checkpoint I/O: safetensors headers, lazy reading, atomic writing, index and manifest."""

from moetool.io.checkpoint import INDEX_NAME, MANIFEST_NAME, Checkpoint, read_json
from moetool.io.hashing import sha256_file
from moetool.io.safetensors_format import DTYPE_NAMES, DTYPES, TensorInfo, build_header, read_header
from moetool.io.writer import OutputDir, ShardWriter, write_index

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "Checkpoint",
    "OutputDir",
    "ShardWriter",
    "TensorInfo",
    "build_header",
    "read_header",
    "read_json",
    "sha256_file",
    "write_index",
]

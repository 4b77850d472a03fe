"""Checkpoints for tests, the demo and the benchmarks, written the way their makers write them.

This package is an oracle for the rest of moetool: it knows each family from its own tables
(``families.py``), read from transformers' modeling files, and never imports ``moetool.arch`` or reads
``configs/``. A mistake in ``configs/<family>.toml`` then shows up as a test failure instead of being
copied into the fixtures that test it. It may use the kernels' torch references (``fp8.py`` says why)
and nothing else of moetool but its errors — save the benchmark-sized DeepSeek-V4 release
(``release_formats.write_v4_synthetic``, an input for scripts, never for tests), which streams its
shards through ``moetool.io``'s writer.

- ``factory.py``: ``make_checkpoint`` — a family's checkpoint of any size, seeded, optionally packed,
  FP8 or sharded; the one import most callers need (it re-exports the names below).
- ``families.py``: the tables of families and their naming rules; adding a family is one entry.
- ``names.py`` / ``specs.py``: tensor names and which tensors a checkpoint holds.
- ``tensors.py``: seeded values, chunk by chunk.
- ``files.py``: safetensors, shards, index and JSON, written independently of ``moetool.io``.
- ``fp8.py``: the DeepSeek-V3 block-FP8 release format; other release formats get a module alike.
- ``tokenizer.py``: a tokenizer and the other non-weight files.
- ``hf_models.py``: the same checkpoints written by transformers' own classes (the reference).
- ``triton_stub.py``: Triton's dispatch without a GPU (a stand-in driver and compiled kernels), for the
  kernel launcher's tests and host-cost script.
"""

#!/usr/bin/env bash
# Assembles transformers' FP8 Triton kernel, kernels-community/finegrained-fp8, as a local kernel folder
# for a machine that cannot reach the Hugging Face Hub (the GPU machine):
#   bash scripts/assemble_hub_kernels.sh [DEST]          (DEST: .hubkernels, git-ignored)
# then carry DEST to the GPU machine; scripts/gpu_suite.sh points LOCAL_KERNELS at it.
#
# What transformers 5.24 asks for: `lazy_load_kernel("finegrained-fp8")` ->
# kernels.get_kernel("kernels-community/finegrained-fp8", version=4) (integrations/hub_kernels.py,
# _HUB_KERNEL_MAPPING), and it uses matmul_2d, matmul_batched and matmul_grouped
# (integrations/finegrained_fp8.py). Version 4 is the kernel's build.toml `version` from its source commit
# 93d7641 on; COMMIT below is the newest commit of that version's source (finegrained-fp8/ in
# github.com/huggingface/kernels-community). The kernel is pure Python (Triton), so the folder is the
# source package plus what the kernel builder adds to a noarch build: `_ops.py` (the torch.ops namespace
# the package registers its ops in) and `metadata.json`. That is the layout `kernels` loads a local kernel
# from (LOCAL_KERNELS=kernels-community/finegrained-fp8=DEST/finegrained-fp8). transformers 5.24 accepts
# only kernels >= 0.18.2, < 0.19; where no such release is installed tests/test_engine_gpu.py imports
# the same folder itself and hands it to transformers.
#
# The source is fetched with git (KERNELS_COMMUNITY_REPO: another URL or a local clone holding COMMIT).
# Nothing of it is committed to this repository.
set -euo pipefail
COMMIT=1994f2b5518dabf3a305c785ab05ac25fb28ddda
VERSION=4
REPO="${KERNELS_COMMUNITY_REPO:-https://github.com/huggingface/kernels-community}"
DEST="${1:-.hubkernels}"
out="$DEST/finegrained-fp8"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

git init -q "$tmp/src"
git -C "$tmp/src" fetch -q --depth 1 "$REPO" "$COMMIT"
version="$(git -C "$tmp/src" show "$COMMIT:finegrained-fp8/build.toml" | sed -n 's/^version = \([0-9]*\)$/\1/p')"
[ "$version" = "$VERSION" ] || { echo "finegrained-fp8 at $COMMIT is version '$version', not $VERSION" >&2; exit 2; }
git -C "$tmp/src" archive "$COMMIT" finegrained-fp8/torch-ext/finegrained_fp8 | tar -x -C "$tmp"

stage="$tmp/finegrained-fp8/torch-ext/finegrained_fp8"
id="_finegrained_fp8_cuda_${COMMIT:0:7}"
cat >"$stage/_ops.py" <<EOF
# written by moetool's scripts/assemble_hub_kernels.sh: the torch.ops namespace of this build
import torch

_OPS_NAME = "_finegrained_fp8_" + ("rocm" if torch.version.hip else "cuda" if torch.version.cuda else "cpu") + "_${COMMIT:0:7}"
ops = getattr(torch.ops, _OPS_NAME)


def add_op_namespace_prefix(op_name: str) -> str:
    return f"{_OPS_NAME}::{op_name}"
EOF
cat >"$stage/metadata.json" <<EOF
{
  "name": "finegrained-fp8",
  "id": "$id",
  "version": $VERSION,
  "license": "Apache-2.0",
  "source": "https://github.com/huggingface/kernels-community",
  "python-depends": [],
  "backend": {"type": "cuda"}
}
EOF
echo "kernels-community/finegrained-fp8 version $VERSION: finegrained-fp8/torch-ext/finegrained_fp8 at $COMMIT" >"$stage/SOURCE"
mkdir -p "$DEST"
rm -rf "$out"
cp -r "$stage" "$out"
echo "$out: kernels-community/finegrained-fp8 version $VERSION at $COMMIT ($(du -sh "$out" | cut -f1))"

#!/usr/bin/env bash
# The main job on a built-in tiny DeepSeek-V3-style checkpoint: inspect -> quantize -> fuse-shared -> validate.
# Usage: bash scripts/demo.sh [WORKDIR]   (default ./demo-out; recreated on every run)
set -euo pipefail
dir="${1:-demo-out}"
rm -rf "$dir"
mkdir -p "$dir"
python - "$dir/model" <<'PY'
import sys
from moetool.testing.factory import make_checkpoint
make_checkpoint("deepseek_v3", sys.argv[1], num_layers=3, hidden_size=512, moe_intermediate_size=256,
                num_experts=16, top_k=4, seed=0)
PY
set -x
moetool inspect "$dir/model"
moetool quantize "$dir/model" "$dir/fp8" --layout deepgemm --scale-fmt ue8m0
moetool fuse-shared "$dir/fp8" "$dir/fp8-fused"
moetool validate "$dir/model" "$dir/fp8-fused" --report "$dir/validate.json"

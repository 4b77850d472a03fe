#!/usr/bin/env bash
# GPU quantize on one GPU, on two (--devices cuda:0,cuda:1) and under torchrun with two ranks, on the
# same synthetic checkpoint as bench_quantize_gpu.sh; checks the three outputs are byte-identical.
# Usage: bash scripts/bench_multi_gpu.sh [WORKDIR] [EXPERTS] [MAX_SHARD_SIZE]
set -euo pipefail
dir="${1:-/tmp/moetool-bench}"
experts="${2:-56}"
shard="${3:-5GB}"
mkdir -p "$dir"
if [ ! -f "$dir/src/config.json" ]; then
  rm -rf "$dir/src"
  python3 scripts/make_synthetic.py --family deepseek_v3 --out "$dir/src" --layers 4 --experts "$experts" \
    --max-shard-size 5GB -q
fi
cat "$dir"/src/*.safetensors >/dev/null
secs() { python3 -c 'import time; print(f"{time.perf_counter():.3f}")'; }
run() {  # name, command...
  local name=$1; shift
  rm -rf "$dir/$name"; sync
  local t0; t0=$(secs); "$@" >/dev/null; sync; local t1; t1=$(secs)
  echo "$name $(python3 -c "print(f'{$t1-$t0:.2f}')")"
}
{
  run one moetool quantize "$dir/src" "$dir/one" --layout deepgemm --device cuda:0 --max-shard-size "$shard" -q
  run two moetool quantize "$dir/src" "$dir/two" --layout deepgemm --devices cuda:0,cuda:1 --max-shard-size "$shard" -q
  run ranks torchrun --nproc-per-node 2 -m moetool quantize "$dir/src" "$dir/ranks" --layout deepgemm --max-shard-size "$shard" -q
} | tee "$dir/multi.txt"
for other in two ranks; do
  for f in "$dir"/one/*.safetensors "$dir/one/config.json" "$dir/one/model.safetensors.index.json"; do
    cmp -s "$f" "$dir/$other/$(basename "$f")" || { echo "DIFFERENT: $other/$(basename "$f")"; exit 1; }
  done
done
echo "outputs byte-identical (1 GPU, 2 GPUs, 2 ranks); max shard size $shard"
rm -rf "$dir/two" "$dir/ranks"

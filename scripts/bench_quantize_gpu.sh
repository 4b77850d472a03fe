#!/usr/bin/env bash
# GPU quantize of a >= 20 GB synthetic DeepSeek-V3-style checkpoint against `cp -r` of the same
# checkpoint on the same machine, in the same run (docs/contract.md §11: bar <= 1.0x).
# Usage: bash scripts/bench_quantize_gpu.sh [WORKDIR] [EXPERTS]   (DeepSeek-V3 dims:
# 4 MoE layers x 56 experts of 3 x 2048x7168 BF16, plus embeddings, make ~23 GB)
set -euo pipefail
dir="${1:-/tmp/moetool-bench}"
experts="${2:-56}"
mkdir -p "$dir"
if [ ! -f "$dir/src/config.json" ]; then
  rm -rf "$dir/src"
  python3 scripts/make_synthetic.py --family deepseek_v3 --out "$dir/src" --layers 4 --experts "$experts" --max-shard-size 5GB -q
fi
sync
du -sh "$dir/src"
cat "$dir"/src/*.safetensors >/dev/null  # same page-cache state for both commands: input cached
secs() { python3 -c 'import time; print(f"{time.perf_counter():.3f}")'; }
best_cp=""; best_q=""
for i in 1 2; do
  rm -rf "$dir/cp" "$dir/q"; sync
  t0=$(secs); cp -r "$dir/src" "$dir/cp"; sync; t1=$(secs)
  rm -rf "$dir/cp"; sync
  t2=$(secs); moetool quantize "$dir/src" "$dir/q" --layout deepgemm --device cuda -q >/dev/null; sync; t3=$(secs)
  cp_s=$(python3 -c "print(f'{$t1-$t0:.2f}')"); q_s=$(python3 -c "print(f'{$t3-$t2:.2f}')")
  echo "run $i: cp -r + sync ${cp_s}s   moetool quantize --layout deepgemm --device cuda + sync ${q_s}s   ratio $(python3 -c "print(f'{$q_s/$cp_s:.2f}')")"
  best_cp="$best_cp $cp_s"; best_q="$best_q $q_s"
done
in_gb=$(python3 -c "import os,glob; print(f'{sum(os.path.getsize(p) for p in glob.glob(\"$dir/src/*.safetensors\"))/1e9:.2f}')")
python3 - "$in_gb" $best_cp -- $best_q <<'PY'
import statistics, sys
args = sys.argv[2:]
cut = args.index("--")
cp = [float(x) for x in args[:cut]]
q = [float(x) for x in args[cut + 1:]]
gb = float(sys.argv[1])
mc, mq = statistics.median(cp), statistics.median(q)
print(f"input {gb:.2f} GB BF16 | cp -r {mc:.2f}s ({gb / mc:.2f} GB/s) | quantize {mq:.2f}s ({gb / mq:.2f} GB/s of input)"
      f" | ratio {mq / mc:.2f} (bar <= 1.0: {'PASS' if mq / mc <= 1.0 else 'FAIL'})")
PY

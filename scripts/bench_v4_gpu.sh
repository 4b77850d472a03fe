#!/usr/bin/env bash
# DeepSeek-V4 on the GPU: a >= 20 GB V4-Flash-shaped release checkpoint (FP4 experts) made by
# scripts/make_synthetic.py, then `moetool quantize --device cuda` (FP4 -> FP8, deepgemm layout) against
# `cp -r` + sync of the same checkpoint in the same run, then `moetool validate` on the result.
# Usage: bash scripts/bench_v4_gpu.sh [WORKDIR] [SIZE_GB]
# Note: the FP8 output is twice the FP4 input's bytes, where cp writes once the input's.
set -euo pipefail
dir="${1:-/tmp/moetool-v4}"
size="${2:-20}"
mkdir -p "$dir"
if [ ! -f "$dir/src/config.json" ]; then
  rm -rf "$dir/src"
  python3 scripts/make_synthetic.py --family deepseek_v4 --size-gb "$size" --out "$dir/src" -q
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
  t2=$(secs); moetool quantize "$dir/src" "$dir/q" --layout deepgemm --device cuda --json -q >"$dir/quantize.json"; sync; t3=$(secs)
  cp_s=$(python3 -c "print(f'{$t1-$t0:.2f}')"); q_s=$(python3 -c "print(f'{$t3-$t2:.2f}')")
  echo "run $i: cp -r + sync ${cp_s}s   moetool quantize --layout deepgemm --device cuda + sync ${q_s}s   ratio $(python3 -c "print(f'{$q_s/$cp_s:.2f}')")"
  best_cp="$best_cp $cp_s"; best_q="$best_q $q_s"
done
python3 -c "import json; print('lossy FP4 blocks:', json.load(open('$dir/quantize.json'))['fp4_lossy_blocks'])"
in_gb=$(python3 -c "import os,glob; print(f'{sum(os.path.getsize(p) for p in glob.glob(\"$dir/src/*.safetensors\"))/1e9:.2f}')")
out_gb=$(python3 -c "import os,glob; print(f'{sum(os.path.getsize(p) for p in glob.glob(\"$dir/q/*.safetensors\"))/1e9:.2f}')")
python3 - "$in_gb" "$out_gb" $best_cp -- $best_q <<'PY'
import statistics, sys
args = sys.argv[3:]
cut = args.index("--")
cp = [float(x) for x in args[:cut]]
q = [float(x) for x in args[cut + 1:]]
gb, out_gb = float(sys.argv[1]), float(sys.argv[2])
mc, mq = statistics.median(cp), statistics.median(q)
print(f"input {gb:.2f} GB (FP4 experts), output {out_gb:.2f} GB | cp -r {mc:.2f}s ({gb / mc:.2f} GB/s) | "
      f"quantize {mq:.2f}s ({gb / mq:.2f} GB/s of input, {out_gb / mq:.2f} GB/s written) | "
      f"ratio {mq / mc:.2f} (bar <= 1.0: {'PASS' if mq / mc <= 1.0 else 'FAIL'})")
PY
cat "$dir"/src/*.safetensors "$dir"/q/*.safetensors >/dev/null
t0=$(secs); cat "$dir"/src/*.safetensors "$dir"/q/*.safetensors >/dev/null; t1=$(secs)
t2=$(secs); rc=0; moetool validate "$dir/src" "$dir/q" --device cuda --report "$dir/validate.json" -q || rc=$?; t3=$(secs)
python3 -c "print(f'validate rc=$rc: {$t3-$t2:.2f}s, reading both once (cat) {$t1-$t0:.2f}s, ratio {($t3-$t2)/($t1-$t0):.2f}')"

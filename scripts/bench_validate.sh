#!/usr/bin/env bash
# `moetool validate` with all checks against reading both checkpoints once (`cat` to /dev/null), same run
# (BENCHMARKS.md: bar <= 3x). Expects scripts/bench_quantize_gpu.sh to have left WORKDIR/src and WORKDIR/q.
set -euo pipefail
dir="${1:-/tmp/moetool-bench}"
secs() { python3 -c 'import time; print(f"{time.perf_counter():.3f}")'; }
t0=$(secs); cat "$dir"/src/*.safetensors "$dir"/q/*.safetensors >/dev/null; t1=$(secs)
rc=0
t2=$(secs); moetool validate "$dir/src" "$dir/q" --report "$dir/validate.json" > "$dir/validate.txt" || rc=$?; t3=$(secs)
tail -n 5 "$dir/validate.txt"
python3 -c "c=$t1-$t0; v=$t3-$t2; print(f'cat both {c:.2f}s | validate {v:.2f}s (exit $rc) | ratio {v/c:.2f} (bar <= 3.0: ' + ('PASS' if v/c <= 3 else 'FAIL') + ')')"

#!/usr/bin/env bash
# `moetool validate` with every check on (default options) against reading both checkpoints once
# (`cat` of their shards to /dev/null, page cache warm), paired in one run (docs/contract.md §11: bar <= 2.0x).
#
# Usage: bash scripts/bench_validate.sh [WORKDIR] [-n ROUNDS] [-- EXTRA VALIDATE OPTIONS]
#   WORKDIR holds src/ (the original) and q/ (its quantized output), as scripts/bench_quantize_gpu.sh
#   leaves them (default /tmp/moetool-bench). One warm-up round (page cache; Triton's kernel cache),
#   then ROUNDS (default 3) rounds of `cat` then `validate`, each timed by GNU time -v as a whole
#   process. Prints each round, the medians, the ratio (median of the per-round ratios) and the verdict,
#   then where validate's time went (the last round's --report JSON: seconds per stage, bytes read).
#   A round counts only when validate passes (exit 0).
set -euo pipefail
dir=/tmp/moetool-bench
rounds=3
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n) rounds="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) dir="$1"; shift ;;
  esac
done
for d in "$dir/src" "$dir/q"; do
  [ -f "$d/config.json" ] || { echo "missing $d (run scripts/bench_quantize_gpu.sh first)" >&2; exit 2; }
done
[ -x /usr/bin/time ] || { echo "needs GNU time at /usr/bin/time (apt-get install time)" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "cores $(nproc) | original $(du -shL "$dir/src" | cut -f1) | converted $(du -shL "$dir/q" | cut -f1)"

log="$dir/bench-validate"
mkdir -p "$log"
# whole-process wall seconds, peak RSS (MiB) and exit status from a GNU time -v file
parse() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
h, m, s = wall.groups()
secs = int(h or 0) * 3600 + int(m) * 60 + float(s)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
code = int(re.search(r"Exit status: (\d+)", text).group(1))
print(f"{secs:.2f} {rss:.0f} {code}")
PY
}
cat_once() {
  /usr/bin/time -v -o "$log/time-cat" sh -c 'cat "$1"/src/*.safetensors "$1"/q/*.safetensors > /dev/null' _ "$dir"
  parse "$log/time-cat"
}
validate_once() {
  /usr/bin/time -v -o "$log/time-validate" moetool validate "$dir/src" "$dir/q" \
    --report "$log/report.json" ${extra[@]+"${extra[@]}"} > "$log/validate.txt" 2> "$log/validate.err" || true
  parse "$log/time-validate"
}

cat_once > /dev/null
read -r _ _ code < <(validate_once)
[ "$code" = 0 ] || { echo "validate failed in the warm-up round (exit $code):" >&2; tail -n 5 "$log/validate.txt" "$log/validate.err" >&2; exit 1; }
printf '%-6s %10s %12s %8s %14s\n' round "cat s" "validate s" ratio "validate MiB"
results=()
for i in $(seq 1 "$rounds"); do
  read -r c_s _ _ < <(cat_once)
  read -r v_s v_rss code < <(validate_once)
  if [ "$code" != 0 ]; then
    echo "validate exited $code in round $i: figures do not count" >&2
    tail -n 5 "$log/validate.txt" >&2
    exit 1
  fi
  printf '%-6s %10s %12s %8s %14s\n' "$i" "$c_s" "$v_s" "$(python3 -c "print(f'{$v_s / max($c_s, 0.01):.2f}')")" "$v_rss"
  results+=("$c_s,$v_s")
done
tail -n 1 "$log/validate.txt"
python3 - "$log/report.json" "${results[@]}" <<'PY'
import json, statistics, sys
pairs = [tuple(float(x) for x in p.split(",")) for p in sys.argv[2:]]
cat = statistics.median(c for c, _ in pairs)
val = statistics.median(v for _, v in pairs)
ratio = statistics.median(v / max(c, 0.01) for c, v in pairs)  # GNU time counts in 10 ms
verdict = "PASS" if ratio <= 2.0 else "FAIL"
print(f"median: cat both {cat:.2f}s | validate {val:.2f}s | ratio {ratio:.2f} (bar <= 2.0: {verdict})")
report = json.load(open(sys.argv[1]))
t = report.get("timings", {})
print("validate, last round (s; stages overlap): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
io = report.get("io", {})
if io:
    print(
        "bytes read per checkpoint byte: "
        + ", ".join(f"{s} {io[f'{s}_read'] / max(io[f'{s}_bytes'], 1):.3f}" for s in ("original", "converted"))
        + f"; sha256 of the converted files: {io.get('converted_hashed_from_reads', 0) / 1e9:.2f} GB from the"
        + f" checks' reads, {io.get('hash_read', 0) / 1e9:.3f} GB read itself"
        + f"; read buffers {io['buffer_bytes'] / 2**30:.2f} GiB"
    )
tl = report.get("timeline", {})
if tl:
    from moetool.cli.validate import timeline_lines

    print("\n".join(timeline_lines(tl)))
    if tl.get("pass_started") is not None and "total" in t:
        after = pairs[-1][1] - tl["pass_started"] - t["total"]
        print(f"after the pass (report written, process exit), last round: {after:.2f} s")
PY

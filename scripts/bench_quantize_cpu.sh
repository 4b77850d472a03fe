#!/usr/bin/env bash
# CPU speed and peak memory of `moetool quantize` against its anchors, measured in the same run on the
# same checkpoint, against the project's performance bars:
#   (a) llm-compressor `model_free_ptq(scheme="FP8_BLOCK")`: ours >= 3x faster, peak RSS below it;
#   (b) `cp -r` of the checkpoint: ours <= 1.5x its time, each command timed with the `sync` that puts
#       its output on disk (as the GPU bar is measured); the figure with both outputs left in the page
#       cache is printed beside it;
#   (c) peak RSS <= largest tensor x 4 + 1 GB.
#
# Method: whole commands under /usr/bin/time -v (wall clock and maximum resident set size), RUNS timed
# rounds after one untimed warm-up round; each round runs every command once, in turn, so a drift in
# machine speed touches all of them alike. The input is read once beforehand and stays in the page cache
# (every figure is "input cached"); before each run the output is removed and `sync` (untimed) flushes
# what the previous command left dirty, so every command starts from the same state. By default neither
# moetool nor llm-compressor nor cp syncs its output to disk; `... && sync` variants of moetool and cp
# time the output reaching the disk, and `moetool quantize --fsync` (fsync per file) is timed against
# `cp -r && sync` too. Figures are medians; ratios are medians of ratios of runs in the same round.
# The timed `sync` is of the output's own files and folder (coreutils `sync FILE...`: an fsync each), so
# that what other processes leave dirty on a shared machine is not counted.
#
# llm-compressor lives in its own virtual environment (--llmc-python, made under WORK when absent) so it
# cannot disturb the project's packages. It quantizes the same tensors as `--targets experts` (routed and
# shared experts, 128x128 blocks); its scales are stored as BF16 `weight_scale`, ours as F32
# `weight_scale_inv`, and it writes shards per input shard, ours per --max-shard-size.
#
# Usage: bash scripts/bench_quantize_cpu.sh [-n RUNS] [--src DIR] [--work DIR] [--llmc-python PATH]
#   --src DIR          checkpoint to quantize (default: WORK/dsv3, made by scripts/make_synthetic.py:
#                      DeepSeek-V3 dims, 2 MoE layers x 8 routed + 1 shared expert, 2.58 GB BF16, 1GB shards)
#   --work DIR         scratch directory for outputs and the venv (default /tmp/moetool-bench-cpu)
#   --llmc-python PATH a python with llmcompressor installed (default: WORK/llmc-venv, made on demand with
#                      `pip install llmcompressor torch==<the project's torch version>`)
#   -n RUNS            timed rounds (default 3)
#   --copy-bar         only the copy bar: `quantize --layout deepgemm && sync` against `cp -r && sync`,
#                      in turn, RUNS rounds (min / median / max of the ratios); no llm-compressor needed
set -euo pipefail

runs=3
work=/tmp/moetool-bench-cpu
src=""
llmc_py=""
copy_bar=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) runs="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --llmc-python) llmc_py="$2"; shift 2 ;;
    --copy-bar) copy_bar=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_quantize_cpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "bench_quantize_cpu.sh: error: $*" >&2; exit 1; }
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) is needed: apt-get install time"
command -v moetool >/dev/null || die "moetool is not on PATH: pip install -e . in the repository"
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
work=$(cd "$work" && pwd)

if [ -z "$src" ]; then
  src="$work/dsv3"
  if [ ! -f "$src/config.json" ]; then
    echo "making $src (about a minute)" >&2
    python "$repo/scripts/make_synthetic.py" --family deepseek_v3 --layers 2 --experts 8 --vocab 8704 \
      --max-shard-size 1GB --out "$src" --overwrite -q >/dev/null
  fi
fi
[ -f "$src/config.json" ] || die "$src holds no config.json"
src=$(cd "$src" && pwd)

if [ "$copy_bar" = 1 ]; then
  llmc_py=$(command -v python)  # not run
elif [ -z "$llmc_py" ]; then
  llmc_py="$work/llmc-venv/bin/python"
  if ! "$llmc_py" -c "import llmcompressor" >/dev/null 2>&1; then
    torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
    echo "installing llm-compressor into $work/llmc-venv (torch==$torch_version)" >&2
    python -m venv "$work/llmc-venv"
    "$work/llmc-venv/bin/pip" install -q "torch==$torch_version" llmcompressor >&2
  fi
fi
[ "$copy_bar" = 1 ] || "$llmc_py" -c "import llmcompressor" >/dev/null 2>&1 || die "$llmc_py cannot import llmcompressor"

# The anchor: model_free_ptq on the same checkpoint, restricted to the tensors moetool quantizes by default.
cat >"$work/llmc_ptq.py" <<'PY'
import sys

from compressed_tensors.quantization import preset_name_to_scheme
from llmcompressor import model_free_ptq

src, out = sys.argv[1], sys.argv[2]
experts = r"re:.*\.mlp\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj$"
model_free_ptq(src, out, scheme=preset_name_to_scheme("FP8_BLOCK", [experts]), device="cpu")
PY

out="$work/out"
names=(moetool_deepgemm moetool_hf moetool_fsync moetool_sync llmc cp cp_sync)
[ "$copy_bar" = 1 ] && names=(moetool_sync cp_sync)
labels=(
  "moetool quantize SRC OUT --layout deepgemm"
  "moetool quantize SRC OUT (--layout hf)"
  "moetool quantize SRC OUT --layout deepgemm --fsync"
  "moetool quantize SRC OUT --layout deepgemm && sync"
  "llm-compressor model_free_ptq FP8_BLOCK (experts)"
  "cp -r SRC OUT"
  "cp -r SRC OUT && sync"
)
run_cmd() {
  case "$1" in
    moetool_deepgemm) exec moetool quantize "$src" "$out" --layout deepgemm -q ;;
    moetool_hf) exec moetool quantize "$src" "$out" --layout hf -q ;;
    moetool_fsync) exec moetool quantize "$src" "$out" --layout deepgemm --fsync -q ;;
    moetool_sync) moetool quantize "$src" "$out" --layout deepgemm -q && sync "$out" "$out"/* ;;
    llmc) exec "$llmc_py" "$work/llmc_ptq.py" "$src" "$out" ;;
    cp) exec cp -r "$src" "$out" ;;
    cp_sync) cp -r "$src" "$out" && sync "$out" "$out"/* ;;
  esac
}
export -f run_cmd
export src out work llmc_py

results="$work/results.tsv"
: >"$results"
timed() {  # NAME ROUND: one run of NAME from a clean state; appends "NAME ROUND seconds maxrss_kib"
  rm -rf "$out" "$out.partial"
  sync
  if ! /usr/bin/time -v -o "$work/time.txt" bash -c 'run_cmd "$0"' "$1" >"$work/$1.log" 2>&1; then
    cat "$work/$1.log" >&2
    die "$1 failed (log above)"
  fi
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$work/time.txt")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
  echo -e "$1\t$2\t$wall\t$rss" >>"$results"
  echo "  round $2  $1: ${wall} s, $((rss / 1024)) MiB" >&2
}

echo "warming the page cache with the input" >&2
cat "$src"/*.safetensors >/dev/null

echo "warm-up round (not counted), then checking the outputs" >&2
for n in "${names[@]}"; do
  timed "$n" 0
  if [ "$n" = moetool_deepgemm ] || [ "$n" = moetool_hf ] || [ "$n" = moetool_fsync ] || [ "$n" = llmc ] ||
    [ "$n" = moetool_sync ]; then
    rm -rf "$work/check-$n"
    mv "$out" "$work/check-$n"
  fi
done

# Correctness before any figure: an expert of each output against the recipe of docs/contract.md §6 written
# out here from scratch (float32, amax floor 1e-4, s = amax / 448, q = clamp(W / s) as e4m3), and
# llm-compressor's dequantized weights close to it.
python - "$src" "$work" <<'PY'
import glob
import json
import os
import re
import sys

import torch
from safetensors import safe_open

src, work = sys.argv[1], sys.argv[2]


def tensor(root: str, name: str, index: int | None = None) -> torch.Tensor:
    for f in glob.glob(f"{root}/*.safetensors"):
        with safe_open(f, "pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name) if index is None else fh.get_slice(name)[index]
    raise SystemExit(f"correctness check: {name} not found in {root}")


def recipe(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    blocks = w.float().view(n // 128, 128, k // 128, 128)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4) / 448.0
    q = (blocks * (1.0 / s)[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(n, k), s


names = set()
for f in glob.glob(f"{src}/*.safetensors"):
    with safe_open(f, "pt") as fh:
        names.update(fh.keys())
found = [re.match(r"(.*\.mlp\.experts)\.(\d+)\.gate_proj\.weight$", n) for n in names]
pre, expert = max((m.group(1), int(m.group(2))) for m in found if m)  # the highest-numbered expert of one MoE layer
inter = json.load(open(f"{src}/config.json"))["moe_intermediate_size"]
failures = []
for proj in ("gate_proj", "down_proj"):
    w = tensor(src, f"{pre}.{expert}.{proj}.weight")
    q_ref, s_ref = recipe(w)
    checked = []
    if os.path.isdir(f"{work}/check-moetool_hf"):
        q = tensor(f"{work}/check-moetool_hf", f"{pre}.{expert}.{proj}.weight")
        checked.append(("moetool_hf", q, tensor(f"{work}/check-moetool_hf", f"{pre}.{expert}.{proj}.weight_scale_inv")))
    stacked = "gate_up_proj" if proj == "gate_proj" else "down_proj"  # the deepgemm layout's names
    for run in ("moetool_deepgemm", "moetool_sync"):
        if not os.path.isdir(f"{work}/check-{run}"):
            continue
        q_dg = tensor(f"{work}/check-{run}", f"{pre}.{stacked}", expert)
        s_dg = tensor(f"{work}/check-{run}", f"{pre}.{stacked}_scale_inv", expert)
        if proj == "gate_proj":
            q_dg, s_dg = q_dg[:inter], s_dg[: inter // 128]
        checked.append((run, q_dg, s_dg))
    for run, q, s in checked:
        if not (torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)):
            failures.append(f"{run}: {pre}.{expert}.{proj} differs from the recipe")
    print(f"correctness: {pre}.{expert}.{proj}: bytes == recipe ({', '.join(r for r, _, _ in checked)})",
          file=sys.stderr)
    if not os.path.isdir(f"{work}/check-llmc"):
        continue
    q_l = tensor(f"{work}/check-llmc", f"{pre}.{expert}.{proj}.weight").float()
    s_l = tensor(f"{work}/check-llmc", f"{pre}.{expert}.{proj}.weight_scale").float()
    deq = (q_l.view(q_l.shape[0] // 128, 128, -1, 128) * s_l[:, None, :, None]).view(w.shape)
    rel = float((deq - w.float()).norm() / w.float().norm())
    if rel > 0.05:
        failures.append(f"llm-compressor: {proj} relative error {rel:.3f} > 0.05")
    print(f"correctness: {pre}.{expert}.{proj}: llm-compressor relative error {rel:.4f}", file=sys.stderr)
if failures:
    raise SystemExit("correctness check failed: " + "; ".join(failures))
PY
# --fsync changes when the bytes reach the disk, never the bytes.
[ "$copy_bar" = 1 ] || for f in "$work"/check-moetool_deepgemm/*.safetensors "$work"/check-moetool_deepgemm/*.json; do
  [ "$(basename "$f")" = moetool.json ] && continue
  cmp -s "$f" "$work/check-moetool_fsync/$(basename "$f")" || die "--fsync output differs: $(basename "$f")"
done
[ "$copy_bar" = 1 ] || echo "correctness: moetool --fsync output byte-identical to the default run" >&2
rm -rf "$work"/check-*

for r in $(seq 1 "$runs"); do
  for n in "${names[@]}"; do timed "$n" "$r"; done
done
rm -rf "$out"

python - "$src" "$results" "$runs" "$copy_bar" "${labels[@]}" <<'PY'
import glob
import json
import math
import os
import statistics
import struct
import sys

src, results, runs, copy_bar = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
labels = dict(
    zip(("moetool_deepgemm", "moetool_hf", "moetool_fsync", "moetool_sync", "llmc", "cp", "cp_sync"), sys.argv[5:])
)
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "I64": 8, "U8": 1}

nbytes, count, largest = 0, 0, ("", 0)
for f in sorted(glob.glob(f"{src}/*.safetensors")):
    nbytes += os.path.getsize(f)
    with open(f, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count += 1
        size = math.prod(info["shape"]) * ITEMSIZE[info["dtype"]]
        if size > largest[1]:
            largest = (name, size)

wall: dict[str, dict[int, float]] = {}
rss: dict[str, list[float]] = {}
for line in open(results):
    name, rnd, secs, kib = line.split("\t")
    if int(rnd) == 0:
        continue
    wall.setdefault(name, {})[int(rnd)] = float(secs)
    rss.setdefault(name, []).append(int(kib) * 1024 / 1e6)


def med_ratio(a: str, b: str) -> float:
    return statistics.median(wall[a][r] / wall[b][r] for r in wall[a])


gb = nbytes / 1e9
print(f"checkpoint {src}: {gb:.2f} GB BF16, {count} tensors, largest {largest[0]} "
      f"{largest[1] / 1e6:.0f} MB; input cached; {runs} timed rounds, medians")
print(f"{'command':<52} {'wall s':>7} {'GB/s in':>8} {'peak RSS MB':>12}")
labels = {k: v for k, v in labels.items() if k in wall}
for name, label in labels.items():
    w = statistics.median(wall[name].values())
    print(f"{label:<52} {w:>7.2f} {gb / w:>8.3f} {statistics.median(rss[name]):>12.0f}")

if copy_bar:
    ratios = sorted(wall["moetool_sync"][r] / wall["cp_sync"][r] for r in wall["moetool_sync"])
    figure = statistics.median(ratios)
    print()
    print(f"(ours && sync) / (cp -r && sync), round by round: {' '.join(f'{x:.2f}' for x in ratios)}")
    print(f"min {ratios[0]:.2f}x, median {figure:.2f}x, max {ratios[-1]:.2f}x; bar <= 1.5x: "
          f"{'pass' if figure <= 1.5 else 'FAIL'}")
    sys.exit(0)
limit = 4 * largest[1] / 1e6 + 1000.0  # MB
print()
print(f"{'bar':<60} {'figure':>9} {'need':>8}  verdict")
for ours in ("moetool_deepgemm", "moetool_hf"):
    layout = ours.split("_")[1]
    speedup = med_ratio("llmc", ours)
    rss_ours, rss_llmc = statistics.median(rss[ours]), statistics.median(rss["llmc"])
    to_cp = med_ratio(ours, "cp")
    rows = (
        (f"(a) {layout}: llm-compressor time / ours", f"{speedup:.2f}x", ">= 3x", speedup >= 3),
        (f"(a) {layout}: peak RSS ours vs llm-compressor (MB)", f"{rss_ours:.0f}", f"< {rss_llmc:.0f}",
         rss_ours < rss_llmc),
        (f"(b) {layout}, both left in the page cache (info): ours / cp -r", f"{to_cp:.2f}x", "", None),
        (f"(c) {layout}: peak RSS (MB) vs largest x 4 + 1 GB", f"{rss_ours:.0f}", f"<= {limit:.0f}",
         rss_ours <= limit),
    )
    for bar, figure, need, ok in rows:
        print(f"{bar:<60} {figure:>9} {need:>8}  {'' if ok is None else 'pass' if ok else 'FAIL'}")
to_disk = med_ratio("moetool_sync", "cp_sync")
print(f"{'(b) deepgemm, outputs on disk: (ours && sync) / (cp -r && sync)':<60} {to_disk:>8.2f}x {'<= 1.5x':>8}  "
      f"{'pass' if to_disk <= 1.5 else 'FAIL'}")
print(f"{'    deepgemm --fsync / (cp -r && sync) (info)':<60} {med_ratio('moetool_fsync', 'cp_sync'):>8.2f}x")
PY

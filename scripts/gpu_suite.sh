#!/usr/bin/env bash
# Everything the GPU machine checks and measures, in one call:
#   bash scripts/gpu_suite.sh [build-deepgemm] [tests] [bench-quant] [bench-gemm] [bench-gdn] [quantize-20g] [validate-time]
#                             [validate-ab] [demo] [v4]
# (no argument: all but build-deepgemm). Logs go to $OUT (or ./gpu-logs), one file per section; a summary
# table ends the output. DeepGEMM (scripts/build_deepgemm.sh) is used wherever .deepgemm/ holds a build:
# carried from an earlier run, or made by the build-deepgemm section first. Carry .whl/ (wheels installed
# below) and .hubkernels/ (transformers' FP8 kernel, scripts/assemble_hub_kernels.sh) too.
set -uo pipefail
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# transformers' FP8 Triton kernel (kernels-community/finegrained-fp8), which it takes from the Hugging Face
# Hub and this machine cannot reach: scripts/assemble_hub_kernels.sh builds .hubkernels/ where the network
# allows; carried here, LOCAL_KERNELS names it (the `kernels` package's local-kernel mapping, which
# tests/test_engine_gpu.py also reads where no `kernels` release transformers accepts is installed)
if [ -f .hubkernels/finegrained-fp8/metadata.json ]; then
  export LOCAL_KERNELS="kernels-community/finegrained-fp8=$PWD/.hubkernels/finegrained-fp8${LOCAL_KERNELS:+:$LOCAL_KERNELS}"
  export HF_HUB_OFFLINE=1
fi
deepgemm_env() {
  if ls .deepgemm/DeepGEMM/deep_gemm/_C*.so >/dev/null 2>&1; then eval "$(bash scripts/build_deepgemm.sh env)"; fi
}
deepgemm_env
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests bench-quant bench-gemm bench-gdn quantize-20g validate-time demo v4)
declare -A status
ran=()
run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc $((SECONDS - t0))s"
  ran+=("$name")
  tail -n 25 "$out/$name.log"
}
for s in "${sections[@]}"; do
  case $s in
    build-deepgemm) run build-deepgemm bash scripts/build_deepgemm.sh; deepgemm_env ;;
    tests) run tests python3 -m pytest -m gpu -q -p no:cacheprovider ;;
    bench-quant) run bench-quant python3 scripts/bench_quant_kernel.py ;;
    bench-gemm) run bench-gemm python3 scripts/bench_grouped_gemm.py ;;
    bench-gdn) run bench-gdn python3 scripts/bench_gdn_decode.py ;;
    quantize-20g) run quantize-20g bash scripts/bench_quantize_gpu.sh /tmp/moetool-bench ;;
    validate-time) run validate-time bash scripts/bench_validate.sh /tmp/moetool-bench ;;
    validate-ab)  # after quantize-20g: the two sources of validate's sha256, each against its own cat
      run validate-files bash scripts/bench_validate.sh /tmp/moetool-bench -- --hash-source files
      run validate-reads bash scripts/bench_validate.sh /tmp/moetool-bench -- --hash-source reads ;;
    demo) run demo bash scripts/demo.sh /tmp/moetool-demo ;;
    v4) run v4-cast python3 scripts/bench_fp4_cast.py; run v4-20g bash scripts/bench_v4_gpu.sh /tmp/moetool-v4 ;;
    *) echo "unknown section $s"; exit 2 ;;
  esac
done
echo "=== summary ($(cat "$out/card.txt"))"
for s in "${ran[@]}"; do echo "$s ${status[$s]}"; done

#!/usr/bin/env bash
# DeepGEMM, built from source, offline: the FP8 grouped GEMM that `quantize --layout deepgemm` lays its
# experts out for, and the anchor our Triton grouped GEMM is measured against. Its source never enters this
# repository: it lives in the ignored folder .deepgemm/ next to the checkout.
#
#   bash scripts/build_deepgemm.sh assemble   # where there is a network: fill .deepgemm/ (git, pip)
#   bash scripts/build_deepgemm.sh            # on the GPU machine (nvcc, torch; nothing downloaded):
#                                             # build .deepgemm/DeepGEMM/deep_gemm/_C*.so and import it
#   eval "$(bash scripts/build_deepgemm.sh env)"   # make `import deep_gemm` work in this shell
#
# Pinned sources (assemble fetches exactly these; the build refuses anything else):
#   DeepGEMM    54e22612409371d6364144b69086735beb54e98b (v2.6.1), `git archive` of that commit
#   CUTLASS     the nvidia-cutlass 4.2.0.0 wheel's cutlass_library/source/include/{cute,cutlass} (headers
#               only; DeepGEMM's submodule pins v4.2.1, whose cute/ is the same and whose cutlass/
#               differs in version.h and two SM100 epilogue headers DeepGEMM does not include)
#   fmt         the commit DeepGEMM's third-party/fmt submodule pins at that commit (headers only, >= 11:
#               DeepGEMM includes fmt/base.h, which fmt 9 and 10 lack)
#
# .deepgemm/
#   SOURCES                       what was assembled: commits and the wheel's sha256
#   DeepGEMM/                     the source tree at the pinned commit, plus
#     deep_gemm/include/cute      CUTLASS's headers where DeepGEMM's JIT compiler looks for them (its own
#     deep_gemm/include/cutlass   setup.py copies them there too)
#     third-party/fmt/include     fmt's headers (the submodule's place)
#   jit-cache/                    kernels DeepGEMM compiled at run time (DG_JIT_CACHE_DIR), reusable
#
# assemble takes DEEPGEMM_GIT / FMT_GIT (a URL or a local clone; GitHub by default) and CUTLASS_WHEEL (a
# downloaded nvidia_cutlass-4.2.0.0 wheel; `pip download` by default).
#
# The build differs from DeepGEMM's setup.py in three ways, each needed on our GPU machine (torch 2.11,
# CUDA 13 nvcc): the extension links the process's shared libstdc++.so.6 (that machine's g++ links
# libstdc++ statically into _C.so otherwise, and the first GEMM then crashes in std::regex inside the JIT
# include parser); -std=c++17 as DeepGEMM's setup.py has it, but c++20 from torch 2.14 on (whose headers
# need it); no version probing through git and no wheel download.
set -euo pipefail

DG_COMMIT=54e22612409371d6364144b69086735beb54e98b
CUTLASS_VERSION=4.2.0.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.deepgemm"
src="$dest/DeepGEMM"

die() { echo "build_deepgemm: $*" >&2; exit 2; }

assemble() {
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  [ -e "$src" ] && die "$src exists; remove .deepgemm/ first to assemble it again"
  mkdir -p "$src"
  git clone -q --bare "${DEEPGEMM_GIT:-https://github.com/deepseek-ai/DeepGEMM.git}" "$tmp/dg.git"
  git --git-dir="$tmp/dg.git" cat-file -e "$DG_COMMIT^{commit}" || die "commit $DG_COMMIT not in DeepGEMM's history"
  git --git-dir="$tmp/dg.git" archive "$DG_COMMIT" | tar -x -C "$src"
  local fmt_commit
  fmt_commit="$(git --git-dir="$tmp/dg.git" ls-tree "$DG_COMMIT" third-party/fmt | awk '{print $3}')"
  [ -n "$fmt_commit" ] || die "no third-party/fmt submodule at $DG_COMMIT"
  git clone -q --bare "${FMT_GIT:-https://github.com/fmtlib/fmt.git}" "$tmp/fmt.git"
  mkdir -p "$src/third-party/fmt"
  git --git-dir="$tmp/fmt.git" archive "$fmt_commit" include | tar -x -C "$src/third-party/fmt"
  local wheel="${CUTLASS_WHEEL:-}"
  if [ -z "$wheel" ]; then
    python3 -m pip download -q --no-deps "nvidia-cutlass==$CUTLASS_VERSION" -d "$tmp/wheel"
    wheel="$(ls "$tmp"/wheel/nvidia_cutlass-"$CUTLASS_VERSION"-*.whl)"
  fi
  python3 - "$wheel" "$tmp/cutlass" <<'EOF'
import sys, zipfile
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(sys.argv[1]) as z:
    members = [m for m in z.namelist() if m.startswith((prefix + "cute/", prefix + "cutlass/"))]
    if not members:
        sys.exit(f"{sys.argv[1]}: no {prefix}cute or cutlass headers")
    z.extractall(sys.argv[2], members)
EOF
  mv "$tmp/cutlass/cutlass_library/source/include/cute" "$tmp/cutlass/cutlass_library/source/include/cutlass" \
    "$src/deep_gemm/include/"
  {
    echo "DeepGEMM $DG_COMMIT"
    echo "fmt $fmt_commit"
    echo "nvidia-cutlass $CUTLASS_VERSION $(basename "$wheel") sha256 $(sha256sum "$wheel" | awk '{print $1}')"
  } >"$dest/SOURCES"
  cat "$dest/SOURCES"
  du -sh "$dest"
}

env_lines() {
  echo "export PYTHONPATH=$src\${PYTHONPATH:+:\$PYTHONPATH}"
  echo "export DG_JIT_CACHE_DIR=$dest/jit-cache"
}

build() {
  [ -f "$dest/SOURCES" ] || die "no $dest/SOURCES: run 'bash scripts/build_deepgemm.sh assemble' where there is a network, then bring .deepgemm/ here"
  grep -q "^DeepGEMM $DG_COMMIT\$" "$dest/SOURCES" || die "$dest holds $(head -1 "$dest/SOURCES"), this script builds $DG_COMMIT"
  for f in csrc/python_api.cpp deep_gemm/__init__.py deep_gemm/include/cute/tensor.hpp \
    deep_gemm/include/cutlass/cutlass.h third-party/fmt/include/fmt/base.h; do
    [ -f "$src/$f" ] || die "$src/$f is missing: assemble .deepgemm/ again"
  done
  command -v nvcc >/dev/null || die "nvcc not on PATH (DeepGEMM builds its host part and JIT-compiles its kernels with it)"
  nvcc --version | tail -1
  "${CXX:-g++}" --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  local t0=$SECONDS
  (cd "$src" && rm -rf build deep_gemm/_C*.so && python3 - <<'EOF'
import os
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

major, minor = (int(v) for v in torch.__version__.split(".")[:2])
std = "c++20" if (major, minor) >= (2, 14) else "c++17"
# The shared libstdc++ this process (and torch) runs with; g++'s own as a fallback.
libstdcxx = next((line.split()[-1] for line in open("/proc/self/maps") if "/libstdc++.so" in line), None)
if libstdcxx is None:
    libstdcxx = subprocess.check_output(["g++", "-print-file-name=libstdc++.so.6"], text=True).strip()
# nvrtc from the toolkit (as DeepGEMM's setup.py links it), else from the CUDA wheels torch runs with;
# an rpath to wherever it was found, so the extension loads without LD_LIBRARY_PATH.
lib_dirs = [d for d in (f"{CUDA_HOME}/lib64", f"{CUDA_HOME}/lib") if os.path.isdir(d)]
libraries, link = ["cudart"], [libstdcxx]
found = [d for d in lib_dirs if os.path.exists(f"{d}/libnvrtc.so")]
if found:
    libraries.append("nvrtc")
    link.append(f"-Wl,-rpath,{found[0]}")
else:
    import glob
    site = os.path.dirname(os.path.dirname(torch.__file__))
    wheels = sorted(glob.glob(f"{site}/nvidia/**/lib/libnvrtc.so.*[0-9]", recursive=True))
    if not wheels:
        sys.exit(f"no libnvrtc.so under {lib_dirs} nor {site}/nvidia")
    link += [wheels[0], f"-Wl,-rpath,{os.path.dirname(wheels[0])}"]
print(f"-std={std}; linking {' '.join(link)}; libraries {libraries} from {lib_dirs}", flush=True)
# Absolute include paths: ninja compiles from the build directory, where relative ones point nowhere.
ext = CUDAExtension(
    name="deep_gemm._C",
    sources=["csrc/python_api.cpp"],
    include_dirs=[
        f"{CUDA_HOME}/include",
        f"{CUDA_HOME}/include/cccl",
        os.path.abspath("deep_gemm/include"),
        os.path.abspath("third-party/fmt/include"),
    ],
    libraries=libraries,
    library_dirs=lib_dirs,
    extra_compile_args=[
        f"-std={std}",
        "-O3",
        "-g0",  # Python's own CFLAGS carry -g: 40 MB of debug information in a 1 MB extension
        "-fPIC",
        "-Wno-psabi",
        "-Wno-deprecated-declarations",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
    ],
    extra_link_args=link,
)
sys.argv = [sys.argv[0], "build_ext", "--inplace"]
setup(name="deep_gemm", ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
EOF
  ) || die "build failed (log above)"
  local so
  so="$(ls "$src"/deep_gemm/_C*.so)"
  echo "built $so ($(du -h "$so" | cut -f1)) in $((SECONDS - t0)) s"
  if command -v readelf >/dev/null; then readelf -d "$so" | grep -E 'NEEDED|RPATH|RUNPATH' || true; fi
  eval "$(env_lines)"
  mkdir -p "$DG_JIT_CACHE_DIR"
  python3 -c 'import deep_gemm, torch; print("import deep_gemm OK:", deep_gemm.__version__, deep_gemm.__file__, "on", torch.cuda.get_device_name(0))' \
    || { ldd "$so" || true; die "built, but 'import deep_gemm' fails (above)"; }
  echo "to use it: eval \"\$(bash scripts/build_deepgemm.sh env)\""
}

case "${1:-build}" in
  assemble) assemble ;;
  build) build ;;
  env) env_lines ;;
  *) die "usage: bash scripts/build_deepgemm.sh [assemble|build|env]" ;;
esac

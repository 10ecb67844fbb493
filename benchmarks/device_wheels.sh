#!/usr/bin/env bash
# Fetch into .whl/ (repository root, git-ignored) the wheels the H200 device machine lacks, for its
# Python 3.12 on manylinux x86_64. The device has jax, flax, optax, orbax, transformers, peft, torch,
# tokenizers, safetensors, huggingface-hub, numpy, pandas, pyarrow, fsspec, xxhash, pyyaml, tqdm,
# protobuf... (/work/.library/device/KINDS.md); not these. Versions are pinned to the ones CI tests
# with; `--no-deps`, so every missing dependency is named here (datasets' and pydantic's included).
# It also copies the stories260K test model. Network to PyPI is needed here, not on the device. Run from anywhere:  bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # datasets and what the device lacks of its deps
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  tensorboardX==2.6.5
  trl==1.16.0  # the preference tests compare with TRL (the device lane runs them)
)

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
# The real stories260K test model (1 MiB) travels too: the device has no ../shared. gpu_suite.sh points
# JAXLORA_ASSETS at .whl/assets when it is there.
SRC=${JAXLORA_ASSETS:-../shared/assets}/models/stories260K
if [[ -f $SRC/model.safetensors ]]; then
  rm -rf .whl/assets && mkdir -p .whl/assets/models && cp -r "$SRC" .whl/assets/models/ && chmod -R u+w .whl/assets
else
  echo "warning: no stories260K at $SRC (set JAXLORA_ASSETS): the gpu tests that need it will fail" >&2
fi
ls -1 .whl
echo "total: $(du -sh .whl | cut -f1) in .whl/ (carry it: the device tool's run with carry [\".whl\"])"

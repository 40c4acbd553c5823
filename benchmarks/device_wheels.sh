#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (it has torch, accelerate, transformers, safetensors, peft, tensorboard,
# imageio; not diffusers or omegaconf), downloaded HERE into .whl/ (ignored through .git/info/exclude) so that
# the device tool carries them: run(..., carry=[".whl"]). benchmarks/gpu_checks.sh installs them there.
# Pure-Python wheels, about 7 MB (the carried tree's limit is 64 MiB). DeepSpeed is not carried: one GPU needs
# no ZeRO.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# the versions this checkout is tested with (pyproject.toml's ranges), for the device's Python 3.12
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==0.42.1" "omegaconf==2.4.0" "importlib_metadata==10.2.0"
ls -l .whl

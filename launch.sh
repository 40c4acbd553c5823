#!/usr/bin/env bash
# The pipeline's single entry point (see README.md and ../shared/INTERFACE.md).
#   ./launch.sh                      whole pipeline on configs/tiny.yaml into runs/tiny/
#   ./launch.sh test                 the test suite
#   ./launch.sh CONFIG [--stages a,b] [--num-processes N] [--accelerate-config F] [--dry-run] [--force] [k=v ...]
#   ./launch.sh sample SOURCE --out FILE.safetensors [--n N] [--frames F] [--steps K] [--seed S] [--guidance G]
#   ./launch.sh convert SOURCE DEST --to {diffusers,safetensors,wan} [--ema] [--part P] [--dtype D] [--force]
#   ./launch.sh prepare_data CONFIG [--force] [k=v ...]   videos or prompts -> latent / prompt-embedding shards
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Use the current interpreter if it already has the package; else bootstrap .venv (torch first, pinned,
# so that nothing pulls a CUDA build), then the package with its test extras.
setup() {
  if python3 -c "import importlib.metadata as m; m.version('causal-video-distill')" >/dev/null 2>&1 \
      && [ -z "${FORCE_VENV:-}" ] && [ ! -x .venv/bin/python ]; then
    PY=python3; return
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "[launch] creating .venv" >&2
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
  local stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    echo "[launch] installing torch==2.13.0 and the package into .venv" >&2
    $PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
    $PY -m pip install -q --disable-pip-version-check -e ".[test]"
    rm -f .venv/.installed-*; touch "$stamp"
  fi
}

cmd=${1:-configs/tiny.yaml}
[ $# -gt 0 ] && shift
setup
case "$cmd" in
  test)    exec $PY -m pytest -q tests "$@" ;;
  sample)  exec $PY -m stages.sample "$@" ;;
  convert) exec $PY -m stages.convert "$@" ;;
  prepare_data) exec $PY -m stages.prepare_data "$@" ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  *)       exec $PY -m stages.launch "$cmd" "$@" ;;
esac

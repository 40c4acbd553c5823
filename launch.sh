#!/usr/bin/env bash
# The pipeline's single entry point (see README.md and ../shared/INTERFACE.md).
#   ./launch.sh                      whole pipeline on configs/tiny.yaml into runs/tiny/
#   ./launch.sh test                 the test suite
#   ./launch.sh CONFIG [--stages a,b] [--num-processes N] [--accelerate-config F] [--dry-run] [--force] [k=v ...]
#   ./launch.sh sample SOURCE --out FILE.safetensors [--n N] [--frames F] [--steps K] [--seed S] [--guidance G]
#   ./launch.sh convert SOURCE DEST --to {diffusers,safetensors,wan,pipeline} [--ema] [--part P] [--dtype D] [--force]
#   ./launch.sh prepare_data CONFIG [--force] [k=v ...]   videos or prompts -> latent / prompt-embedding shards
set -euo pipefail
# The checkout (package, .venv, default config), found by absolute path. The commands run where the user
# stands, so every relative path (CONFIG, SOURCE, DEST, --out, run.dir, data.path, ...) resolves there;
# only `test` runs inside the checkout.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Use the current interpreter if it already has the package; else bootstrap .venv (torch first, pinned,
# so that nothing pulls a CUDA build), then the package with its test extras.
setup() {
  if python3 -c "import importlib.metadata as m; m.version('causal-video-distill')" >/dev/null 2>&1 \
      && [ -z "${FORCE_VENV:-}" ] && [ ! -x "$ROOT/.venv/bin/python" ]; then
    PY=python3; return
  fi
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[launch] creating .venv" >&2
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
  local stamp="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "[launch] installing torch==2.13.0 and the package into .venv" >&2
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
    rm -f "$ROOT"/.venv/.installed-*; touch "$stamp"
  fi
}

cmd=${1:-$ROOT/configs/tiny.yaml}
[ $# -gt 0 ] && shift
setup
if [ "$cmd" = test ]; then
  cd "$ROOT"
  exec "$PY" -m pytest -q tests "$@"
fi
# This checkout's code, and not a same-named folder where the user stands (PYTHONSAFEPATH: Python >= 3.11).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
case "$cmd" in
  sample)  exec "$PY" -m stages.sample "$@" ;;
  convert) exec "$PY" -m stages.convert "$@" ;;
  prepare_data) exec "$PY" -m stages.prepare_data "$@" ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  *)       exec "$PY" -m stages.launch "$cmd" "$@" ;;
esac

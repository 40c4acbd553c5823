#!/usr/bin/env bash
# Every GPU check of issue [gpu] as one prepared script for a lent GPU machine (one H200: 15 device minutes in
# all, at most 10 per command), run from the repository root there:
#
#   here:   bash benchmarks/device_wheels.sh                       # once: .whl/ (diffusers, omegaconf)
#   there:  run(command="bash benchmarks/gpu_checks.sh $OUT env stream", carry=[".whl"], timeout_s=480)
#           run(command="bash benchmarks/gpu_checks.sh $OUT distill", carry=[".whl"], timeout_s=330)
#           run(command="bash benchmarks/gpu_checks.sh $OUT tests", carry=[".whl"], timeout_s=180)  # if time is left
#
# The limits are guesses (no GPU has run this yet): a part that hits its limit keeps what it printed so far.
# Parts (default: env stream distill tests), each under its own time limit, its log in OUT/<part>.txt:
#   env      GPU, driver, torch / CUDA / diffusers versions
#   stream   benchmarks/gpu_stream.py --compile at Wan2.1-1.3B shape (random weights, bf16): per-block DiT /
#            cache-write / VAE times, first chunk, steady state, FPS, floor ratio, DF+L2 block-causal vs
#            bidirectional, the sf_dmd generator step and peak memory; all figures in OUT/gpu.json
#   distill  the real `distill` stage of configs/wan2.1-t2v-1.3b/student.yaml (batch 1, grad_accum 1, bf16,
#            checkpointing) on random stand-ins (benchmarks/random_recipe.py): its --dry-run estimate, then
#            DISTILL_STEPS steps with the peak in the progress bar and, at the end, beside the estimate, each
#            phase's (generator update, critic update) beside its own
#   tests    the CUDA-only tests: FlexAttention forward and backward vs the dense mask, the overlapped VAE decode,
#            the compiled steady step under CUDA graphs vs eager
# OUT/summary.txt: each part's exit status and seconds. TINY=1 runs every part at a tiny shape (a CPU check of
# this script; its figures mean nothing).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_checks.sh OUTDIR [env] [stream] [distill] [tests]}")
shift
PARTS=${*:-env stream distill tests}
SELF=$(realpath "${BASH_SOURCE[0]}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$SELF")/.."
if [ "$PARTS" != __distill ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_checks}  # the stand-ins and the stage's run dir (~58 GB at full shape: weights, checkpoint)
STEPS=${DISTILL_STEPS:-6}      # loop steps (5 critic updates per generator update)

if [ -n "${TINY:-}" ]; then
  STREAM_ARGS=(--config configs/tiny.yaml --device cpu --frames 6 --window 6 --sinks 3 --repeats 1 --train-repeats 1
               run.device=cpu model.num_layers=1 model.in_channels=4 model.out_channels=4 model.patch_size=[1,2,2]
               data.kind=latents data.latent_size=[4,4] components.max_sequence_length=4)
  python3 -c "import json; c = json.load(open('configs/shapes/wan2.1-t2v-1.3b.json')); c.update(num_layers=1,
num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=32, freq_dim=32); json.dump(c, open('$OUT/.shape.json', 'w'))"
  RECIPE_ARGS=(--shape "$OUT/.shape.json" --seq-len 16 --prompts 2)
  STAGE_ARGS=(run.device=cpu model.num_layers=1 model.num_attention_heads=2 model.attention_head_dim=16 model.ffn_dim=32
              model.text_dim=32 model.freq_dim=32 data.latent_size=[8,8] data.frames=6 components.max_sequence_length=16)
  TESTS_K="cuda or compiled"
else
  STREAM_ARGS=(--compile)
  RECIPE_ARGS=(--device cuda)
  STAGE_ARGS=()
  TESTS_K="cuda"
fi

part() {  # part NAME LIMIT_S COMMAND...: run with a limit, log to OUT/NAME.txt, record status and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 40 "$OUT/$name.txt"
  echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

distill() {
  rm -rf "$WORK"
  "$PY" benchmarks/random_recipe.py "$WORK" "${RECIPE_ARGS[@]}" || return
  read -r -a KEYS <"$WORK/overrides.txt"
  local run=("$PY" -m stages.launch configs/wan2.1-t2v-1.3b/student.yaml --stages distill "${KEYS[@]}"
             distill.grad_accum=1 distill.log_every=1 "${STAGE_ARGS[@]}")
  echo "\$ ${run[*]} --dry-run"
  "${run[@]}" --dry-run || return
  echo "\$ ${run[*]} distill.steps=$STEPS"
  "${run[@]}" distill.steps="$STEPS"
}

for p in $PARTS; do
  case $p in
    env) part env 60 bash -c "nvidia-smi; $PY -c 'import torch, diffusers, omegaconf; print(\"torch\", torch.__version__,
\"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
\"diffusers\", diffusers.__version__, \"omegaconf\", omegaconf.__version__)'" ;;
    stream) part stream 390 "$PY" benchmarks/gpu_stream.py "${STREAM_ARGS[@]}" --json "$OUT/gpu.json" ;;
    distill) part distill 300 bash "$SELF" "$OUT" __distill ;;  # a function cannot run under `timeout`
    __distill) distill ;;
    tests) part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_static_cache.py \
             tests/test_vae_stream.py \
             -k "$TESTS_K" ;;
    *) echo "unknown part '$p' (env, stream, distill, tests)"; exit 2 ;;
  esac
done

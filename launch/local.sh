#!/usr/bin/env bash
# One host: SFT warm-start then GRPO (by default on generated arithmetic problems, CPU).
#   bash launch/local.sh                                   # ~10 minutes on 2 CPU cores
#   CONFIG=configs/default.py:tiny WORKDIR=/tmp/t bash launch/local.sh --config.rl.group_size=16
#   DRY_RUN=1 bash launch/local.sh --config.seed=1         # print what would run; creates / installs nothing
# Settings (environment): CONFIG, WORKDIR, JAX_EXTRA (cpu | cuda12 | tpu: which jax launch/_env.sh installs),
# XLA_FLAGS. Arguments are passed to the trainer unchanged (--config.* overrides).
# launch/tpu_pod.sh runs this same script on every worker of a TPU pod slice.
set -euo pipefail
LAUNCH="$(cd "$(dirname "$0")" && pwd)"
source "$LAUNCH/_lib.sh"
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-runs/default}"
export XLA_FLAGS="${XLA_FLAGS:-}"
echo "[launch] config=$CONFIG workdir=$WORKDIR jax=${JAX_EXTRA:-cpu} xla_flags=$XLA_FLAGS dry_run=$DRY_RUN" \
     "overrides=$(quote "$@")"
cmd=(python -m grpo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@")
if dry; then  # _env.sh is not sourced: a dry run creates no venv and installs nothing
  echo "[dry-run] cd $(quote "$(dirname "$LAUNCH")") && JAX_EXTRA=${JAX_EXTRA:-cpu} source launch/_env.sh"
  echo "[dry-run] $(quote "${cmd[@]}")"
  exit 0
fi
source "$LAUNCH/_env.sh"  # the venv (created and installed on first use); cd to the repo root
exec "${cmd[@]}"

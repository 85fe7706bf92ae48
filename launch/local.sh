#!/usr/bin/env bash
# The embedded default on this machine: SFT warm-start then GRPO on generated arithmetic problems.
#   bash launch/local.sh                                   # ~10 minutes on 2 CPU cores
#   CONFIG=configs/default.py:tiny WORKDIR=/tmp/t bash launch/local.sh --config.rl.group_size=16
source "$(dirname "$0")/_env.sh"
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-runs/default}"
echo "[launch] config=$CONFIG workdir=$WORKDIR overrides=$*"
exec python -m grpo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"

#!/usr/bin/env bash
#SBATCH --job-name=grpo_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=grpo_jax-%j.out
# Multi-node GPU under SLURM: one process per node, each driving all of its node's GPUs; the same
# `python -m grpo_jax.train` on every node. Submit from the repository root:
#   CONFIG=configs/deepseekmath_7b.py WORKDIR=/shared/runs/dsm7b sbatch --nodes=2 launch/slurm.sh \
#       --config.model.path=/shared/models/deepseek-math-7b-instruct --config.mesh.fsdp=-1
#   DRY_RUN=1 bash launch/slurm.sh ...   # inside an allocation (salloc): print the commands, run nothing
# How the processes meet: the coordinator is the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`) on
# PORT; GRPO_JAX_COORDINATOR / GRPO_JAX_NUM_PROCESSES (= nodes) are exported and each task sets
# GRPO_JAX_PROCESS_ID=$SLURM_PROCID. grpo_jax.parallel.distributed passes these to jax.distributed.initialize() with
# jax's own SLURM detection off: that detection assumes one process per GPU (it would show each process only
# GPU $SLURM_LOCALID). For one process per GPU instead, skip this script:
#   srun --ntasks-per-node=8 --gpus-per-task=1 python -m grpo_jax.train ...  (jax's SLURM detection then applies)
# The repository (and so the venv launch/_env.sh creates once, here, in $ROOT/.venv) must be on a filesystem
# every node sees; so must WORKDIR (all hosts write their shards of each checkpoint) and model.path.
set -euo pipefail
# Under sbatch $0 is a copy in SLURM's spool directory: find the repository from the submit directory then.
ROOT="${ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
[ -f "$ROOT/launch/_env.sh" ] || ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
[ -f "$ROOT/launch/_env.sh" ] || { echo "error: cannot find the repository; submit from its root or set ROOT" >&2; exit 2; }
source "$ROOT/launch/_lib.sh"
cd "$ROOT"
: "${SLURM_JOB_ID:?run inside an allocation: sbatch launch/slurm.sh (or bash launch/slurm.sh under salloc)}"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_JOB_NUM_NODES is not set}}}"
COORDINATOR_HOST="${COORDINATOR_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
[ -n "$COORDINATOR_HOST" ] || { echo "error: no host in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}" >&2; exit 2; }
PORT="${PORT:-$((61440 + SLURM_JOB_ID % 4096))}"  # jax's own choice for SLURM: one port per job
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-runs/slurm-$SLURM_JOB_ID}"  # relative: under the (shared) repository
export JAX_EXTRA="${JAX_EXTRA:-cuda12}"
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"  # overlap collectives, compute
export GRPO_JAX_COORDINATOR="$COORDINATOR_HOST:$PORT" GRPO_JAX_NUM_PROCESSES="$NODES"
echo "[launch] nodes=$NODES (one process per node) coordinator=$GRPO_JAX_COORDINATOR config=$CONFIG" \
     "workdir=$WORKDIR jax=$JAX_EXTRA xla_flags=$XLA_FLAGS dry_run=$DRY_RUN overrides=$(quote "$@")"

if dry; then  # _env.sh is not sourced: a dry run creates no venv and installs nothing
  echo "[dry-run] JAX_EXTRA=$JAX_EXTRA source $(quote "$ROOT/launch/_env.sh")"
  echo "[dry-run] export $(quote GRPO_JAX_COORDINATOR="$GRPO_JAX_COORDINATOR" \
                                 GRPO_JAX_NUM_PROCESSES="$GRPO_JAX_NUM_PROCESSES" XLA_FLAGS="$XLA_FLAGS")"
else
  source "$ROOT/launch/_env.sh"  # once, on this (the first) node: the venv is shared through the filesystem
  # _env.sh reinstalls only when setup.py changes, so a venv made earlier with CPU jax would train on CPU here.
  python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' || {
    echo "error: jax in $VENV sees no GPU; a CPU-only venv from an earlier run? set VENV=<new path>" >&2; exit 2; }
fi
# Single quotes: $SLURM_PROCID is expanded by each task, not here. --kill-on-bad-exit: a failed process stops
# the others instead of leaving them waiting in a collective.
maybe_run srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'export GRPO_JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"' grpo_jax \
  python -m grpo_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"

#!/usr/bin/env bash
# A Cloud TPU VM pod slice: every worker runs the same `python -m grpo_jax.train`, one process per host.
#   TPU_NAME=dsm-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/runs/dsm7b CONFIG=configs/deepseekmath_7b.py \
#     bash launch/tpu_pod.sh --config.model.path=/mnt/shared/models/deepseek-math-7b-instruct --config.mesh.fsdp=-1
#   DRY_RUN=1 TPU_NAME=... ZONE=... WORKDIR=... bash launch/tpu_pod.sh ...   # print the commands, run nothing
# What it does, from the machine you run gcloud on:
#   1. packs this checkout (git's tracked + untracked-not-ignored files: no .venv, no runs/) into $TARBALL;
#   2. `gcloud compute tpus tpu-vm scp --worker=all` copies it to the home directory of every worker;
#   3. `gcloud compute tpus tpu-vm ssh --worker=all --command=...` unpacks it into ~/$REMOTE_DIR, runs
#      $WORKER_SETUP, then launch/local.sh with JAX_EXTRA=tpu (launch/_env.sh creates the venv with jax[tpu] on
#      first use) and GRPO_JAX_DISTRIBUTED=1 (grpo_jax.parallel.distributed then calls jax.distributed.initialize(),
#      which finds the workers through the TPU metadata server).
# WORKDIR must be an absolute path that every worker sees as the same directory (Filestore / NFS, or a bucket
# mounted with gcsfuse in WORKER_SETUP): every host writes its shards of each Orbax checkpoint there. gs:// is
# refused: the trainer writes metrics, config and summary with plain file I/O. Model weights (model.path)
# must be readable on every worker too. Arguments are passed to the trainer unchanged (--config.* overrides).
# Stopping: Ctrl-C stops gcloud; stop the workers' trainers with tpu-vm ssh --worker=all as well.
set -euo pipefail
LAUNCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$LAUNCH")"
source "$LAUNCH/_lib.sh"
TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
ZONE="${ZONE:?set ZONE to the TPU VM zone}"
PROJECT="${PROJECT:-}"  # empty: gcloud's default project
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:?set WORKDIR to an absolute path every worker sees (shared filesystem)}"
REMOTE_DIR="${REMOTE_DIR:-grpo_jax}"  # on each worker, relative to the home directory
WORKER_SETUP="${WORKER_SETUP:-}"  # shell run on every worker before training, e.g. mount a bucket, copy weights
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/grpo_jax-$TPU_NAME.tgz}"
XLA_FLAGS="${XLA_FLAGS:-}"
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-}"  # TPU compiler / runtime flags, e.g. collective fusion options
case "$WORKDIR" in
  gs://*) echo "error: WORKDIR=$WORKDIR: the trainer writes with plain file I/O; mount the bucket (gcsfuse) on" \
               "every worker in WORKER_SETUP and pass the mount path" >&2; exit 2 ;;
  /*) ;;
  *) echo "error: WORKDIR=$WORKDIR must be absolute (a relative path would be each worker's own disk)" >&2; exit 2 ;;
esac
echo "[launch] tpu=$TPU_NAME zone=$ZONE project=${PROJECT:-<gcloud default>} config=$CONFIG workdir=$WORKDIR" \
     "remote_dir=~/$REMOTE_DIR jax=tpu xla_flags=$XLA_FLAGS libtpu_init_args=$LIBTPU_INIT_ARGS" \
     "worker_setup=$WORKER_SETUP dry_run=$DRY_RUN overrides=$(quote "$@")"

gcloud_flags=(--zone="$ZONE" --worker=all)
[ -n "$PROJECT" ] && gcloud_flags+=(--project="$PROJECT")
archive="$(basename "$TARBALL")"

# The command every worker runs (read once by the worker's login shell, hence quoted word by word).
remote="set -euo pipefail; mkdir -p $(quote "$REMOTE_DIR"); tar -xzf $(quote "$archive") -C $(quote "$REMOTE_DIR")"
remote+="; cd $(quote "$REMOTE_DIR")"
[ -n "$WORKER_SETUP" ] && remote+="; $WORKER_SETUP"
remote+="; env $(quote JAX_EXTRA=tpu GRPO_JAX_DISTRIBUTED=1 CONFIG="$CONFIG" WORKDIR="$WORKDIR" \
                       XLA_FLAGS="$XLA_FLAGS" LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS") bash launch/local.sh"
[ $# -gt 0 ] && remote+=" $(quote "$@")"

pack() {  # files that exist (a tracked file deleted in the checkout is skipped)
  (cd "$ROOT" && git ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar --null -czf "$TARBALL" -T -)
}
if dry; then
  echo "[dry-run] (cd $(quote "$ROOT") && git ls-files -z -co --exclude-standard | tar --null -czf $(quote "$TARBALL") -T -)"
else
  pack
  echo "[launch] packed $(du -h "$TARBALL" | cut -f1) into $TARBALL"
fi
maybe_run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$archive" "${gcloud_flags[@]}"
if dry; then echo "[dry-run] # every worker runs: $remote"; fi
maybe_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --command="$remote"

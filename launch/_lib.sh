# Sourced by the launch scripts: DRY_RUN and shell quoting. Installs nothing, runs nothing (launch/_env.sh installs).
DRY_RUN="${DRY_RUN:-0}"

# The arguments as one line that bash (here, over ssh, under srun) reads back as the same words, spaces, quotes
# and $ included. No arguments: nothing (printf would print '' and pass an empty argument on).
quote() {
  (( $# )) || return 0
  local s
  s="$(printf '%q ' "$@")"
  printf '%s' "${s% }"
}

dry() { [ "$DRY_RUN" = 1 ]; }

# Run a command, or with DRY_RUN=1 print it (quoted, so the line can be pasted into a shell).
maybe_run() {
  if dry; then echo "[dry-run] $(quote "$@")"; else "$@"; fi
}

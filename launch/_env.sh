# Sourced by the launch scripts: a project-local virtualenv, created and installed on first use.
# CPU jax by default; on GPU hosts set JAX_EXTRA=cuda12 (or tpu) before the first run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.grpo_jax_installed${EXTRAS:+_$EXTRAS}"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
  echo "[setup] installing grpo_jax${EXTRAS:+[$EXTRAS]} (jax[${JAX_EXTRA:-cpu}])"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "jax[${JAX_EXTRA:-cpu}]" -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

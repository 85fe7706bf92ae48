#!/usr/bin/env bash
# The test suite (what CI runs). Long tests are marked `slow` and skipped; run them with:
#   bash launch/test.sh -m slow
export EXTRAS=test
source "$(dirname "$0")/_env.sh"
export JAX_PLATFORMS=cpu
if [[ " $* " == *" -m "* ]]; then exec python -m pytest "$@"; fi
exec python -m pytest -m "not slow" "$@"

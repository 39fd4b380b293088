#!/usr/bin/env bash
# The whole test suite (slow and multi-process tests included) on a fresh or existing .venv.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
ruff check .
ruff format --check .
command -v chromium >/dev/null || echo "no chromium: the report's browser test is skipped (apt-get install chromium)"
# One worker per core, each test file whole on one worker (its module fixtures are built once); the slowest tests
# are listed at the end, to keep CI's time in view.
workers=$(nproc); workers=$((workers < 4 ? workers : 4))
python -m pytest -n "${VIDLORA_TEST_WORKERS:-$workers}" --dist loadfile --durations=40 "$@"

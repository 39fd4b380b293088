# Sourced by demo.sh and test.sh: create .venv if needed, install vidlora into it, activate it.
# torch goes first and pinned, so no other package can pull a multi-GB CUDA build on a CPU machine;
# a torch you already installed in .venv (e.g. a CUDA build) is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.vidlora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
    python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
    pip install -q -c scripts/constraints.txt -e ".[dev]"
    touch "$stamp"
fi
export TOKENIZERS_PARALLELISM=false
export WANDB_SILENT=true

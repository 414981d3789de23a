#!/usr/bin/env bash
# Create .venv at the repository root and install nnm into it (safe to re-run).
# NNM_TORCH_SPEC picks the PyTorch wheels (default: the pinned pair this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086
  pip_install ${NNM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
pip_install -e ".[dev]"
echo "nnm installed: $(.venv/bin/nnm --version)"

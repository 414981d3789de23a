#!/usr/bin/env bash
# Create .venv at the repository root and install nnm into it (safe to re-run).
# The dependencies come from the images' lock (docker/requirements/cpu.txt and small-data.txt, hashes
# checked), so the tests run the versions the images run. NNM_TORCH_SPEC installs other PyTorch wheels
# instead (e.g. NNM_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" on aarch64) and skips the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if [ -n "${NNM_TORCH_SPEC:-}" ]; then
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip_install $NNM_TORCH_SPEC
  fi
else
  pip_install --require-hashes --no-deps -r docker/requirements/cpu.txt -r docker/requirements/small-data.txt
fi
pip_install -e ".[dev]"
echo "nnm installed: $(.venv/bin/nnm --version)"

#!/usr/bin/env bash
# Set up from nothing (venv, packages, the browser for the dashboard tests) and run the checks:
# ruff, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"

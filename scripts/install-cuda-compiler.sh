#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, NVVM, headers) from PyPI into
# .cuda/ (git-ignored), where build.rs finds it when no other nvcc is configured.
# 13.0 matters: PTX from a newer nvcc does not load on CUDA 13.0 drivers.
# Idempotent: returns at once when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cuda
PKGS=(nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl)
VERSION="13.0.*"
NVCC="$DEST/nvidia/cu13/bin/nvcc"

if [[ -x "$NVCC" ]] && "$NVCC" --version 2>/dev/null | grep -q "release 13.0"; then
    echo "pinned nvcc already installed: $("$NVCC" --version | grep release)"
    exit 0
fi

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "error: $PY not found (needed to install nvcc from PyPI)" >&2; exit 1; }
specs=()
for p in "${PKGS[@]}"; do specs+=("$p==$VERSION"); done
rm -rf "$DEST.tmp"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST.tmp" "${specs[@]}"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
"$NVCC" --version | grep release
# build.rs watches the compiler only once it exists: make cargo look again.
touch build.rs

#!/usr/bin/env bash
# The tests: the crate's (`cargo test --release`), then the Python package's. Builds the
# wheel with maturin into dist/, installs it into a fresh venv (.venv-test) with torch,
# torchvision, numpy, safetensors, pytest and tqdm from PyPI, and runs python/tests against the
# CLI binary that cargo built. No GPU needed. Set PRUNEKIT_SKIP_CARGO=1 to run only the
# Python part (the CLI must be built already).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
python=${PYTHON:-python3}

if [ "${PRUNEKIT_SKIP_CARGO:-0}" != 1 ]; then
    cargo test --release
fi
cargo build --release --bin prunekit

# A fresh venv for the build tool, the wheel and the test dependencies (PyPI only).
rm -rf .venv-test
"$python" -m venv .venv-test
venv=$root/.venv-test/bin
"$venv/pip" install -q --upgrade pip
"$venv/pip" install -q maturin
rm -rf dist/prunekit-*.whl
(cd python && "$venv/maturin" build --release --out "$root/dist")
wheel=$(ls dist/prunekit-*.whl | head -n 1)
"$venv/pip" install -q "$wheel" torch torchvision numpy safetensors pytest tqdm

# Run from outside the source tree, so that the installed wheel is what is imported.
cd "$root/python/tests"
set +e
PRUNEKIT_BIN="$CARGO_TARGET_DIR/release/prunekit" "$venv/python" -m pytest -q -p no:cacheprovider .
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests" >&2
fi
exit "$rc"

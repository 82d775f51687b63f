#!/usr/bin/env bash
# Builds everything a GPU machine needs to test and benchmark prunekit without Rust:
# the release test and bench executables (kernels compiled by the pinned nvcc), the
# prunekit binary, the Python wheel, the test data, the PyTorch comparison scripts, and
# run.sh.
#
#   scripts/gpu-bundle.sh            -> dist/gpu-bundle/ and dist/gpu-bundle.tar.xz
#   (on the GPU machine) dist/gpu-bundle/run.sh [phase ...]   -> results/report.txt
#
# The tar leaves out data/ (the checkout's tests/data travels with a device call, and
# scripts/gpu-call.sh links it in) and every bench but those named by PK_BUNDLE_BENCHES
# (default: fused), so that it and the checkout fit a device call's 64 MiB.
#
# The target needs x86-64 Linux, an NVIDIA driver (580 or newer) and libstdc++; Python
# with PyTorch only for the comparison runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=dist/gpu-bundle
./scripts/install-cuda-compiler.sh >/dev/null
export NVCC="$PWD/.cuda/nvidia/cu13/bin/nvcc"
# SASS for Hopper only (the lent machines are H200s; PTX of compute_90 rides along): a
# third of the size of the default four architectures. PK_CUDA_ARCHS=80,90 etc. for others.
export PK_CUDA_ARCHS="${PK_CUDA_ARCHS:-90}"

rm -rf "$OUT" dist/gpu-bundle.tar.xz
mkdir -p "$OUT/tests" "$OUT/benches" "$OUT/bin" "$OUT/data" "$OUT/scripts"

# name<TAB>path of each executable that cargo builds for targets of the given kinds.
executables() {
    python3 -c '
import json, sys
kinds = set(sys.argv[1].split(","))
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    if not kinds & set(t["kind"]):
        continue
    name = t["name"] + ("-unit" if "lib" in t["kind"] else "")
    print(name + "\t" + m["executable"])
' "$1"
}
cargo test --release --no-run --message-format=json 2>/dev/null | executables lib,test | while IFS=$'\t' read -r name path; do
    cp "$path" "$OUT/tests/$name"
done
cargo bench --no-run --message-format=json 2>/dev/null | executables bench | while IFS=$'\t' read -r name path; do
    cp "$path" "$OUT/benches/$name"
done
cargo build --release --bin prunekit
cp target/release/prunekit "$OUT/bin/"
strip "$OUT"/tests/* "$OUT"/benches/* "$OUT"/bin/* 2>/dev/null || true
cp tests/data/* "$OUT/data/"
cp scripts/*.py "$OUT/scripts/" 2>/dev/null || true
cp scripts/gpu-run.sh "$OUT/run.sh"
# The Python package's wheel (with the kernels nvcc compiled above) and pytest's wheels, for
# the python phase on a machine without the registry; its GPU tests with the conv tests.
mkdir -p "$OUT/wheels" "$OUT/python-tests"
[ -x .venv-bundle/bin/maturin ] || { python3 -m venv .venv-bundle && .venv-bundle/bin/pip install -q maturin; }
(cd python && ../.venv-bundle/bin/maturin build --release --out "../$OUT/wheels" >/dev/null)
.venv-bundle/bin/pip download -q pytest -d "$OUT/wheels"
cp python/tests/test_conv_device.py python/tests/test_conv.py "$OUT/python-tests/"
chmod +x "$OUT/run.sh"
git rev-parse HEAD > "$OUT/COMMIT" 2>/dev/null || echo unknown > "$OUT/COMMIT"
# -9: a 64 MiB window, so the copies of the embedded kernels across binaries compress away.
skip=(--exclude=gpu-bundle/data)
for b in "$OUT"/benches/*; do
    [[ " ${PK_BUNDLE_BENCHES:-fused} " == *" $(basename "$b") "* ]] || skip+=("--exclude=gpu-bundle/benches/$(basename "$b")")
done
XZ_OPT="-9 -T2" tar -cJf dist/gpu-bundle.tar.xz "${skip[@]}" -C dist gpu-bundle
du -sh "$OUT" dist/gpu-bundle.tar.xz
# A device call carries the checkout's tracked files and the tar: 64 MiB together.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$(( tracked + $(stat -c %s dist/gpu-bundle.tar.xz) ))
echo "tracked files and tar: $(( total / 1048576 )) MiB of the 64 MiB a device call carries"
(( total < 64 * 1048576 )) || echo "warning: too large for a device call; leave out more (PK_BUNDLE_BENCHES, PK_CUDA_ARCHS)" >&2
echo "tests: $(ls "$OUT/tests" | tr '\n' ' ')"
echo "benches: $(ls "$OUT/benches" | tr '\n' ' ')"

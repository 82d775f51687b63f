#!/usr/bin/env bash
# Builds everything a GPU machine needs to test and benchmark prunekit without Rust:
# the release test and bench executables (kernels compiled by the pinned nvcc), the
# prunekit binary, the Python wheel, the test data, the PyTorch comparison scripts, and
# run.sh.
#
#   scripts/gpu-bundle.sh   -> dist/gpu-bundle/, dist/gpu-bundle.tar.xz (the prunekit
#                              binary, the wheel, the scripts, the benches named by
#                              PK_BUNDLE_BENCHES, default none) and dist/gpu-bundle-tests.tar.xz
#                              (the test executables with GPU tests)
#   (on the GPU machine) dist/gpu-bundle/run.sh [phase ...]   -> results/report.txt
#
# Two tars, so that each with the checkout fits a device call's 64 MiB: the `tests` phase
# carries the tests' tar, every other phase the main one (scripts/gpu-call.sh unpacks
# whichever a call carries). Neither holds data/: the checkout's tests/data travels with a
# device call, and scripts/gpu-call.sh links it in.
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
# Only the test executables with GPU tests (ignored here, run with --ignored there); the
# sanitizer tests are ignored for want of a sanitizer build, and CI runs them.
cargo test --release --no-run --message-format=json 2>/dev/null | executables lib,test | while IFS=$'\t' read -r name path; do
    [[ $name == emu_sanitize ]] && continue
    "$path" --list --ignored 2>/dev/null | grep -q ': test$' || continue
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
# Each tar one xz stream with a 512 MiB window (about 6 GB of memory to pack, 512 MiB to
# unpack), so that the copies of the embedded kernels and of the emulation across
# executables compress away.
skip=(--exclude=gpu-bundle/data --exclude=gpu-bundle/tests)
for b in "$OUT"/benches/*; do
    [[ " ${PK_BUNDLE_BENCHES:-} " == *" $(basename "$b") "* ]] || skip+=("--exclude=gpu-bundle/benches/$(basename "$b")")
done
pack() { xz -T1 --lzma2=preset=9,dict=512MiB; }
tar -cf - "${skip[@]}" -C dist gpu-bundle | pack > dist/gpu-bundle.tar.xz
tar -cf - -C dist gpu-bundle/tests gpu-bundle/COMMIT | pack > dist/gpu-bundle-tests.tar.xz
du -sh "$OUT" dist/gpu-bundle.tar.xz dist/gpu-bundle-tests.tar.xz
# A device call carries the checkout's tracked files and one tar: 64 MiB together.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for t in dist/gpu-bundle.tar.xz dist/gpu-bundle-tests.tar.xz; do
    total=$(( tracked + $(stat -c %s "$t") ))
    echo "tracked files and $t: $(( total / 1048576 )) MiB of the 64 MiB a device call carries"
    (( total < 64 * 1048576 )) || echo "warning: $t is too large for a device call; leave out more (PK_BUNDLE_BENCHES, PK_CUDA_ARCHS)" >&2
done
echo "tests: $(ls "$OUT/tests" | tr '\n' ' ')"
echo "benches: $(ls "$OUT/benches" | tr '\n' ' ')"

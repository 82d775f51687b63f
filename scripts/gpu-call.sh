#!/usr/bin/env bash
# The device call of the GPU bundle: on a lent GPU machine, in a checkout of this repo
# that carries dist/gpu-bundle.tar.xz or dist/gpu-bundle-tests.tar.xz (made here by
# scripts/gpu-bundle.sh; the `tests` phase needs the second, every other phase the first),
# unpacks what it carries, points its data at the checkout's tests/data, and runs the phases of run.sh in
# order of value, each under its own time limit and all under one deadline, so that a slow
# phase costs only itself; then packs the results into $OUT/results.tgz and copies
# report.txt beside it. Phases after `fused` run only while time is left:
#
#   carry [dist/gpu-bundle-tests.tar.xz]:  PK_DEADLINE=300 bash scripts/gpu-call.sh tests
#   carry [dist/gpu-bundle.tar.xz], timeout 580:
#     PK_DEADLINE=500 bash scripts/gpu-call.sh wgmma verify     # the warpgroup-MMA convs: verify, A/B
#     bash scripts/gpu-call.sh ceilings verify bench step conv  # the anchors and the profile
#     PK_DEADLINE=300 bash scripts/gpu-call.sh fusion ncu python  # the A/B of the BN fusion, counters
#
# `fused` is the criterion bench of the fused ops on cuda (benches/fused.rs), short runs.
set -u
ROOT=$PWD
DEADLINE=${PK_DEADLINE:-535}
OUT=${OUT:-$ROOT/gpu-results}
RES=/tmp/pk-results
phases=("$@")
[[ ${#phases[@]} -eq 0 ]] && phases=(ceilings wgmma verify bench step conv fused python compile)
mkdir -p /tmp/pk-bundle "$RES" "$OUT"
found=0
for t in dist/gpu-bundle.tar.xz dist/gpu-bundle-tests.tar.xz; do
    [[ -f $t ]] || continue
    tar xJf "$t" -C /tmp/pk-bundle || exit 3
    found=1
done
((found)) || { echo "no dist/gpu-bundle.tar.xz or dist/gpu-bundle-tests.tar.xz (carry one)"; exit 3; }
mkdir -p /tmp/pk-bundle/gpu-bundle/scripts
cd /tmp/pk-bundle/gpu-bundle || exit 3
# The checkout's scripts replace the bundle's copies: a script fixed after the bundle was
# made needs no new bundle.
cp "$ROOT/scripts/gpu-run.sh" run.sh && cp "$ROOT"/scripts/*.py scripts/
[[ -d data ]] || ln -sfn "$ROOT/tests/data" data
export RESULTS=$RES PYTHONUNBUFFERED=1

# phase LIMIT COMMAND...: runs COMMAND under min(LIMIT, the time left before the deadline).
phase() {
    local limit=$1 left=$((DEADLINE - SECONDS))
    shift
    ((left < limit)) && limit=$left
    if ((limit <= 5)); then
        echo "[skipped, no time left: $*]" | tee -a "$RES/report.txt"
        return
    fi
    timeout "$limit" "$@"
    echo "[$* exit $? at ${SECONDS} s]" | tee -a "$RES/report.txt"
}

for p in "${phases[@]}"; do
    case $p in
    ceilings) phase 40 ./run.sh ceilings ;;
    tests) phase 150 ./run.sh tests ;;
    wgmma) phase 360 ./run.sh wgmma ;;
    verify) phase 60 ./run.sh verify ;;
    bench) phase 120 ./run.sh bench ;;
    step) phase 150 ./run.sh step ;;
    conv) phase 200 ./run.sh conv ;;
    fused)
        phase 70 sh -c "benches/fused --bench cuda --warm-up-time 0.3 --measurement-time 1 > $RES/criterion-fused.txt 2>&1"
        grep -E "^fused|time:" "$RES/criterion-fused.txt" | head -70
        ;;
    python) phase 90 ./run.sh python ;;
    fusion) phase 150 ./run.sh fusion ;;
    ncu) phase 200 ./run.sh ncu ;;
    compile) [[ -s $RES/bench-cuda.json ]] && phase 400 ./run.sh compile ;;
    *) phase 600 ./run.sh "$p" ;;
    esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$RES/report.txt"
tar czf "$OUT/results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
cp "$RES/report.txt" "$OUT/"

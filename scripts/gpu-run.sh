#!/usr/bin/env bash
# run.sh of the GPU bundle (made by scripts/gpu-bundle.sh): on a machine with an NVIDIA
# GPU it runs every test (the GPU tests included), then the benches and the main job,
# and writes a short report (GPU, driver, commit, results) to report.txt (or $REPORT).
#   run.sh            everything
#   run.sh --quick    tests and the main job only (no criterion benches)
set -uo pipefail
cd "$(dirname "$0")"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
export PRUNEKIT_TEST_DATA="$PWD/data" PRUNEKIT_BIN="$PWD/bin/prunekit"
REPORT=${REPORT:-$PWD/report.txt}
LOG=${LOG:-$PWD/log.txt}
: > "$LOG"
{
    echo "# prunekit GPU bundle report"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(cat COMMIT)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    bin/prunekit info
} > "$REPORT"

status=0
echo -e "\n## tests (--include-ignored)" >> "$REPORT"
for t in tests/*; do
    out=$("./$t" --include-ignored --test-threads=1 2>&1)
    rc=$?
    echo "$out" >> "$LOG"
    summary=$(echo "$out" | grep -E "^test result:" | tail -1)
    echo "$(basename "$t"): ${summary:-no summary} (exit $rc)" >> "$REPORT"
    if [[ $rc -ne 0 ]]; then
        status=1
        echo "$out" | grep -E "^test .* FAILED|panicked" | head -20 | sed 's/^/    /' >> "$REPORT"
    fi
done

if [[ $QUICK -eq 0 ]]; then
    echo -e "\n## criterion benches" >> "$REPORT"
    for b in benches/*; do
        out=$("./$b" --bench 2>&1)
        echo "$out" >> "$LOG"
        echo "$out" | grep -E "^[a-z_0-9./-]+\s*$|time:" | paste - - | sed 's/\s\+/ /g' >> "$REPORT"
    done
fi

if bin/prunekit --help 2>/dev/null | grep -q "^  bench"; then
    echo -e "\n## main job: prunekit bench --device cuda" >> "$REPORT"
    bin/prunekit bench --device cuda --json bench.json >> "$REPORT" 2>&1 || status=1
fi
echo -e "\nexit status: $status" >> "$REPORT"
cat "$REPORT"
exit $status

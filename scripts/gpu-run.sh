#!/usr/bin/env bash
# run.sh of the GPU bundle (made by scripts/gpu-bundle.sh). On a machine with an NVIDIA
# GPU it runs, by phase (each phase fits in a few minutes; default: all of them):
#   tests      every test binary with --include-ignored (the GPU tests too)
#   verify     prunekit verify --device cuda on every model reference, f32 and bf16
#   bench      the main job: prunekit bench --device cuda (JSON and plot)
#   step       ResNet50 training step, prunekit vs PyTorch (scripts/torch_train_step.py),
#              batch 32/64/128/256, f32 and bf16, with the ratio
#   conv       prunekit conv-bench --device cuda against cuDNN, bf16 and f32
#   criterion  the criterion benches (criterion:NAME runs one: prune, conv, layers, train_step;
#              all of them may take more than ten minutes)
# Results go to $RESULTS (default ./results): report.txt, log.txt and the JSON files.
#   run.sh [phase ...]
set -uo pipefail
cd "$(dirname "$0")"
HERE=$PWD
RESULTS=${RESULTS:-$HERE/results}
mkdir -p "$RESULTS"
export PRUNEKIT_TEST_DATA="$HERE/data" PRUNEKIT_BIN="$HERE/bin/prunekit"
REPORT="$RESULTS/report.txt"
LOG="$RESULTS/log.txt"
PK="$HERE/bin/prunekit"
phases=("$@")
[[ ${#phases[@]} -eq 0 ]] && phases=(tests verify bench step conv criterion)
status=0
say() { echo "$*" | tee -a "$REPORT"; }

{
    echo "# prunekit GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), phases: ${phases[*]}"
    echo "commit: $(cat COMMIT)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    "$PK" info
} | tee -a "$REPORT"

for phase in "${phases[@]}"; do
    say ""
    say "## $phase"
    case $phase in
    tests)
        for t in tests/*; do
            # The long emulation slice of the differential tests is for CPU machines; the
            # cuda one runs here.
            out=$("./$t" --include-ignored --skip long_slice --test-threads=1 2>&1)
            rc=$?
            echo "$out" >> "$LOG"
            summary=$(echo "$out" | grep -E "^test result:" | tail -1)
            say "$(basename "$t"): ${summary:-no summary} (exit $rc)"
            if [[ $rc -ne 0 ]]; then
                status=1
                echo "$out" | grep -E "^test .* FAILED|panicked" | head -20 | sed 's/^/    /' | tee -a "$REPORT"
            fi
        done
        ;;
    verify)
        for f in data/model-*.safetensors; do
            for p in f32 bf16; do
                out=$("$PK" verify --reference "$f" --device cuda --precision "$p" 2>&1)
                rc=$?
                echo "$out" >> "$LOG"
                say "$(basename "$f") $p: $(echo "$out" | tail -1) (exit $rc)"
                [[ $rc -ne 0 ]] && { status=1; echo "$out" | grep -E "FAIL" | sed 's/^/    /' | tee -a "$REPORT"; }
            done
        done
        ;;
    bench)
        "$PK" bench --device cuda --json "$RESULTS/bench-cuda.json" --plot "$RESULTS/bench-cuda.svg" 2>&1 | tee -a "$REPORT" || status=1
        ;;
    step)
        say "$(printf '%-6s %-9s %12s %12s %12s %12s %8s' batch precision 'prunekit ms' 'img/s' 'torch ms' 'img/s' ratio)"
        for p in f32 bf16; do
            for b in 32 64 128 256; do
                "$PK" bench --device cuda --sparsity 0 --batch "$b" --precision "$p" --steps 10 --warmup 3 \
                    --json "$RESULTS/step-$p-$b.json" >> "$LOG" 2>&1
                ours=$(python3 -c "import json;r=json.load(open('$RESULTS/step-$p-$b.json'))[0];print(r['step_ms'])" 2>/dev/null || echo nan)
                theirs=$(python3 scripts/torch_train_step.py --batch "$b" --precision "$p" --steps 10 --warmup 3 2>>"$LOG" | tee -a "$RESULTS/torch-steps.jsonl" \
                    | python3 -c "import json,sys;r=json.loads(sys.stdin.read());print(r.get('step_ms','nan'))" 2>/dev/null || echo nan)
                say "$(python3 -c "
o,t=float('$ours'),float('$theirs');b=$b
f=lambda x:'%12.2f'%x
print('%-6d %-9s'%(b,'$p'),f(o),f(b/o*1e3),f(t),f(b/t*1e3),'%8.2f'%(t/o))")"
            done
        done
        say "(ratio = PyTorch's step time over prunekit's: above 1, prunekit is faster)"
        ;;
    conv)
        for d in bf16 f32; do
            "$PK" conv-bench --device cuda --dtype "$d" --batch 64 --sparsity 0,0.5 --json "$RESULTS/conv-$d.json" 2>&1 | tail -40 | tee -a "$REPORT"
            python3 - "$RESULTS/conv-$d.json" <<'PY' 2>&1 | tee -a "$REPORT"
import json, math, sys
rows = json.load(open(sys.argv[1]))
r = [x["vs_cudnn"] for x in rows if x.get("vs_cudnn")]
if r:
    print(f"{sys.argv[1]}: geometric mean of vs_cudnn over {len(r)} rows: {math.exp(sum(map(math.log, r)) / len(r)):.3f}")
PY
        done
        ;;
    criterion | criterion:*)
        pick=${phase#criterion}
        pick=${pick#:}
        for b in benches/*; do
            [[ -n "$pick" && "$(basename "$b")" != "$pick" ]] && continue
            out=$("./$b" --bench 2>&1)
            echo "$out" >> "$LOG"
            echo "$out" | grep -E "^[a-zA-Z_0-9./-]+\s*$|time:|thrpt:" | tee -a "$REPORT"
        done
        ;;
    *)
        say "unknown phase $phase"
        status=1
        ;;
    esac
done
say ""
say "exit status: $status"
exit $status

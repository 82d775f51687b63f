#!/usr/bin/env bash
# run.sh of the GPU bundle (made by scripts/gpu-bundle.sh). On a machine with an NVIDIA
# GPU it runs, by phase (default: ceilings tests python verify bench step conv, about 6 minutes
# on an H200; PyTorch's anchors run with its defaults plus cudnn.benchmark and channels_last):
#   ceilings   the device's copy bandwidth and matrix rates through PyTorch
#              (scripts/gpu_ceilings.py), to check the roofline table against
#   tests      the GPU tests of every test binary (--ignored; CI runs the others)
#   python     the wheel beside the machine's PyTorch: prunekit.torch.Conv2d on CUDA
#              tensors (DLPack, PyTorch's streams) against cuDNN, and the CPU conv tests
#   verify     prunekit verify --device cuda on every model reference, f32 and bf16,
#              the BN fusions off (default) and on
#   bench      the main job with its profile and roofline: prunekit bench --device cuda
#              --profile (JSON and plot)
#   step       ResNet50 training step, prunekit vs PyTorch eager (AMP for bf16;
#              scripts/torch_train_step.py), batch 64 and 256, bf16 and f32, with the ratio;
#              at 256 bf16 both profiles side by side, per op family
#   compile    the same step against torch.compile's (256 bf16; compiling takes minutes)
#   wgmma      the warpgroup-MMA conv kernels, multistage (PK_WGMMA=1) and warp-specialized
#              (PK_WGMMA=ws): verify on every reference in bf16, the step with each and
#              without them alternating (three rounds, dense and filters 0.5, the first
#              profiled), conv-bench at batch 256 against PyTorch
#   fusion     the step with each --bn-fusion (all, load, dgrad, none), alternating
#   ncu        hardware counters (Nsight Compute) of three conv kernels of the dense step
#   conv       prunekit conv-bench --device cuda at batch 256 and 64, bf16,
#              against PyTorch's own convolution per shape-pass (scripts/torch_conv.py)
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
[[ ${#phases[@]} -eq 0 ]] && phases=(ceilings tests python verify bench step conv)
status=0
say() { echo "$*" | tee -a "$REPORT"; }
started=$(date +%s)

{
    echo "# prunekit GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), phases: ${phases[*]}"
    echo "commit: $(cat COMMIT 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    [[ -x $PK ]] && "$PK" info
} | tee -a "$REPORT"

for phase in "${phases[@]}"; do
    say ""
    say "## $phase"
    phase_start=$(date +%s)
    # The bundle comes as two tars (scripts/gpu-bundle.sh): the test executables, and the rest.
    if [[ $phase == tests && ! -d tests ]]; then
        say "no test executables here: carry dist/gpu-bundle-tests.tar.xz"
        status=1
        continue
    fi
    if [[ $phase != tests && $phase != ceilings && ! -x $PK ]]; then
        say "no bin/prunekit here: carry dist/gpu-bundle.tar.xz"
        status=1
        continue
    fi
    case $phase in
    ceilings)
        python3 scripts/gpu_ceilings.py > "$RESULTS/ceilings.json" 2>>"$LOG" || status=1
        say "$(cat "$RESULTS/ceilings.json")"
        ;;
    tests)
        for t in tests/*; do
            # The GPU tests (the others run in CI); the long emulation slice of the
            # differential tests is for CPU machines, the cuda one runs here. The sanitizer
            # tests are ignored for want of a sanitizer build, not of a GPU: CI runs them.
            [[ $(basename "$t") == emu_sanitize ]] && continue
            out=$("./$t" --ignored --skip long_slice --test-threads=1 2>&1)
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
    python)
        # Into a folder of its own on PYTHONPATH, beside the machine's PyTorch and numpy
        # (wherever python3 finds them: system, venv or conda).
        site=$(mktemp -d)
        if python3 -m pip install -q --no-index --no-deps --target "$site" wheels/*.whl >> "$LOG" 2>&1; then
            out=$(cd python-tests && PYTHONPATH="$site" python3 -m pytest -q -p no:cacheprovider -rs . 2>&1)
            rc=$?
            echo "$out" >> "$LOG"
            say "pytest: $(echo "$out" | tail -1) (exit $rc)"
            [[ $rc -ne 0 ]] && { status=1; echo "$out" | grep -E "FAILED|Error" | head -20 | sed 's/^/    /' | tee -a "$REPORT"; }
        else
            say "python: the wheels did not install (see log.txt)"
            status=1
        fi
        ;;
    verify)
        for f in data/model-*.safetensors; do
            for p in f32 bf16; do
                for fu in none all; do
                out=$("$PK" verify --reference "$f" --device cuda --precision "$p" --bn-fusion "$fu" 2>&1)
                rc=$?
                echo "$out" >> "$LOG"
                say "$(basename "$f") $p bn-fusion $fu: $(echo "$out" | tail -1) (exit $rc)"
                [[ $rc -ne 0 ]] && { status=1; echo "$out" | grep -E "FAIL" | sed 's/^/    /' | tee -a "$REPORT"; }
                done
            done
        done
        ;;
    bench)
        "$PK" bench --device cuda --steps 10 --warmup 3 --profile --json "$RESULTS/bench-cuda.json" \
            --plot "$RESULTS/bench-cuda.svg" 2>&1 | tee -a "$REPORT" || status=1
        ;;
    step)
        say "$(printf '%-6s %-9s %12s %12s %12s %12s %8s' batch precision 'prunekit ms' 'img/s' 'torch ms' 'img/s' ratio)"
        for p in bf16 f32; do
            for b in 256 64; do
                prof=()
                [[ $p == bf16 && $b == 256 ]] && prof=(--profile)
                "$PK" bench --device cuda --sparsity 0 --batch "$b" --precision "$p" --steps 10 --warmup 3 "${prof[@]}" \
                    --json "$RESULTS/step-$p-$b.json" >> "$LOG" 2>&1
                ours=$(python3 -c "import json;r=json.load(open('$RESULTS/step-$p-$b.json'))[0];print(r['step_ms'])" 2>/dev/null || echo nan)
                tprof=()
                [[ ${#prof[@]} -gt 0 ]] && tprof=(--profile --against "$RESULTS/step-$p-$b.json")
                python3 scripts/torch_train_step.py --batch "$b" --precision "$p" --steps 10 --warmup 3 "${tprof[@]}" \
                    > "$RESULTS/torch-step-$p-$b.txt" 2>>"$LOG"
                head -n 1 "$RESULTS/torch-step-$p-$b.txt" >> "$RESULTS/torch-steps.jsonl"
                theirs=$(head -n 1 "$RESULTS/torch-step-$p-$b.txt" | python3 -c "import json,sys;print(json.loads(sys.stdin.read()).get('step_ms','nan'))" 2>/dev/null || echo nan)
                say "$(python3 -c "
o,t=float('$ours'),float('$theirs');b=$b
f=lambda x:'%12.2f'%x
print('%-6d %-9s'%(b,'$p'),f(o),f(b/o*1e3),f(t),f(b/t*1e3),'%8.2f'%(t/o))")"
                [[ ${#prof[@]} -gt 0 ]] && tail -n +2 "$RESULTS/torch-step-$p-$b.txt" | tee -a "$REPORT"
                if [[ $p == bf16 && $b == 256 ]]; then
                    # The same step captured as one CUDA graph (tests: cuda_graphed_step_is_the_plain_step).
                    "$PK" bench --device cuda --sparsity 0 --batch 256 --precision bf16 --steps 10 --warmup 3 --graph \
                        --json "$RESULTS/step-bf16-256-graph.json" >> "$LOG" 2>&1
                    g=$(python3 -c "import json;print(json.load(open('$RESULTS/step-bf16-256-graph.json'))[0]['step_ms'])" 2>/dev/null || echo nan)
                    say "$(python3 -c "g,t=float('$g'),float('$theirs');print('256    bf16 graph %12.2f %12.2f %12.2f %12.2f %8.2f'%(g,256/g*1e3,t,256/t*1e3,t/g))")"
                fi
            done
        done
        say "(ratio = PyTorch's step time over prunekit's: above 1, prunekit is faster)"
        ;;
    wgmma)
        for w in 1 ws; do
            for f in data/model-*.safetensors; do
                out=$(PK_WGMMA=$w "$PK" verify --reference "$f" --device cuda --precision bf16 2>&1)
                rc=$?
                echo "$out" >> "$LOG"
                say "wgmma=$w verify $(basename "$f") bf16: $(echo "$out" | tail -1) (exit $rc)"
                [[ $rc -ne 0 ]] && { status=1; echo "$out" | grep -E "FAIL" | sed 's/^/    /' | tee -a "$REPORT"; }
            done
        done
        say "$(printf '%-6s %-6s %-14s %10s' round wgmma row 'step ms')"
        for r in 1 2 3; do
            for w in ws 1 0; do
                extra=()
                [[ $r == 1 ]] && extra+=(--profile)
                PK_WGMMA=$w "$PK" bench --device cuda --mode filters --sparsity 0,0.5 --steps 10 --warmup 3 "${extra[@]}" \
                    --json "$RESULTS/wgmma-$w-$r.json" > "$RESULTS/wgmma-$w-$r.txt" 2>&1 || status=1
                python3 -c "
import json
for x in json.load(open('$RESULTS/wgmma-$w-$r.json')):
    print('%-6s %-6s %-14s %10.2f' % ('$r', '$w', x['mode'] + ' ' + str(x['sparsity']), x['step_ms']))" | tee -a "$REPORT"
            done
        done
        for w in 1 ws; do
            rows="$RESULTS/wgmma-$w-conv-bf16-256.json"
            PK_WGMMA=$w "$PK" conv-bench --device cuda --dtype bf16 --batch 256 --sparsity 0,0.5 --json "$rows" \
                > "$RESULTS/wgmma-$w-conv-bf16-256.txt" 2>&1 || status=1
            python3 scripts/torch_conv.py "$rows" --device cuda --warmup 3 --iters 10 \
                --out "$RESULTS/wgmma-$w-conv-bf16-256-vs-torch.json" \
                > "$RESULTS/wgmma-$w-conv-bf16-256-vs-torch.txt" 2>>"$LOG" || status=1
            grep -E "geometric mean" "$RESULTS/wgmma-$w-conv-bf16-256-vs-torch.txt" | sed "s/^/wgmma=$w batch 256: /" | tee -a "$REPORT"
        done
        ;;
    fusion)
        # What each BN fusion buys: the step with --bn-fusion all, load, dgrad and none (the
        # default), three alternating rounds, dense and filters 0.5; the first round profiled.
        say "$(printf '%-6s %-6s %-14s %10s' round fusion row 'step ms')"
        # PyTorch's eager AMP step (dense, channels_last, cudnn.benchmark) before and after.
        torch_anchor() {
            python3 scripts/torch_train_step.py --batch 256 --precision bf16 --steps 10 --warmup 3 \
                > "$RESULTS/fusion-torch-$1.txt" 2>>"$LOG"
            python3 -c "
import json
x = json.loads(open('$RESULTS/fusion-torch-$1.txt').readline())
print('%-6s %-6s %-14s %10.2f' % ('$1', 'torch', 'dense 0.0', x['step_ms']))" | tee -a "$REPORT"
        }
        torch_anchor 0
        for r in 1 2 3; do
            for f in all load dgrad none; do
                extra=(--bn-fusion "$f")
                [[ $r == 1 ]] && extra+=(--profile)
                "$PK" bench --device cuda --mode filters --sparsity 0,0.5 --steps 10 --warmup 3 "${extra[@]}" \
                    --json "$RESULTS/fusion-$f-$r.json" > "$RESULTS/fusion-$f-$r.txt" 2>&1 || status=1
                python3 -c "
import json
for x in json.load(open('$RESULTS/fusion-$f-$r.json')):
    print('%-6s %-6s %-14s %10.2f' % ('$r', '$f', x['mode'] + ' ' + str(x['sparsity']), x['step_ms']))" | tee -a "$REPORT"
            done
        done
        torch_anchor 4
        ;;
    ncu)
        # Hardware counters of conv kernels of the dense bf16 step, one launch each: the
        # BN-on-load fprop and wgrad, the dgrad with BN sums, and the plain wgrad (of the
        # unfused step).
        if command -v ncu > /dev/null; then
            for kf in conv2d_fprop_bnin:all conv2d_wgrad_bnin:all conv2d_dgrad:all conv2d_wgrad:none; do
                k=${kf%:*} f=${kf#*:}
                timeout 60 ncu --clock-control none --kernel-name "regex:^${k}_t" --launch-skip 12 --launch-count 1 \
                    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                    --section SchedulerStats --section MemoryWorkloadAnalysis \
                    "$PK" bench --device cuda --mode filters --sparsity 0 --steps 1 --warmup 0 --bn-fusion "$f" \
                    > "$RESULTS/ncu-$k.txt" 2>&1
                say "ncu $k (--bn-fusion $f): exit $? ($(grep -c . "$RESULTS/ncu-$k.txt") lines)"
                grep -E "^  [a-z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Warp|No Eligible|Stall|L1/TEX Hit|L2 Hit|Shared Memory Configuration|Dynamic Shared" \
                    "$RESULTS/ncu-$k.txt" | head -40 | tee -a "$REPORT"
            done
        else
            say "ncu: not on this machine"
        fi
        ;;
    compile)
        python3 scripts/torch_train_step.py --batch 256 --precision bf16 --steps 10 --warmup 3 --compile 2>>"$LOG" \
            | tee -a "$RESULTS/torch-steps.jsonl" | tee -a "$REPORT"
        ;;
    conv)
        for cfg in bf16:256 bf16:64; do
            d=${cfg%:*} b=${cfg#*:}
            rows="$RESULTS/conv-$d-$b.json"
            "$PK" conv-bench --device cuda --dtype "$d" --batch "$b" --sparsity 0,0.5 --json "$rows" > "$RESULTS/conv-$d-$b.txt" 2>&1 || status=1
            tail -3 "$RESULTS/conv-$d-$b.txt" | tee -a "$REPORT"
            python3 scripts/torch_conv.py "$rows" --device cuda --warmup 3 --iters 10 --out "$RESULTS/conv-$d-$b-vs-torch.json" \
                > "$RESULTS/conv-$d-$b-vs-torch.txt" 2>>"$LOG" || status=1
            grep -E "geometric mean" "$RESULTS/conv-$d-$b-vs-torch.txt" | sed "s/^/$d batch $b: /" | tee -a "$REPORT"
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
    say "($phase: $(( $(date +%s) - phase_start )) s)"
done
say ""
say "exit status: $status ($(( $(date +%s) - started )) s)"
exit $status

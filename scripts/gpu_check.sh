#!/usr/bin/env bash
# The checks to run first whenever a GPU is available (README "Running on a GPU"). Needs torch, numpy,
# safetensors, tqdm, PyYAML and pytest; no simulator. Parts, each with its own time limit; a failing part
# does not stop the others:
#   tests    the equivalence tests on the GPU (pytest -m device --device cuda): batched MoE against the
#            per-expert loop, fast against naive path, prompt cache, both data placements, every precision x
#            top-k, --deterministic, imports without the simulators
#   chain    every stage through its command line on the GPU, tiny schedule, synthetic data
#   compile  training under --compile default and reduce-overhead equals eager
#   memory   every stage's measured peak at the paper configuration against its plan (fp32, bf16)
#   losses   the demo's stage 1 (configs/demo.yaml) on synthetic data, 400 steps in fp32, tf32 and bf16
#   bench    python -m m3dt.bench --device cuda --quick in fp32, tf32 and bf16 (every stage), then in bf16 with
#            --compile reduce-overhead (stages 1 and 3)
#   bench-compiled   the same in fp32 and tf32 with --compile reduce-overhead (stages 1 and 3)
# The benches are combined into benchmarks/{gpu}.md and .json. The parts before the benches run side by side
# (none of them is timed); the benches run after them, alone, one after another, in the order above; one that
# would not finish within the budget is skipped and says so (a second run with GPU_CHECK_PARTS=bench-compiled
# fills in, and `python -m m3dt.bench combine` joins the two runs' bench folders on any machine).
#
#   bash scripts/gpu_check.sh                               # on a GPU machine (at most ~7 minutes)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh --tiny   # rehearsal of the same parts on a CPU, small sizes
#   GPU_CHECK_PARTS=bench,memory bash scripts/gpu_check.sh  # some parts only
# Without a GPU (and without GPU_CHECK_DEVICE) it says so in one line and exits 0. Everything it writes is in
# a work folder (printed), benchmarks/ (GPU runs only) and, when $OUT is set, copied there. It exits 1 when
# a part failed or ran out of time. GPU_CHECK_BUDGET: seconds for all parts (default 380; --tiny 4000, and each
# part's limit x 6: a shared 2-core CPU is that much slower than a GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=$ROOT/.venv/bin/python
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1

if ! cuda=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>&1); then
    echo "gpu_check: $PYTHON cannot import torch: $cuda" >&2
    exit 1
fi
if [ "$DEVICE" = cuda ] && [ "$cuda" != 1 ]; then
    echo "gpu_check: no CUDA GPU visible to torch here; nothing to check (rehearse with GPU_CHECK_DEVICE=cpu ... --tiny)"
    exit 0
fi

BUDGET=${GPU_CHECK_BUDGET:-$([ "$TINY" = 1 ] && echo 4000 || echo 380)}
LIMIT_SCALE=$([ "$TINY" = 1 ] && echo 6 || echo 1)
PARTS=${GPU_CHECK_PARTS:-tests,chain,compile,memory,losses,bench,bench-compiled}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK/tmp"
touch "$WORK/.started"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL=${MUJOCO_GL:-disable} WANDB_MODE=${WANDB_MODE:-offline}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
export PYTHONUNBUFFERED=1  # a part stopped at its time limit keeps what it printed
STARTED=$SECONDS
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --device "$DEVICE" -m device)  # + --basetemp per part
# The bench: the paper's model in quick mode on a GPU; a tiny model on the CPU rehearsal. The benchmark file
# of a GPU run goes to benchmarks/; a rehearsal's stays in the work folder (benchmarks/cpu-*.md is the CPU's).
BENCH=("$PYTHON" -m m3dt.bench --quick --device "$DEVICE" --env_rollouts 0)
MEMORY=("$PYTHON" -m m3dt.memory check --device "$DEVICE")
BENCHMARKS=$ROOT/benchmarks
LOSS_RUN=(--config configs/demo.yaml --max_iters 400 --log_every 100)
if [ "$TINY" = 1 ]; then
    LOSS_RUN=(--config configs/demo.yaml --max_iters 8 --log_every 4 --embed_dim 32 --n_layer 2 --n_head 2)
    BENCH+=(--embed_dim 32 --n_layer 2 --n_head 2 --tasks 6 --groups 2 --experts 2 --eval_rows 16 --steps 2 --warmup 1)
    MEMORY+=(--tiny)
    BENCHMARKS=$WORK/benchmarks
fi

echo "gpu_check: device $DEVICE, python $PYTHON, budget ${BUDGET}s, parts $PARTS, work folder $WORK"
"$PYTHON" - <<'EOF'
import os, platform, torch
line = f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs"
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    line += (f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, capability "
             f"{'.'.join(map(str, torch.cuda.get_device_capability()))}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")
print(line)
EOF

# ------------------------------------------------------------------------------------------ parts
NAMES=() LOGS=() RESULTS=() TIMES=()
declare -A PID_OF=()

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

launch() {  # launch NAME LIMIT COMMAND...: run in the background under a time limit, log in the work folder
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - STARTED)))
    local index=${#NAMES[@]}
    local log
    log="$WORK/$(printf %02d "$index")-${name//[^a-z0-9]/_}.log"
    NAMES+=("$name")
    LOGS+=("$log")
    TIMES+=(0)
    if [ "$left" -lt 30 ] || { [ "$left" -lt "$limit" ] && [ "$left" -lt $((limit / 2)) ]; }; then
        RESULTS+=("SKIP (budget: ${left}s left)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[$(date +%T)] start  $name (limit ${limit}s)"
    RESULTS+=("running")
    (
        cd "$ROOT" || exit 1
        begin=$SECONDS
        timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
        echo "$? $((SECONDS - begin))" > "$log.result"
    ) &
    PID_OF[$index]=$!
}

collect() {  # wait for every launched part and record how it ended
    local index status seconds
    for index in "${!PID_OF[@]}"; do
        wait "${PID_OF[$index]}"
        read -r status seconds < "${LOGS[index]}.result" || status=255
        TIMES[index]=${seconds:-0}
        case $status in
            0) RESULTS[index]=PASS ;;
            124 | 137) RESULTS[index]="TIMEOUT" ;;
            *) RESULTS[index]="FAIL (exit $status)" ;;
        esac
        echo "[$(date +%T)] ${RESULTS[index]}  ${NAMES[index]} (${TIMES[index]}s)"
        unset "PID_OF[$index]"
    done
}

run() { launch "$@"; collect; }

stop_parts() {  # when the script ends early (interrupted, killed by a caller's limit): stop the running parts
    local pid
    for pid in ${PID_OF[@]+"${PID_OF[@]}"}; do
        pkill -TERM -P "$pid" 2>/dev/null  # the part's timeout process, which passes it on to the part
    done
}
trap stop_parts EXIT
trap 'exit 130' INT TERM

stage1_losses() {  # the demo's stage 1 on synthetic data of its 10 tasks, in each precision; losses by step
    local data="$WORK/losses/data" precision
    "$PYTHON" -c "import pathlib, sys; from m3dt.config import load_yaml; from m3dt.synthetic import make_dataset
make_dataset(pathlib.Path(sys.argv[1]), load_yaml('configs/demo.yaml')['tasks'].split(','), 30, None)" \
        "$data" || return 1
    for precision in fp32 tf32 bf16; do
        "$PYTHON" stage1_backbone_train.py "${LOSS_RUN[@]}" --data_path "$data" --run_dir "$WORK/losses/$precision" \
            --precision "$precision" --device "$DEVICE" --workers 0 || return 1
    done
    "$PYTHON" -c "import json, pathlib, sys
print('stage-1 loss by step (training action MSE, mean over the --log_every steps before it), the demo config on synthetic data, seed 0:')
for precision in ('fp32', 'tf32', 'bf16'):
    lines = (pathlib.Path(sys.argv[1]) / precision / 'stage1' / 'metrics.jsonl').read_text().splitlines()
    print(f'  {precision}: ' + ' / '.join(f'{record[\"step\"]}: {record[\"loss\"]:.4f}' for record in map(json.loads, lines)))" \
        "$WORK/losses"
}

# Side by side: nothing here is timed.
wanted tests && launch "tests: equivalence on $DEVICE" 170 "${PYTEST[@]}" --basetemp "$WORK/tmp/tests" \
    tests/test_model.py tests/test_data.py tests/test_bench_paths.py tests/test_precision.py tests/test_evaluation_forward.py \
    tests/test_imports.py tests/test_pipeline.py::test_deterministic_training_repeats_bit_for_bit
wanted chain && launch "chain: every stage on $DEVICE" 170 "${PYTEST[@]}" --basetemp "$WORK/tmp/chain" \
    tests/test_pipeline.py -k "not compiled and not deterministic"
wanted compile && launch "compile: modes against eager" 170 "${PYTEST[@]}" --basetemp "$WORK/tmp/compile" \
    tests/test_pipeline.py -k compiled
if wanted memory; then
    launch "memory: peaks against plans, fp32" 150 "${MEMORY[@]}" --precision fp32 --out "$WORK/memory_fp32.json"
    launch "memory: peaks against plans, bf16" 150 "${MEMORY[@]}" --precision bf16 --out "$WORK/memory_bf16.json"
fi
wanted losses && launch "losses: stage 1 in fp32, tf32, bf16" 150 \
    bash -c "$(declare -p LOSS_RUN PYTHON DEVICE WORK); $(declare -f stage1_losses); stage1_losses"
collect

# Alone, one after another, most wanted first: what does not fit the budget is reported as skipped.
if wanted bench; then
    run "bench: fp32" 90 "${BENCH[@]}" --precision fp32 --out "$WORK/bench/1_fp32"
    run "bench: tf32" 90 "${BENCH[@]}" --precision tf32 --out "$WORK/bench/2_tf32"
    run "bench: bf16" 90 "${BENCH[@]}" --precision bf16 --out "$WORK/bench/3_bf16"
    run "bench: bf16 + compile reduce-overhead" 180 "${BENCH[@]}" --precision bf16 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/4_bf16_compiled"
fi
if wanted bench-compiled; then
    run "bench: fp32 + compile reduce-overhead" 180 "${BENCH[@]}" --precision fp32 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/5_fp32_compiled"
    run "bench: tf32 + compile reduce-overhead" 180 "${BENCH[@]}" --precision tf32 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/6_tf32_compiled"
fi
if compgen -G "$WORK/bench/*/*.json" > /dev/null; then
    BUDGET=$((BUDGET + 30)) run "bench: combined page" 30 "$PYTHON" -m m3dt.bench combine $(ls -d "$WORK"/bench/*/) \
        --out "$BENCHMARKS"
fi

# ------------------------------------------------------------------------------------------ report
failed=0
for index in "${!NAMES[@]}"; do
    [ "${RESULTS[index]}" = PASS ] && continue
    failed=1
    echo
    echo "---- ${NAMES[index]}: ${RESULTS[index]}; last lines of ${LOGS[index]}"
    [ -f "${LOGS[index]}" ] && grep -v '^\s*$' "${LOGS[index]}" | tail -n 15 | cut -c 1-300
done
for log in "${LOGS[@]}"; do  # the warnings the tests report (e.g. whether CUDA runs repeat without --deterministic)
    [ -f "$log" ] && grep -h "UserWarning: " "$log" | sed 's/^.*UserWarning: /note: /' | sort -u
done
for log in "${LOGS[@]}"; do
    [ -f "$log" ] && grep -A3 "^stage-1 loss by step" "$log"
done
for json in "$WORK"/memory_*.json; do
    [ -f "$json" ] && "$PYTHON" - "$json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"\nmemory, {rows[0]['precision']}: measured peak / planned (GiB)")
for row in rows:
    judged = {True: "", False: "  <- above the plan", None: ""}[row["within_plan"]]
    print(f"  {row['case']:<58} {row['measured'] / 2**30:7.2f} / {row['planned'] / 2**30:7.2f} = {row['ratio']:.2f}{judged}")
EOF
done
page=$(find "$BENCHMARKS" -maxdepth 1 -name '*.md' -newer "$WORK/.started" 2>/dev/null | head -n 1)
if [ -n "$page" ]; then
    echo
    sed -n '/^## Training: ms/,/^## Run:/p' "$page" | grep -v '^## Run:'
fi

summary="$WORK/summary.md"
{
    echo "| part | result | seconds |"
    echo "|---|---|---:|"
    for index in "${!NAMES[@]}"; do
        echo "| ${NAMES[index]} | ${RESULTS[index]} | ${TIMES[index]} |"
    done
} > "$summary"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$summary" "$OUT/"
    [ -n "$page" ] && cp "$page" "${page%.md}.json" "$OUT/" 2>/dev/null
    # the logs and results, not the synthetic data, run directories and compile caches the parts made
    (cd "$WORK" && find . -path ./tmp -prune -o -path ./inductor -prune -o -path ./losses/data -prune -o -type f \
        \( -name '*.log' -o -name '*.result' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) -print |
        tar -czf "$OUT/gpu_check_logs.tar.gz" -T -) 2>/dev/null
fi
echo
echo "gpu_check on $DEVICE: $((SECONDS - STARTED))s; logs in $WORK${OUT:+ (and \$OUT/gpu_check_logs.tar.gz)}"
cat "$summary"
exit "$failed"

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
#   bench    python -m m3dt.bench --device cuda --quick at fp32, tf32 and bf16, with and without
#            --compile reduce-overhead, combined into benchmarks/{gpu}.md and .json
# The first four run side by side (none of them is timed); the bench runs after them, alone.
#
#   bash scripts/gpu_check.sh                               # on a GPU machine (about 6 minutes on an H100/H200)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh --tiny   # rehearsal of the same parts on a CPU, small sizes
#   GPU_CHECK_PARTS=bench,memory bash scripts/gpu_check.sh  # some parts only
# Without a GPU (and without GPU_CHECK_DEVICE) it says so in one line and exits 0. Everything it writes is in
# a work folder (printed), benchmarks/ (GPU runs only) and, when $OUT is set, copied there. It exits 1 when
# a part failed or ran out of time. GPU_CHECK_BUDGET: seconds for all parts (default 400; --tiny 4000, and each
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

BUDGET=${GPU_CHECK_BUDGET:-$([ "$TINY" = 1 ] && echo 4000 || echo 400)}
LIMIT_SCALE=$([ "$TINY" = 1 ] && echo 6 || echo 1)
PARTS=${GPU_CHECK_PARTS:-tests,chain,compile,memory,losses,bench}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK/tmp"
touch "$WORK/.started"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL=${MUJOCO_GL:-disable} WANDB_MODE=${WANDB_MODE:-offline}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
STARTED=$SECONDS
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --device "$DEVICE" -m device)  # + --basetemp per part
# The bench: the paper's model in quick mode on a GPU; a tiny model on the CPU rehearsal. The benchmark file
# of a GPU run goes to benchmarks/; a rehearsal's stays in the work folder (benchmarks/cpu-*.md is the CPU's).
BENCH=("$PYTHON" -m m3dt.bench --quick --device "$DEVICE" --env_rollouts 0)
MEMORY=("$PYTHON" -m m3dt.memory check --device "$DEVICE")
BENCHMARKS=$ROOT/benchmarks
LOSS_RUN=(--config configs/demo.yaml --max_iters 400 --log_every 100)
if [ "$TINY" = 1 ]; then
    LOSS_RUN=(--config configs/demo.yaml --max_iters 40 --log_every 10 --embed_dim 32 --n_layer 2 --n_head 2)
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
declare -A PID_OF=() START_OF=()

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

launch() {  # launch NAME LIMIT COMMAND...: run in the background under a time limit, log in the work folder
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - STARTED)))
    local log
    log="$WORK/$(printf %02d "${#NAMES[@]}")-${name//[^a-z0-9]/_}.log"
    NAMES+=("$name")
    LOGS+=("$log")
    if [ "$left" -lt 30 ]; then
        RESULTS+=("SKIP (out of time)")
        TIMES+=(0)
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[$(date +%T)] start  $name (limit ${limit}s)"
    RESULTS+=("running")
    TIMES+=(0)
    ( cd "$ROOT" && exec timeout --kill-after=10 "$limit" "$@" ) > "$log" 2>&1 &
    PID_OF[$((${#NAMES[@]} - 1))]=$!
    START_OF[$((${#NAMES[@]} - 1))]=$SECONDS
}

collect() {  # wait for every launched part and record how it ended
    local index status
    for index in "${!PID_OF[@]}"; do
        wait "${PID_OF[$index]}"
        status=$?
        TIMES[index]=$((SECONDS - START_OF[$index]))
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
print('stage-1 loss by step, the demo config on synthetic data, seed 0:')
for precision in ('fp32', 'tf32', 'bf16'):
    lines = (pathlib.Path(sys.argv[1]) / precision / 'stage1' / 'metrics.jsonl').read_text().splitlines()
    print(f'  {precision}: ' + ' / '.join(f'{record[\"step\"]}: {record[\"loss\"]:.4f}' for record in map(json.loads, lines)))" \
        "$WORK/losses"
}

# Side by side: nothing here is timed.
wanted tests && launch "tests: equivalence on $DEVICE" 240 "${PYTEST[@]}" --basetemp "$WORK/tmp/tests" \
    tests/test_model.py tests/test_data.py tests/test_precision.py tests/test_evaluate.py tests/test_imports.py \
    tests/test_pipeline.py::test_deterministic_training_repeats_bit_for_bit
wanted chain && launch "chain: every stage on $DEVICE" 240 "${PYTEST[@]}" --basetemp "$WORK/tmp/chain" \
    tests/test_pipeline.py -k "not compiled and not deterministic"
wanted compile && launch "compile: modes against eager" 300 "${PYTEST[@]}" --basetemp "$WORK/tmp/compile" \
    tests/test_pipeline.py -k compiled
if wanted memory; then
    launch "memory: peaks against plans, fp32" 240 "${MEMORY[@]}" --precision fp32 --out "$WORK/memory_fp32.json"
    launch "memory: peaks against plans, bf16" 240 "${MEMORY[@]}" --precision bf16 --out "$WORK/memory_bf16.json"
fi
wanted losses && launch "losses: stage 1 in fp32, tf32, bf16" 240 \
    bash -c "$(declare -p LOSS_RUN PYTHON DEVICE WORK); $(declare -f stage1_losses); stage1_losses"
collect

# Alone, one after another, most wanted first: what does not fit the budget is reported as skipped.
if wanted bench; then
    run "bench: bf16 + compile reduce-overhead" 200 "${BENCH[@]}" --precision bf16 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/1_bf16_compiled"
    run "bench: fp32" 120 "${BENCH[@]}" --precision fp32 --out "$WORK/bench/2_fp32"
    run "bench: tf32" 120 "${BENCH[@]}" --precision tf32 --out "$WORK/bench/3_tf32"
    run "bench: bf16" 120 "${BENCH[@]}" --precision bf16 --out "$WORK/bench/4_bf16"
    run "bench: fp32 + compile reduce-overhead" 200 "${BENCH[@]}" --precision fp32 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/5_fp32_compiled"
    run "bench: tf32 + compile reduce-overhead" 200 "${BENCH[@]}" --precision tf32 --compile reduce-overhead \
        --stages 1,3 --out "$WORK/bench/6_tf32_compiled"
    if compgen -G "$WORK/bench/*/*.json" > /dev/null; then
        run "bench: combined page" 60 "$PYTHON" -m m3dt.bench combine $(ls -d "$WORK"/bench/*/) --out "$BENCHMARKS"
    fi
fi

# ------------------------------------------------------------------------------------------ report
failed=0
for index in "${!NAMES[@]}"; do
    [ "${RESULTS[index]}" = PASS ] && continue
    failed=1
    echo
    echo "---- ${NAMES[index]}: ${RESULTS[index]}; last lines of ${LOGS[index]}"
    [ -f "${LOGS[index]}" ] && grep -v '^\s*$' "${LOGS[index]}" | tail -n 25 | cut -c 1-400
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
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude ./inductor --exclude ./tmp . 2>/dev/null
fi
echo
echo "gpu_check on $DEVICE: $((SECONDS - STARTED))s; logs in $WORK${OUT:+ (and \$OUT/gpu_check_logs.tar.gz)}"
cat "$summary"
exit "$failed"

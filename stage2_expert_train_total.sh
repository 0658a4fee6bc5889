#!/usr/bin/env bash
# Stage 2: train every expert of a grouping, spread over the visible GPUs.
#   no GPU or one GPU: one process trains all experts at once (stage2_expert_train.py --all);
#   N GPUs:            one process per GPU, GPU g training experts g, g+N, g+2N, ... at once (--all --shard g/N),
#                      its log in {run_dir}/stage2/experts_{grouping}_{expert_num}/train_gpu{g}.log.
# GPUS=N uses the first N visible GPUs (default: all of them); more than are visible is refused unless the
# experts train on the CPU (--device cpu). PYTHON=... picks the interpreter (default: the repository's
# .venv/bin/python when present, else python3). Paths are taken relative to the directory it is run from.
# A second copy for the same grouping and expert count is refused while one runs (train.lock in that
# folder); Ctrl-C (or SIGTERM) stops every shard, and rerunning the command resumes. Every option is passed on:
#   bash stage2_expert_train_total.sh --prefix_name mt160 --grouping gradient --expert_num 48 --data_path ./mt160_used
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
train=("$PYTHON" "$repo/stage2_expert_train.py" --all)

for argument in "$@"; do
    if [ "$argument" = "--help" ] || [ "$argument" = "-h" ]; then
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { print substr($0, 3) }' "${BASH_SOURCE[0]}"
        echo "interpreter: $PYTHON"
        echo
        exec "${train[@]}" --help
    fi
done

# The resolved options (defaults < --config YAML < flags), wherever the user set them (a bad one stops
# here), and the number of visible CUDA devices (not asked when the run directory is missing: the stage
# then says so).
resolved=$("$PYTHON" -c '
import sys
from m3dt.config import ConfigError, parse_config
try:
    config = parse_config("", sys.argv[1:])
except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
print(config.expert_num, config.grouping, config.device, config.resolved_run_dir(), sep="\n")
if config.resolved_run_dir().is_dir():
    import torch
    print(torch.cuda.device_count())' "$@") || exit $?
{ read -r expert_num; read -r grouping; read -r device; read -r run_dir; read -r visible; } <<< "$resolved" || true
[ -d "$run_dir" ] || exec "${train[@]}" "$@"  # which says what is missing
experts_dir=$run_dir/stage2/experts_${grouping}_${expert_num}
gpus=${GPUS:-$visible}
if ! [[ "$gpus" =~ ^[0-9]+$ ]]; then
    echo "error: GPUS must be a number of GPUs, got '$gpus'" >&2
    exit 2
fi
if [ "$gpus" -gt "$visible" ] && [ "$device" != cpu ]; then
    echo "error: GPUS=$gpus but $visible CUDA device(s) are visible: set GPUS to at most $visible, or pass --device cpu to run the shards on the CPU" >&2
    exit 2
fi
shards=$((gpus < expert_num ? gpus : expert_num))
if [ "$shards" -le 1 ] && [ "$visible" -eq 0 ] && [ "$device" != cpu ]; then
    echo "no CUDA device is visible: one process trains all $expert_num experts on the CPU"
fi

# One copy at a time per grouping and expert count: the lock is held by this shell and every shard it
# starts (they inherit it), so it stays taken until the last of them ends.
mkdir -p "$experts_dir"
lock=$experts_dir/train.lock
if command -v flock > /dev/null; then
    exec 9> "$lock"
    if ! flock -n 9; then
        echo "error: the experts of $grouping grouping with $expert_num experts are being trained by another process (lock $lock); wait for it or stop it" >&2
        exit 2
    fi
else
    echo "note: flock is not installed: nothing stops a second copy of this command for the same experts" >&2
fi

if [ "$shards" -le 1 ]; then
    exec "${train[@]}" "$@"
fi

# GPU g of this script is the g-th entry of an existing CUDA_VISIBLE_DEVICES list, or device g.
IFS=, read -ra devices <<< "${CUDA_VISIBLE_DEVICES:-}"
where=$([ "$device" = cpu ] && echo "processes on the CPU (--device cpu)" || echo "GPUs, one each")
echo "training $expert_num experts in $shards shards, $where (logs: $experts_dir/train_gpu*.log)"
pids=()
stop() {
    trap - INT TERM
    echo "stopping the $shards shards; rerun the same command to resume from their last checkpoints" >&2
    kill -TERM "${pids[@]}" 2> /dev/null || true
    wait || true
    exit 130
}
trap stop INT TERM
for ((gpu = 0; gpu < shards; gpu++)); do
    CUDA_VISIBLE_DEVICES=${devices[gpu]:-$gpu} PYTHONUNBUFFERED=1 "${train[@]}" --shard "$gpu/$shards" "$@" \
        >> "$experts_dir/train_gpu${gpu}.log" 2>&1 &  # appended: a rerun keeps the log of the run it resumes
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || echo "a shard failed; see $experts_dir/train_gpu*.log (rerun to resume)" >&2
exit "$status"

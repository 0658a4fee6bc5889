#!/usr/bin/env bash
# Stage 2: train every expert of a grouping, spread over the visible GPUs.
#   no GPU or one GPU: one process trains all experts at once (stage2_expert_train.py --all);
#   N GPUs:            one process per GPU, GPU g training experts g, g+N, g+2N, ... at once (--all --shard g/N),
#                      its log in {run_dir}/stage2/expert_train_gpu{g}.log.
# GPUS=N uses the first N visible GPUs (default: all of them). Every option is passed on, e.g.:
#   bash stage2_expert_train_total.sh --prefix_name mt160 --grouping gradient --expert_num 48 --data_path ./mt160_used
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# The resolved options (defaults < --config YAML < flags), wherever the user set them; a bad one stops here.
resolved=$("$PYTHON" -c '
import sys
from m3dt.config import ConfigError, parse_config
try:
    config = parse_config("", sys.argv[1:])
except ConfigError as error:
    sys.exit(f"error: {error}")
print(config.expert_num)
print(config.resolved_run_dir())' "$@")
expert_num=${resolved%%$'\n'*}
run_dir=${resolved#*$'\n'}
gpus=${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
shards=$((gpus < expert_num ? gpus : expert_num))

if [ "$shards" -le 1 ]; then
    exec "$PYTHON" stage2_expert_train.py --all "$@"
fi

# GPU g of this script is the g-th entry of an existing CUDA_VISIBLE_DEVICES list, or device g.
IFS=, read -ra visible <<< "${CUDA_VISIBLE_DEVICES:-}"
mkdir -p "$run_dir/stage2"
echo "training $expert_num experts in $shards shards, one per GPU (logs: $run_dir/stage2/expert_train_gpu*.log)"
pids=()
for ((gpu = 0; gpu < shards; gpu++)); do
    CUDA_VISIBLE_DEVICES=${visible[gpu]:-$gpu} "$PYTHON" stage2_expert_train.py --all --shard "$gpu/$shards" "$@" \
        > "$run_dir/stage2/expert_train_gpu${gpu}.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || echo "a shard failed; see $run_dir/stage2/expert_train_gpu*.log (rerun to resume)" >&2
exit "$status"

#!/usr/bin/env bash
# Stage 2: train every expert of a grouping, spread over the visible GPUs.
#   no GPU or one GPU: one process trains all experts at once (stage2_expert_train.py --all);
#   N GPUs:            one process per GPU, GPU g training experts g, g+N, g+2N, ... one after another.
# Every option is passed on to stage2_expert_train.py, e.g.:
#   bash stage2_expert_train_total.sh --prefix_name mt160 --grouping gradient --expert_num 48 --data_path ./mt160_used
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# The resolved options (defaults < --config YAML < flags), so that expert_num comes from wherever the user set it.
expert_num=$("$PYTHON" -c 'import sys; from m3dt.config import parse_config; print(parse_config("", sys.argv[1:]).expert_num)' "$@")
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')

if [ "$gpus" -le 1 ]; then
    exec "$PYTHON" stage2_expert_train.py --all "$@"
fi

echo "training $expert_num experts on $gpus GPUs"
pids=()
for ((gpu = 0; gpu < gpus; gpu++)); do
    (
        for ((expert = gpu; expert < expert_num; expert += gpus)); do
            CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" stage2_expert_train.py --expert_id "$expert" "$@"
        done
    ) > "stage2_expert_train_gpu${gpu}.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || echo "some experts failed; see stage2_expert_train_gpu*.log (rerun to resume)" >&2
exit "$status"

"""Speed of every stage: the project's training step against the reference's way of doing it.

    python -m m3dt.bench                          # paper configuration, every stage (cuda when available)
    python -m m3dt.bench --quick                  # fewer steps and experts: under 5 minutes on 2 CPU cores
    python -m m3dt.bench --device cuda --precision bf16 --compile

At the paper configuration (batch 16, K=20 + a 5-step prompt = 75 tokens, 6 layers, width 256, 8 heads,
dropout 0.1) and on synthetic data in the MT160 layout, one run times, per stage:
- fast: the project's step (m3dt/train.py): device-resident sampler, stacked experts (one batched matmul),
  AdamW (fused on CUDA), per-expert clipping for stage 2, no host sync;
- naive: the same math the reference's way (m3dt/naive.py): experts in a Python loop, batches built per
  sample in numpy and copied to the device, default AdamW, loss.item() every step.
It reports the median ms/step after warm-up, the ratio, the achieved TFLOP/s against the measured matmul
peak, the paper schedule's projected hours, and policy forwards per second for lockstep evaluation (model
forward only: env stepping is measured by m3dt/evaluate.py). Writes benchmarks/{device}.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from m3dt.config import Config
from m3dt.data import Batch, DeviceSampler, TaskDataset
from m3dt.grouping import random_grouping
from m3dt.model import PromptDecisionTransformer, action_loss
from m3dt.naive import NaiveSampler, naive_model, naive_optimizer, naive_train_step
from m3dt.stages import build_model, freeze_all_but
from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM, resolve_tasks
from m3dt.train import build_optimizer, clip_gradients, resolve_device, round_robin_table, warmup_factor

# Rollouts per task in the evaluation protocol (SPEC section 5), to size one MT160 evaluation.
EPISODES_PER_FAMILY = {"metaworld": 10, "dmc": 10, "ant_dir": 1, "cheetah_vel": 1}
TRAIN_EPISODES = 2  # synthetic training episodes per task (plus the 2 prompt episodes)
DEFAULTS = {  # per mode: timed steps, warm-up steps, stage-3 expert counts, stage-2 --all groups, tasks, eval rows
    "full": {"steps": 20, "warmup": 5, "experts": "8,16,48", "groups": 48, "tasks": 160, "eval_rows": 1560},
    "quick": {"steps": 3, "warmup": 1, "experts": "8", "groups": 8, "tasks": 48, "eval_rows": 64},
}


# ------------------------------------------------------------------------------------------ synthetic data
def write_synthetic_dataset(root: Path, task_names: list[str], seed: int = 0) -> None:
    """TRAIN_EPISODES + 2 full-horizon episodes per task in the MT160 layout: random states and rewards in
    the task's native dims (zero-padded to 39/8). Only the shapes matter for speed; full horizons make the
    naive sampler's per-sample return-to-go loop as long as on the real data."""
    rng = np.random.default_rng(seed)
    for name in task_names:
        task = resolve_tasks(None, name, 0) and __import__("m3dt.tasks").tasks.get_task(name)
        folder = root / name
        folder.mkdir(parents=True)
        for episode in range(TRAIN_EPISODES + 2):
            steps = task.horizon
            observations = np.zeros((steps, MAX_OBS_DIM), dtype=np.float32)
            observations[:, : task.obs_dim] = rng.normal(size=(steps, task.obs_dim))
            actions = np.zeros((steps, MAX_ACT_DIM), dtype=np.float32)
            actions[:, : task.act_dim] = rng.uniform(-1, 1, size=(steps, task.act_dim))
            terminals = np.zeros(steps, dtype=bool)
            terminals[-1] = True
            np.savez(folder / f"{episode}.npz", observations=observations, actions=actions,
                     rewards=rng.uniform(size=steps).astype(np.float32), terminals=terminals)

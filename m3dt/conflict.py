"""Gradient conflict between tasks while the backbone trains (stage 1, `--conflict_every N`).

The paper stops backbone training where the conflict between task gradients peaks (400k steps on MT160):
after that point the shared parameters mostly trade one task's progress for another's, which is what the
experts of stages 2 and 3 take over. Every N steps this measures, on a fixed set of tasks spread over the
task list, each task's gradient of the whole backbone (the mean of a few clipped batch gradients, as the
grouping stage computes them), and logs to metrics.jsonl
  - conflict_share: the share of task pairs whose gradients have a negative cosine,
  - conflict_mean_cosine: the mean cosine over those pairs.
The measurement draws each task's batches from a stream of its own, seeded by (--seed, step, task), and
restores the global stream afterwards, so turning it on does not change the training run and a resumed run
measures what the uninterrupted one did. Under torchrun each rank computes the gradients of the chosen tasks
in its own share and the ranks gather them: the same tasks and batches as in one process. `gradient_conflict.png` in the stage-1 folder plots both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from m3dt.config import ConfigError
from m3dt.data import DeviceSampler
from m3dt.grouping import task_gradients
from m3dt.model import PromptDecisionTransformer
from m3dt.run import atomic_path
from m3dt.train import Distributed, TrainingHooks

PLOT = "gradient_conflict.png"


def spread_tasks(task_count: int, chosen: int) -> list[int]:
    """`chosen` task indices evenly spread over 0..task_count-1 (all of them when there are fewer), so that
    every family of the official task order is represented."""
    return sorted({int(index) for index in np.linspace(0, task_count - 1, min(chosen, task_count)).round()})


def conflict_measures(gradients: torch.Tensor) -> dict[str, float]:
    """gradients (tasks, parameters) -> share of task pairs with negative cosine and their mean cosine.
    Needs at least two tasks; a task with an all-zero gradient counts as cosine 0 with every other."""
    unit = gradients.double()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cosine = unit @ unit.T
    first, second = torch.triu_indices(len(gradients), len(gradients), offset=1)
    pairs = cosine[first, second]
    return {"conflict_share": float((pairs < 0).double().mean()), "conflict_mean_cosine": float(pairs.mean())}


class GradientConflict(TrainingHooks):
    """The stage-1 loop's hook that measures conflict every `every` steps (see the module docstring).

    `tasks` are indices into the whole task list; under torchrun task i is the (i // world_size)-th task of
    rank i % world_size's share (m3dt.stages.rank_share), and every rank must call after_step."""

    def __init__(self, model: PromptDecisionTransformer, sampler: DeviceSampler, tasks: list[int], every: int,
                 batches: int, max_norm: float, seed: int, distributed: Distributed = Distributed()):
        if len(tasks) < 2:
            raise ConfigError("--conflict_every needs at least two tasks (and --conflict_tasks >= 2)")
        self.model, self.sampler, self.tasks, self.every = model, sampler, tasks, every
        self.batches, self.max_norm, self.seed, self.distributed = batches, max_norm, seed, distributed

    def after_step(self, step: int) -> dict[str, float]:
        """Every `every` steps, the chosen tasks' conflict_share, conflict_mean_cosine and conflict_tasks (count)."""
        if step % self.every:
            return {}
        world = self.distributed.world_size
        by_rank = [[task for task in self.tasks if task % world == rank] for rank in range(world)]
        device = self.sampler.device
        rows = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout stream kept
            for task in by_rank[self.distributed.rank]:
                generator = torch.Generator().manual_seed(batch_seed(self.seed, step, task))  # CPU, as the sampler's
                rows.append(task_gradients(self.model, self.sampler, [task // world], self.batches, self.max_norm,
                                           generator, progress=False))  # task // world: its place in the share
        if world == 1:
            return {**conflict_measures(torch.cat(rows)), "conflict_tasks": len(self.tasks)}
        # every rank pads its rows to the largest share, so that one all_gather of equal shapes carries them
        width = sum(parameter.numel() for parameter in self.model.parameters() if parameter.requires_grad)
        padded = torch.zeros(max(map(len, by_rank)), width, device=device)
        for position, row in enumerate(rows):
            padded[position] = row[0].to(device)
        shares = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shares, padded)
        gradients = torch.stack([shares[task % world][by_rank[task % world].index(task)] for task in self.tasks])
        return {**conflict_measures(gradients.cpu()), "conflict_tasks": len(self.tasks)}


def batch_seed(seed: int, step: int, task: int) -> int:
    """The seed of one task's measurement batches at one step (independent of world size and resume)."""
    return int(np.random.SeedSequence([seed, step, task]).generate_state(1)[0])


def read_conflict(metrics: Path) -> list[dict[str, float]]:
    """The conflict records of a metrics.jsonl (a torn last line is skipped)."""
    records = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "conflict_share" in record:
            records.append(record)
    return records


def plot_conflict(metrics: Path, out: Path) -> Path | None:
    """Plot the conflict curve of `metrics` into `out` (PNG); None when the log has no conflict records."""
    records = read_conflict(metrics)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [record["step"] for record in records]
    share = [100 * record["conflict_share"] for record in records]
    cosine = [record["conflict_mean_cosine"] for record in records]
    peak = steps[int(np.argmax(share))] if max(share) > 0 else None  # no conflict at all: no peak to mark
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(steps, share, marker="o", color="tab:red")
    top.set_ylim(0, max(5.0, 1.1 * max(share)))  # a share, 0-100: all zeros sit on 0, not mid-axis
    top.set_ylabel("task pairs with\nnegative cosine (%)")
    bottom.plot(steps, cosine, marker="o", color="tab:blue")
    bottom.axhline(0.0, color="gray", linewidth=0.8)
    bottom.set_ylabel("mean cosine\nbetween task gradients")
    bottom.set_xlabel("stage-1 training step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    if peak is not None:
        for axes in (top, bottom):
            axes.axvline(peak, color="black", linestyle="--", linewidth=0.8)
    where = f"highest share at step {peak:,}" if peak is not None else "no task pair in conflict at any measured step"
    top.set_title(f"stage 1: gradient conflict between {records[-1]['conflict_tasks']} tasks\n({where})", fontsize=10)
    figure.tight_layout()
    with atomic_path(out) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return out

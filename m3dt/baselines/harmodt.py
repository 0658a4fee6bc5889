"""HarmoDT (Hu et al., ICML 2024, "HarmoDT: Harmony Multi-Task Decision Transformer for Offline RL"):
one shared Prompt-DT whose parameters each task sees through its own binary mask, the task's "harmony
subspace", found by a bi-level procedure. Written from the facts of the authors' public code (GitHub
charleshsc/HarmoDT: main.py, prompt_dt/fl_utils.py, prompt_dt/prompt_seq_trainer.py); the README's
"Comparison methods" section lists them with their defaults.

Masks: one per task, elementwise over every parameter, initialised at random with the density
1 - `--harmodt_sparsity` spread over layers by the Erdos-Renyi-kernel rule (small and 1-D tensors dense,
large matrices sparser), each task its own draw.

Inner loop, every step (one task, round-robin, as every method here):
  1. the transformer's weights (blocks and final LayerNorm) are multiplied by the task's mask in place;
     embeddings, the token LayerNorm and the action head are used whole (the reference spares every
     parameter named `embed*`/`predict*`);
  2. forward, loss, backward; the gradient is clipped (global norm, all parameters) and then masked on
     the transformer's weights;
  3. AdamW steps every parameter; then every masked-out entry, of every parameter, is put back to its
     value before the step: a task updates only its own subspace, and its masked-out weights are zero
     only while it computes.
Outer loop, every `--harmodt_mask_interval` steps: each task's gradient (one batch, masked as above) and
their mean, the harmony gradient h. Each task then swaps k mask entries, k rising from `--harmodt_eta_min`
to `--harmodt_eta_max` at mid-training and back (a cosine over the run):
  - revive (0 -> 1) the k masked-out entries with the highest agreement h * g_task,
  - prune (1 -> 0) the k kept entries with the lowest gamma * h * g_task + importance, importance = g_task^2
    (`--harmodt_select fisher`) or |weight| (`magnitude`),
so each task's mask keeps its density. Evaluation runs each task with its masked weights.

Trains: every parameter, each task only inside its mask. Freezes: nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from m3dt.baselines import load_weights
from m3dt.config import Config
from m3dt.data import Batch, DeviceSampler
from m3dt.grouping import task_gradients
from m3dt.model import PromptDecisionTransformer
from m3dt.run import ArtifactError, RunDir
from m3dt.model import build_model, set_trainable
from m3dt.train import TrainingHooks

NAME = "HarmoDT"
HYPERPARAMETERS = ("harmodt_sparsity", "harmodt_mask_interval", "harmodt_eta_min", "harmodt_eta_max",
                   "harmodt_gamma", "harmodt_select")
DISTRIBUTED = False  # one task per step and a mask per task: one process, as the reference
MASKS_KEY = "harmodt.task_masks"  # in the artifact: (tasks, ceil(parameters / 8)) uint8, bit-packed masks
UNMASKED_PREFIXES = ("embed", "action_head")  # our names of the reference's unmasked `embed*`/`predict*` parameters


def steps(config: Config) -> int:
    """HarmoDT's schedule: `--harmodt_steps` steps."""
    return config.harmodt_steps


def build(config: Config, run: RunDir) -> tuple[PromptDecisionTransformer, dict[str, torch.nn.Parameter]]:
    """A fresh Prompt-DT (no experts), every parameter trainable."""
    model = build_model(config, config.dropout)
    return model, set_trainable(model, "")


def hooks(model: PromptDecisionTransformer, sampler: DeviceSampler, config: Config, total_steps: int) -> "TaskMasks":
    """The task masks, one random ERK draw per task of the sampler at density 1 - `--harmodt_sparsity` (seeded by
    `--seed`), on the sampler's device."""
    generator = torch.Generator().manual_seed(config.seed)
    task_count = len(sampler.task_sizes)
    masks = initial_masks(model, task_count, 1.0 - config.harmodt_sparsity, generator).to(sampler.device)
    return TaskMasks(model, masks, sampler, config, total_steps, generator)


def artifact_tensors(task_masks: "TaskMasks") -> dict[str, torch.Tensor]:
    """The task masks to save beside the weights: {MASKS_KEY: (tasks, ceil(parameters / 8)) uint8, bit-packed}."""
    return {MASKS_KEY: pack(task_masks.masks)}


def policy(fields: dict[str, Any], manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "MaskedPolicy":
    """The evaluated HarmoDT (dropout off): the weights of `tensors` with each task's mask (popped from `tensors`).
    Raises ArtifactError when the weights do not fit or the masks are missing or not one per manifest task."""
    model = build_model(fields, dropout=0.0)
    packed = tensors.pop(MASKS_KEY, None)
    load_weights(model, tensors, manifest)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    if packed is None or packed.shape != (len(manifest["tasks"]), math.ceil(parameter_count / 8)):
        raise ArtifactError(f"{manifest['artifact']}: no task masks of {len(manifest['tasks'])} tasks ({MASKS_KEY})")
    return MaskedPolicy(model, unpack(packed, parameter_count))


# ------------------------------------------------------------------------------------------ masks
def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-tensor densities with overall `density` (share of ones) by the Erdos-Renyi-kernel rule, as the
    reference's ERK_maskinit: density of a tensor proportional to sum(shape) / prod(shape); a tensor whose
    density would exceed 1 is made dense and the rest rescaled, repeatedly."""
    dense: set[str] = set()
    while True:
        kept, divisor = 0.0, 0.0
        raw = {}
        for name, shape in shapes.items():
            size = math.prod(shape)
            if name in dense:
                kept -= size * (1.0 - density)
            else:
                kept += size * density
                raw[name] = sum(shape) / size
                divisor += raw[name] * size
        if not raw:
            return {name: 1.0 for name in shapes}
        epsilon = kept / divisor
        largest = max(raw.values())
        if largest * epsilon <= 1.0:
            return {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}
        dense |= {name for name, value in raw.items() if value == largest}


def initial_masks(model: PromptDecisionTransformer, task_count: int, density: float,
                  generator: torch.Generator) -> torch.Tensor:
    """(tasks, parameters) bool, flat in `model.named_parameters()` order: each entry kept with its tensor's
    ERK density, an independent draw per task (the reference's "random" mode)."""
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    densities = erk_densities(shapes, density)
    rows = []
    for _ in range(task_count):
        rows.append(torch.cat([(torch.rand(math.prod(shape), generator=generator) < densities[name])
                               for name, shape in shapes.items()]))
    return torch.stack(rows)


def pack(masks: torch.Tensor) -> torch.Tensor:
    """bool (tasks, n) -> uint8 (tasks, ceil(n / 8)), eight entries per byte."""
    return torch.from_numpy(np.packbits(masks.cpu().numpy(), axis=1))


def unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 (tasks, ceil(count / 8)) on the CPU -> bool (tasks, count): the inverse of `pack`."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=count).astype(bool))


def forward_masked(name: str) -> bool:
    """Whether a parameter's weights are multiplied by the task's mask in the forward (the transformer's)."""
    return not name.startswith(UNMASKED_PREFIXES)


def mask_views(model: torch.nn.Module, row: torch.Tensor) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, its part of the flat mask row shaped like it), in `named_parameters()` order."""
    views, offset = [], 0
    for name, parameter in model.named_parameters():
        views.append((name, parameter, row[offset : offset + parameter.numel()].view(parameter.shape)))
        offset += parameter.numel()
    return views


def change_count(step_index: int, total_steps: int, eta_min: int, eta_max: int) -> int:
    """Mask entries each task swaps at the update after step `step_index` (0-based) of `total_steps`: eta_min
    at the start and the end, eta_max halfway, a cosine between (the reference main.py's cosine_annealing)."""
    alpha = step_index / total_steps
    return int(eta_max + 0.5 * (eta_min - eta_max) * (1.0 + math.cos(2.0 * math.pi * alpha)))


def top_k_entries(scores: torch.Tensor, candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the k largest `scores` among `candidates` (bool), ties at the k-th value broken uniformly
    at random (the reference leaves them to torch.topk's order)."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    threshold = torch.topk(scores, k).values[-1]
    above = (scores > threshold).nonzero().flatten()
    tied = (scores == threshold).nonzero().flatten()
    pick = torch.randperm(len(tied), generator=generator)[: k - len(above)].to(tied.device)
    return torch.cat([above, tied[pick]])


class TaskMasks(TrainingHooks):
    """HarmoDT's masks and what they do to each step of the loop (the module docstring)."""

    def __init__(self, model: PromptDecisionTransformer, masks: torch.Tensor, sampler: DeviceSampler, config: Config,
                 total_steps: int, generator: torch.Generator):
        self.model, self.masks, self.sampler, self.config = model, masks, sampler, config
        self.total_steps, self.generator = total_steps, generator
        self.views: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        self.before: list[torch.Tensor] = []

    @torch.no_grad()
    def before_forward(self, task_indices: torch.Tensor) -> None:
        """Keep a copy of every parameter, then multiply the transformer's weights by the mask of the step's task
        (that of the first row group) in place."""
        row = self.masks.index_select(0, task_indices[:1].to(self.masks.device))[0]  # no host sync
        self.views = mask_views(self.model, row)
        self.before = [parameter.detach().clone() for _, parameter, _ in self.views]
        for name, parameter, mask in self.views:
            if forward_masked(name):
                parameter.mul_(mask)

    @torch.no_grad()
    def before_update(self) -> None:
        """Mask the (clipped) gradients of the transformer's weights with the step's task mask."""
        for name, parameter, mask in self.views:
            if forward_masked(name) and parameter.grad is not None:
                parameter.grad.mul_(mask)

    @torch.no_grad()
    def after_update(self) -> None:
        """Put every masked-out entry, of every parameter, back to its value before the forward."""
        for (_, parameter, mask), before in zip(self.views, self.before):
            parameter.copy_(torch.where(mask, parameter, before))
        self.views, self.before = [], []

    def after_step(self, step: int) -> dict[str, float]:
        """Every `--harmodt_mask_interval` steps, swap `change_count` entries of each task's mask; returns that count
        as harmodt_mask_changes (no metrics at other steps)."""
        if step % self.config.harmodt_mask_interval:
            return {}
        count = change_count(step - 1, self.total_steps, self.config.harmodt_eta_min, self.config.harmodt_eta_max)
        if count > 0:
            self.update(count)
        return {"harmodt_mask_changes": count}

    def task_gradient(self, task: int) -> torch.Tensor:
        """The flat gradient of one batch of `task` through its mask (clipped, then masked), as the reference's
        update_gradient; the weights are left as they were."""
        self.before_forward(torch.tensor([task]))
        gradient = task_gradients(self.model, self.sampler, [task], 1, self.config.grad_clip, progress=False)[0]
        gradient = gradient.to(self.masks.device)
        forward_masks = torch.cat([mask.flatten() if forward_masked(name) else torch.ones_like(mask.flatten())
                                   for name, _, mask in self.views])
        with torch.no_grad():
            for (_, parameter, _), before in zip(self.views, self.before):
                parameter.copy_(before)
        self.views, self.before = [], []
        return gradient * forward_masks

    def update(self, count: int) -> None:
        """Swap `count` entries of every task's mask (module docstring)."""
        gradients = torch.stack([self.task_gradient(task) for task in range(len(self.masks))])
        self.swap(gradients, count)

    @torch.no_grad()
    def swap(self, gradients: torch.Tensor, count: int) -> None:
        """Given the tasks' flat masked gradients (tasks, parameters), revive and prune up to `count` entries of each
        task's mask (fewer when the mask has fewer ones or zeros), in place, as the module docstring says."""
        harmony = gradients.mean(dim=0)
        weights = torch.cat([parameter.detach().flatten() for parameter in self.model.parameters()])
        for task, gradient in enumerate(gradients):
            mask = self.masks[task]
            agreement = harmony * gradient
            k = min(count, int(mask.sum()), int((~mask).sum()))
            if k == 0:
                continue
            # The reference scores revivals as agreement + 1 in float32, which rounds away agreements below
            # about 6e-8; kept, so that the same entries tie.
            revive = top_k_entries(agreement + 1.0, ~mask, k, self.generator)
            importance = gradient.square() if self.config.harmodt_select == "fisher" else weights.abs()
            prune = top_k_entries(-(self.config.harmodt_gamma * agreement + importance), mask, k, self.generator)
            mask[revive] = True
            mask[prune] = False

    def state_dict(self) -> dict[str, Any]:
        """The masks (bit-packed) and the tie-breaking generator's state, for the checkpoint."""
        return {"harmodt_masks": pack(self.masks), "harmodt_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the masks and the generator from a checkpoint's `state_dict`."""
        self.masks.copy_(unpack(state["harmodt_masks"], self.masks.shape[1]).to(self.masks.device))
        self.generator.set_state(state["harmodt_generator"])


# ------------------------------------------------------------------------------------------ evaluation
class MaskedPolicy(torch.nn.Module):
    """The trained HarmoDT as evaluation runs it: each row through its task's masked weights. Rows are
    grouped by task (`batch.task_index`), one forward per task present."""

    def __init__(self, model: PromptDecisionTransformer, masks: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("masks", masks)

    def masked_parameters(self, task: int) -> dict[str, torch.Tensor]:
        """The model's parameters by name as task `task` (run's task index) sees them: the transformer's masked."""
        return {name: parameter * mask if forward_masked(name) else parameter
                for name, parameter, mask in mask_views(self.model, self.masks[task])}

    @torch.no_grad()
    def forward(self, batch: Batch, last_step_only: bool = False) -> torch.Tensor:
        """Predicted actions (B, K, 8), or (B, 1, 8) with `last_step_only`, each row through its task's masked
        weights. Raises ValueError when `batch.task_index` is None."""
        if batch.task_index is None:
            raise ValueError("HarmoDT needs each row's task (Batch.task_index)")
        outputs = None
        for task in batch.task_index.unique().tolist():
            rows = (batch.task_index == task).nonzero().flatten()
            part = Batch(**{key: None if value is None else value[rows] for key, value in vars(batch).items()})
            predicted = torch.func.functional_call(self.model, self.masked_parameters(task), (part,),
                                                   {"last_step_only": last_step_only})
            if outputs is None:
                outputs = predicted.new_zeros((len(batch.task_index), *predicted.shape[1:]))
            outputs[rows] = predicted
        return outputs

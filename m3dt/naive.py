"""The reference implementation's way of running a training step, kept as the baseline of `m3dt/bench.py`.

It does the same math as the project's path (tests/test_bench_paths.py checks that losses and updated
weights agree), computed the way the authors' code computes it (README, "Speed"):

- experts are a Python list of separate MLP modules called one after another; in stage 3 every expert runs
  on every token and the outputs are summed with the router's softmax weights; stage 2 holds one expert;
- batches are built sample by sample in numpy on the host: an episode drawn in proportion to its length, a
  start uniform in it, a slice, the return-to-go as a Python-loop suffix sum of the remaining rewards,
  left-padding with np.concatenate, normalisation; the prompt is rebuilt the same way every step; every
  array is then copied host-to-device;
- the optimiser is PyTorch's default AdamW (not fused), clipping is torch's global-norm clip over the
  trainable parameters, and the loss is read back with `.item()` every step.

Only the bench and the tests use this module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from m3dt.data import (LOW_RETURN_PROMPT_ROWS, PAD_ACTION, PROMPT_EPISODES, STD_EPSILON, Batch, Episode,
                       check_prompt_length, episode_files, load_episode)
from m3dt.model import PromptDecisionTransformer
from m3dt.moe import ExpertMixture
from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM, Task, get_task

# ----------------------------------------------------------------------------------------------- model


class NaiveExpert(nn.Module):
    """One expert as its own module: Linear d -> 4d, ReLU, Linear 4d -> d, dropout."""

    def __init__(self, embed_dim: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(embed_dim, 4 * embed_dim)
        self.down = nn.Linear(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d): dropout(down(relu(up(x))))."""
        return self.dropout(self.down(F.relu(self.up(x))))


class NaiveMixture(nn.Module):
    """Drop-in for a block's ExpertMixture: with a router, the dense soft mixture looped over experts;
    without one, the single expert of a stage-2 run."""

    def __init__(self, experts: list[NaiveExpert], router: nn.Module | None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = router

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """normed (B, L, d) -> the experts' contribution (B, L, d): without a router the first (only) expert's
        output, else the sum of every expert's output weighted by the router's softmax, one expert after another."""
        if self.router is None:
            return self.experts[0](normed)
        weights = torch.softmax(self.router(normed), dim=-1)
        output = torch.zeros_like(normed)
        for index, expert in enumerate(self.experts):
            output = output + weights[..., index : index + 1] * expert(normed)
        return output


@torch.no_grad()
def naive_mixture(mixture: ExpertMixture) -> NaiveMixture:
    """The same experts (and router) as a stacked mixture, as separate modules. Stacked weights are in
    matmul convention (x @ W), nn.Linear stores W transposed."""
    stacked = mixture.experts
    if mixture.router is None and stacked.num_experts != 1:
        raise ValueError("the reference trains one expert per run: convert a single-expert model")
    if mixture.top_k:
        raise ValueError("the reference's stage 3 is the dense mixture (top_k=0)")
    embed_dim = stacked.up_weight.shape[1]
    experts = []
    for index in range(stacked.num_experts):
        expert = NaiveExpert(embed_dim, stacked.dropout.p).to(stacked.up_weight)
        expert.up.weight.copy_(stacked.up_weight[index].T)
        expert.up.bias.copy_(stacked.up_bias[index, 0])
        expert.down.weight.copy_(stacked.down_weight[index].T)
        expert.down.bias.copy_(stacked.down_bias[index, 0])
        expert.requires_grad_(stacked.up_weight.requires_grad)
        experts.append(expert)
    return NaiveMixture(experts, mixture.router)


def naive_model(model: PromptDecisionTransformer) -> PromptDecisionTransformer:
    """A deep copy of `model` (same weights, same trainable flags) whose expert mixtures are NaiveMixtures."""
    naive = copy.deepcopy(model)
    naive.skip_unread_tokens = False  # the reference's last block computes every token
    for block in naive.blocks:
        if block.expert_mixture is not None:
            block.expert_mixture = naive_mixture(block.expert_mixture)
    return naive


# ----------------------------------------------------------------------------------------------- data


def suffix_sums(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted return-to-go by a Python loop, as the reference's discount_cumsum(x, gamma=1)."""
    sums = np.zeros(rewards.shape[0], dtype=np.float64)
    sums[-1] = rewards[-1]
    for t in reversed(range(rewards.shape[0] - 1)):
        sums[t] = rewards[t] + sums[t + 1]
    return sums


def state_statistics(episodes: list[Episode]) -> tuple[np.ndarray, np.ndarray]:
    """State mean and std (plus STD_EPSILON), (39,) each, over every step of `episodes`, computed on one concatenated
    array as the reference does."""
    states = np.concatenate([episode.observations for episode in episodes])
    return states.mean(axis=0), states.std(axis=0) + STD_EPSILON


def segment(episode: Episode, start: int, length: int, mean: np.ndarray, std: np.ndarray,
            task: Task) -> dict[str, np.ndarray]:
    """Up to `length` steps of `episode` from `start`, left-padded to `length` (state 0 before normalising,
    action -10, rtg 0, timestep 0, mask 0), built the reference's way with float64 numpy arrays."""
    observations = episode.observations[start : start + length]
    steps = observations.shape[0]
    padding = length - steps
    timesteps = np.minimum(np.arange(start, start + steps), task.horizon - 1)
    returns = suffix_sums(episode.rewards[start:])[:steps] / task.rtg_scale
    states = np.concatenate([np.zeros((padding, MAX_OBS_DIM)), observations])
    actions = episode.actions[start : start + steps]
    return {
        "states": (states - mean) / std,
        "actions": np.concatenate([np.full((padding, MAX_ACT_DIM), PAD_ACTION), actions]),
        "returns_to_go": np.concatenate([np.zeros(padding), returns])[:, None],
        "timesteps": np.concatenate([np.zeros(padding, dtype=np.int64), timesteps]),
        "mask": np.concatenate([np.zeros(padding), np.ones(steps)]),
    }


@dataclass
class NaiveTask:
    """One task's data as the reference holds it: episode lists in host memory with their statistics and prompts."""

    task: Task
    episodes: list[Episode]  # training episodes
    sample_probability: np.ndarray  # per episode, in proportion to its length
    state_mean: np.ndarray
    state_std: np.ndarray
    prompts: list[Episode]  # (lower return, higher return)
    prompt_mean: np.ndarray
    prompt_std: np.ndarray


def load_naive_task(root: Path, name: str, max_episodes: int, prompt_length: int) -> NaiveTask:
    """Task `name` from the npz files of `{root}/{name}/` (at most `max_episodes`), its last PROMPT_EPISODES the
    prompt trajectories, lower return first. Raises DataError for a bad folder or file or a prompt trajectory
    shorter than the prompt window (`prompt_length` + 1 steps, as the main data path), TaskError for an unknown
    task."""
    files = episode_files(root / name, max_episodes)
    episodes = [load_episode(path) for path in files[:-PROMPT_EPISODES]]
    prompts = [load_episode(path) for path in files[-PROMPT_EPISODES:]]
    for path, prompt in zip(files[-PROMPT_EPISODES:], prompts):
        check_prompt_length(prompt, prompt_length, path)
    prompts.sort(key=lambda episode: episode.rewards.sum())
    lengths = np.array([episode.rewards.shape[0] for episode in episodes])
    return NaiveTask(get_task(name), episodes, lengths / lengths.sum(), *state_statistics(episodes),
                     prompts, *state_statistics(prompts))


class NaiveSampler:
    """Per-task episode lists in host memory; every batch is assembled row by row in numpy, then copied."""

    def __init__(self, data_root: str | Path, task_names: list[str], context_length: int, batch_size: int,
                 prompt_length: int, device: torch.device, seed: int, max_episodes: int = 2000):
        self.tasks = [load_naive_task(Path(data_root), name, max_episodes, prompt_length) for name in task_names]
        self.context_length = context_length
        self.batch_size = batch_size
        self.prompt_length = prompt_length
        self.device = device
        self.rng = np.random.default_rng(seed)

    def draw(self, task_index: int) -> list[tuple[int, int]]:
        """(episode, start) per row: episode in proportion to its length, start uniform within it."""
        task = self.tasks[task_index]
        picks = self.rng.choice(len(task.episodes), size=self.batch_size, p=task.sample_probability)
        return [(int(episode), int(self.rng.integers(task.episodes[episode].rewards.shape[0]))) for episode in picks]

    def sample(self, task_index: int) -> Batch:
        """A batch of `batch_size` rows of task `task_index`, drawn and assembled the reference's way."""
        return self.build(task_index, self.draw(task_index))

    def build(self, task_index: int, choices: list[tuple[int, int]]) -> Batch:
        """The Batch of the (episode, start) rows `choices` of task `task_index`: K-step segments, the prompt window
        (the lower-return prompt trajectory on rows LOW_RETURN_PROMPT_ROWS), action mask and task_index, on the
        sampler's device."""
        task = self.tasks[task_index]
        rows, prompt_rows = [], []
        for row, (episode, start) in enumerate(choices):
            rows.append(segment(task.episodes[episode], start, self.context_length, task.state_mean,
                                task.state_std, task.task))
            prompt = task.prompts[0 if row in LOW_RETURN_PROMPT_ROWS else 1]
            prompt_start = prompt.rewards.shape[0] - self.prompt_length - 1  # steps T-P-1 .. T-2
            prompt_rows.append(segment(prompt, prompt_start, self.prompt_length, task.prompt_mean,
                                       task.prompt_std, task.task))
        arrays = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        arrays.update({f"prompt_{key}": np.stack([row[key] for row in prompt_rows]) for key in prompt_rows[0]})
        true_dims = np.arange(MAX_ACT_DIM) < task.task.act_dim
        arrays["action_mask"] = np.tile(true_dims, (len(choices), 1, 1))
        arrays["task_index"] = np.full(len(choices), task_index)
        # One host-to-device copy per array, every step.
        return Batch(**{key: self.to_device(key, array) for key, array in arrays.items()})

    def to_device(self, key: str, array: np.ndarray) -> torch.Tensor:
        """`array` copied to the sampler's device: int64 for timesteps and task_index, float32 otherwise."""
        dtype = torch.long if key.endswith("timesteps") or key == "task_index" else torch.float32
        return torch.from_numpy(array).to(self.device, dtype)

    def act_dim(self, task_index: int) -> int:
        """The true action dims of task `task_index`."""
        return self.tasks[task_index].task.act_dim


# ----------------------------------------------------------------------------------------------- step


def naive_action_loss(predicted: torch.Tensor, batch: Batch, act_dim: int) -> torch.Tensor:
    """MSE over valid steps and the first act_dim action dims, selected with boolean indexing (reference)."""
    valid = batch.mask.reshape(-1) > 0
    predicted = predicted.reshape(-1, MAX_ACT_DIM)[valid][:, :act_dim]
    target = batch.actions.reshape(-1, MAX_ACT_DIM)[valid][:, :act_dim]
    return torch.mean((predicted - target) ** 2)


def naive_optimizer(parameters: list[nn.Parameter], learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """PyTorch's default AdamW, as the reference builds it: never fused (foreach on CUDA, a loop on CPU)."""
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)


def naive_train_step(model: nn.Module, batch: Batch, act_dim: int, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, parameters: list[nn.Parameter],
                     max_norm: float) -> float:
    """One training step the reference's way: loss, zero_grad, backward, global-norm clip of `parameters`, optimizer
    and scheduler steps. Returns the loss as a Python float (a host sync)."""
    loss = naive_action_loss(model(batch), batch, act_dim)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    scheduler.step()
    return loss.item()  # a host sync every step, as the reference logs each loss

"""Speed of every stage: the project's training step against the reference's way of doing it.

    python -m m3dt.bench                          # paper configuration, every stage (cuda when available)
    python -m m3dt.bench --quick                  # fewer steps and experts: under 5 minutes on 2 CPU cores
    python -m m3dt.bench --device cuda --precision bf16 --compile reduce-overhead

At the paper configuration (batch 16, K=20 + a 5-step prompt = 75 tokens, 6 layers, width 256, 8 heads,
dropout 0.1) and on synthetic data in the MT160 layout, one run times, per stage:
- fast: the project's step (m3dt/train.py): device-resident sampler, stacked experts (one batched matmul),
  fused AdamW, per-expert clipping for stage 2, no host sync;
- naive: the same math done the reference's way (m3dt/naive.py): experts in a Python loop, batches built
  per sample in numpy and copied to the device, default AdamW, loss.item() every step.
It reports the median ms/step after warm-up, the ratio, the achieved TFLOP/s against the measured matmul
peak, the floor (FLOPs over that peak or bytes over the measured copy bandwidth, the larger) and the gap
to it, the paper schedule's projected hours, policy forwards per second for lockstep evaluation, and env
steps per second of the evaluator's worker pool with 1 worker and with every CPU. Writes
benchmarks/{device}.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from m3dt.cli import command, exit_with_message
from m3dt.config import CHOICES, ArgumentParser, Config, ConfigError, check_values
from m3dt.data import Batch, DeviceSampler, TaskDataset
from m3dt.evaluate import EnvPool, Rollout  # env packages load inside the env workers
from m3dt.grouping import random_grouping
from m3dt.model import PromptCache, PromptDecisionTransformer, build_model, set_up_stage
from m3dt.naive import NaiveSampler, naive_model, naive_optimizer, naive_train_step
from m3dt.run import ArtifactError, atomic_path, make_folder, read_json
from m3dt.synthetic import make_dataset
from m3dt.tasks import EPISODES_PER_FAMILY, get_task, resolve_tasks
from m3dt.memory import peak_bytes
from m3dt.train import Precision, build_optimizer, resolve_device, round_robin_table, train_step, warmup_factor

MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
TRAIN_EPISODES = 2  # synthetic training episodes per task (each task also gets its 2 prompt episodes)
DEFAULTS = {
    "full": {"steps": 20, "warmup": 5, "experts": "8,16,48", "groups": 48, "tasks": 160, "eval_rows": 1560,
             "env_rollouts": 160, "env_steps": 50},
    "quick": {"steps": 5, "warmup": 2, "experts": "8", "groups": 4, "tasks": 48, "eval_rows": 16,
              "env_rollouts": 32, "env_steps": 20},
}
# The least value of each numeric option (env_rollouts 0 skips the env workers).
OPTION_MINIMUMS = {"steps": 1, "warmup": 0, "groups": 1, "tasks": 1, "eval_rows": 1, "env_rollouts": 0, "env_steps": 1,
                   "threads": 1}
MT160_TASKS = 160


@dataclass
class Settings:
    """What one bench run times and how, from its command line (parse_settings)."""

    device: torch.device
    precision: str  # of the fast path (fp32, tf32, bf16); the naive path is fp32 as the reference
    mode: str  # full | quick
    steps: int  # timed steps per measurement
    warmup: int  # untimed steps before them
    expert_counts: list[int]  # E for stage 3
    groups: int  # experts trained together in the stage-2 `--all` step
    tasks: int  # synthetic tasks, the first of the official MT160 list
    eval_rows: int  # rollouts per lockstep evaluation forward
    env_rollouts: int  # envs stepped together when timing the env workers
    env_steps: int  # lockstep env steps timed
    compile: str  # also time the fast path under torch.compile with this mode ("none": do not)
    stages: list[int]  # the training stages timed (1, 2, 3)
    out: Path
    config: Config  # model and optimisation options: the paper's unless overridden (smoke tests)


# ------------------------------------------------------------------------------------------ stages
@dataclass
class Case:
    """One training step to time: a stage with its installed experts and its row groups."""

    name: str
    stage: int
    task_groups: list[list[int]]  # per row group of the fast step, the tasks it cycles through
    experts: int = 0  # experts installed (0: the plain backbone)
    naive: bool = True  # the reference has this step (it has no `--all`: one process per expert)


def training_cases(settings: Settings) -> list[Case]:
    """The training steps to time, of the stages in `settings.stages`: stage 1 over every task, stage 2 with one
    expert (the first group of a random grouping) and with all `groups` experts in one `--all` step (which the
    reference lacks), and stage 3's routers at each expert count."""
    every_task = list(range(settings.tasks))
    groups = random_grouping(settings.tasks, settings.groups, seed=0)
    cases = [
        Case("stage 1: backbone", 1, [every_task]),
        Case("stage 2: one expert", 2, [groups[0]], experts=1),
        Case(f"stage 2: all {settings.groups} experts in one step", 2, groups, experts=settings.groups, naive=False),
        *[Case(f"stage 3: routers, E={count}", 3, [every_task], experts=count)
          for count in settings.expert_counts],
    ]
    return [case for case in cases if case.stage in settings.stages]


def case_model(case: Case, config: Config) -> tuple[PromptDecisionTransformer, dict[str, nn.Parameter]]:
    """The stage's model and its trainable parameters, set up as m3dt/stages.py does."""
    model = build_model(config, config.dropout)
    return model, set_up_stage(model, case.stage, case.experts)


# ------------------------------------------------------------------------------------------ the two steps
def fast_stepper(case: Case, model: PromptDecisionTransformer, trainable: dict[str, nn.Parameter],
                 dataset: TaskDataset, settings: Settings, compile_mode: str) -> Callable[[int], None]:
    """The project's training step of `case` as a function of the step number (m3dt/train.py): one row group per
    task group cycling through its tasks, device sampler, fused AdamW with warm-up, per-expert clipping in
    stage 2, the forward in `settings.precision` and under torch.compile in `compile_mode` unless "none"."""
    config, device = settings.config, settings.device
    groups = len(case.task_groups)
    sampler = DeviceSampler(dataset, config.context_length, config.batch_size, device, seeds=list(range(groups)))
    parameters = list(trainable.values())
    optimizer = build_optimizer(parameters, config)
    scheduler = LambdaLR(optimizer, warmup_factor(config.warmup_steps))
    table, lengths = round_robin_table(case.task_groups, device)
    group_index = torch.arange(groups, device=device)
    forward = model if compile_mode == "none" else torch.compile(model, mode=compile_mode)
    numerics = Precision(settings.device, settings.precision)

    def step(number: int) -> None:
        batch = sampler.sample(table[group_index, number % lengths])
        train_step(forward, batch, groups, optimizer, scheduler, parameters, config.grad_clip,
                   per_expert_clip=case.stage == 2, precision=numerics)

    return step


def naive_stepper(case: Case, model: PromptDecisionTransformer, sampler: NaiveSampler,
                  config: Config) -> Callable[[int], None]:
    """The reference's training step of `case` as a function of the step number (m3dt/naive.py): one task of its
    first task group per step in turn, the batch built by `sampler`, default AdamW with warm-up, fp32."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = naive_optimizer(parameters, config.learning_rate, config.weight_decay)
    scheduler = LambdaLR(optimizer, warmup_factor(config.warmup_steps))
    tasks = case.task_groups[0]

    def step(number: int) -> None:
        task = tasks[number % len(tasks)]
        naive_train_step(model, sampler.sample(task), sampler.act_dim(task), optimizer, scheduler, parameters,
                         config.grad_clip)

    return step


# ------------------------------------------------------------------------------------------ timing
CUDA_WINDOW = 5  # steps timed back to back between two syncs on CUDA


def synchronize(device: torch.device) -> None:
    """Wait until the device has run the work queued on it (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paths(paths: dict[str, Callable[[int], Any]], warmup: int, steps: int, device: torch.device,
               statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Ms per call of each path after `warmup` untimed calls: the `statistic` (median by default) of its
    timed windows. The paths take turns, a window of calls each, so that a machine whose speed drifts
    (shared CPUs, clocks) slows them alike. A window is one call on the CPU; on CUDA it is several calls
    with a sync only at its ends, so that the host queues the next step while the device runs the current
    one, as in training."""
    for call in paths.values():
        for number in range(warmup):
            call(number)
    window = min(steps, CUDA_WINDOW) if device.type == "cuda" else 1
    times: dict[str, list[float]] = {path: [] for path in paths}
    for first in range(warmup, warmup + steps - window + 1, window):
        for path, call in paths.items():
            synchronize(device)
            start = time.perf_counter()
            for number in range(first, first + window):
                call(number)
            synchronize(device)
            times[path].append((time.perf_counter() - start) * 1e3 / window)
    return {path: statistic(values) for path, values in times.items()}


# A ceiling is the best the device did: the fastest of its repeats, so that a moment of contention on a
# shared machine lowers it less than a median would (a lower ceiling reads as a higher "% of peak").
CEILING_REPEATS = 10
MATMUL_SIZES = {"cuda": (4096, 8192, 16384), "cpu": (512, 1024, 2048)}
# A size whose product takes longer than this keeps the device busy enough: no larger one is tried (bf16 on a
# CPU without bf16 units runs at about 1 GFLOP/s, where a 2048 product takes 20 s).
LONG_CALL_MS = 100.0


def matmul_peak(device: torch.device, precision: str) -> float:
    """TFLOP/s of square matmuls in `precision`: the best over sizes (ascending, up to the first whose call
    takes LONG_CALL_MS) of the fastest of `CEILING_REPEATS` calls each, the ceiling the stages' achieved
    TFLOP/s are compared with."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for size in MATMUL_SIZES["cuda" if device.type == "cuda" else "cpu"]:
        left = torch.randn(size, size, device=device, dtype=dtype)
        right = torch.randn(size, size, device=device, dtype=dtype)

        def product(_: int) -> torch.Tensor:
            with Precision(device, precision):
                return left @ right

        milliseconds = time_paths({"matmul": product}, warmup=2, steps=CEILING_REPEATS, device=device,
                                  statistic=min)["matmul"]
        best = max(best, 2 * size**3 / (milliseconds / 1e3) / 1e12)
        if milliseconds > LONG_CALL_MS:
            break
    return best


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 256 MiB copy within the device's memory (beyond every cache), bytes read plus bytes
    written (the fastest of `CEILING_REPEATS`): the ceiling the bytes a step must move are compared with."""
    source = torch.ones(2**26, device=device)
    target = torch.empty_like(source)
    milliseconds = time_paths({"copy": lambda _: target.copy_(source)}, warmup=2, steps=CEILING_REPEATS,
                              device=device, statistic=min)["copy"]
    return 2 * source.numel() * source.element_size() / (milliseconds / 1e3) / 1e9


def time_floor(flops: float, bytes_moved: float, peak_tflops: float, bandwidth: float) -> tuple[float, str]:
    """The least time (ms) for this work on this device and what sets it: arithmetic at the matmul peak or
    bytes at the copy bandwidth, whichever takes longer."""
    arithmetic, memory = flops / peak_tflops / 1e9, bytes_moved / bandwidth / 1e6
    return (arithmetic, "FLOPs") if arithmetic >= memory else (memory, "bytes")


# ------------------------------------------------------------------------------------------ FLOPs and bytes
BYTES_PER_VALUE = 4  # fp32
OPTIMIZER_PASSES = 10  # per trainable value: fused AdamW reads p, g, m, v and writes p, m, v; clipping 3 more


@dataclass
class Matmul:
    """`count` products (m x k) @ (k x n) of one layer: an input, a weight (a parameter; for attention's
    Q K^T and P V an activation) and an output."""

    count: int
    m: int
    k: int
    n: int
    input_grad: bool  # some trainable weight lies below it, so its input gradient is computed
    weight_grad: bool  # its weight trains
    shared_input: bool = False  # one input for all `count` products (the dense mixture's experts)

    def passes(self) -> int:
        """Forward plus one product of the same size per gradient that autograd computes."""
        return 1 + self.input_grad + self.weight_grad

    def flops(self) -> float:
        """FLOPs of the `count` products, forward only: 2 per multiply-add."""
        return 2.0 * self.count * self.m * self.k * self.n

    def bytes(self) -> float:
        """Each operand read once and the result written once (a gradient product moves the same sizes)."""
        inputs = self.m * self.k * (1 if self.shared_input else self.count)
        return BYTES_PER_VALUE * (inputs + self.count * (self.k * self.n + self.m * self.n))


def trains(module: nn.Module) -> bool:
    """Whether any parameter of `module` requires a gradient."""
    return any(parameter.requires_grad for parameter in module.parameters())


def linear_matmuls(module: nn.Module, tokens: int, input_grad: bool) -> list[Matmul]:
    """One Matmul per nn.Linear in `module` (itself included) over `tokens` rows; its weight gradient counted
    when that weight trains, its input gradient when `input_grad`."""
    return [Matmul(1, tokens, layer.in_features, layer.out_features, input_grad, layer.weight.requires_grad)
            for layer in module.modules() if isinstance(layer, nn.Linear)]


def model_matmuls(model: PromptDecisionTransformer, rows: int, context: int, prompt: int,
                  read: int, cached_prompt: bool = False) -> list[Matmul]:
    """Every matrix product of one forward over `rows` sequences, from the inputs up, where the action head
    reads `read` state tokens per row (training: every step's; evaluation: the last one); with
    `cached_prompt`, the prompt tokens' keys and values come from a PromptCache (evaluation). Not counted:
    LayerNorms, softmaxes, activations, the mixture's weighted sum (2·E·d per token, < 0.1%)."""
    length = 3 * (context + prompt)  # keys per row
    computed = 3 * context if cached_prompt else length  # tokens each block computes
    tokens = rows * computed
    width, heads = model.config.embed_dim, model.config.n_head
    parts = [*linear_matmuls(model.embed, rows * context, False),
             *([] if cached_prompt else linear_matmuls(model.embed_prompt, rows * prompt, False))]
    below = trains(model.embed) or trains(model.embed_prompt)
    for block in model.blocks:
        # Keys and values come from every token; the last block's outputs only from the read ones when the
        # model skips the others (m3dt/model.py), the reference's from every token.
        queries = read if block is model.blocks[-1] and model.skip_unread_tokens else computed
        outputs = rows * queries
        parts += linear_matmuls(block.attention.qkv, tokens, below)
        parts += linear_matmuls(block.attention.projection, outputs, below)
        # Q K^T and P V per head over every key (masked entries included). Both operands are activations:
        # a backward through them takes two products, counted as the two gradients.
        head_width = width // heads
        parts += [Matmul(rows * heads, queries, head_width, length, below, below),
                  Matmul(rows * heads, queries, length, head_width, below, below)]
        parts += linear_matmuls(block.mlp, outputs, below)
        mixture = block.expert_mixture
        if mixture is not None:
            experts = mixture.experts
            # Dense mixture: every expert on every token; assigned: each expert on its own row group.
            dense = mixture.router is not None
            expert_tokens = outputs if dense else outputs // experts.num_experts
            parts += [Matmul(experts.num_experts, expert_tokens, *experts.up_weight.shape[1:], below,
                             experts.up_weight.requires_grad, shared_input=dense),
                      Matmul(experts.num_experts, expert_tokens, *experts.down_weight.shape[1:], below,
                             experts.down_weight.requires_grad)]
            if mixture.router is not None:
                parts += linear_matmuls(mixture.router, outputs, below)
        below = below or trains(block)
    parts += linear_matmuls(model.action_head, rows * read, below)
    return parts


@dataclass
class Work:
    """What one forward and one training step must compute and move, at the least."""

    forward_flops: float
    forward_bytes: float
    train_flops: float
    train_bytes: float  # the products' operands and results, and the optimiser's passes over trainable values


def case_work(case: Case, config: Config, rows: int, path: str, last_step_only: bool = False,
              cached_prompt: bool = False) -> Work:
    """The work of `case` over `rows` sequences on `path` (the naive one computes the last block on every
    token), counted on a weightless model."""
    with torch.device("meta"):
        model, trainable = case_model(case, config)
    model.skip_unread_tokens = path != "naive"
    read = 1 if last_step_only else config.context_length
    parts = model_matmuls(model, rows, config.context_length, config.prompt_length, read, cached_prompt)
    optimizer_bytes = OPTIMIZER_PASSES * BYTES_PER_VALUE * sum(value.numel() for value in trainable.values())
    return Work(forward_flops=sum(part.flops() for part in parts),
                forward_bytes=sum(part.bytes() for part in parts),
                train_flops=sum(part.flops() * part.passes() for part in parts),
                train_bytes=sum(part.bytes() * part.passes() for part in parts) + optimizer_bytes)


# ------------------------------------------------------------------------------------------ measurements
@dataclass
class Measurement:
    """One path's ms per training step in one stage and the work counted for that step (a training table row)."""

    stage: str
    path: str  # naive | fast | fast + compile {mode}
    ms_per_step: float | None  # median; None when the path failed
    train_flops: float  # per step
    train_bytes: float  # per step, at the least (see Work)
    expert_steps: int = 1  # experts trained by one step (the `--all` step trains every group's expert)
    error: str = ""


def measure(stage: str, paths: dict[str, Callable[[int], Any]], work: Callable[[str], Work], settings: Settings,
            expert_steps: int = 1) -> list[Measurement]:
    """`work`: a path's work per step."""
    medians = time_paths(paths, settings.warmup, settings.steps, settings.device)
    for path, median in medians.items():
        print(f"  {stage:<40} {path:<15} {median:10.1f} ms/step (median over {settings.steps} timed steps)", flush=True)
    # The reference has one expert per step: only the project's paths train `expert_steps` experts.
    results = []
    for path, median in medians.items():
        counted = work(path)
        results.append(Measurement(stage, path, median, counted.train_flops, counted.train_bytes,
                                   1 if path == "naive" else expert_steps))
    return results


def measure_sampling(dataset: TaskDataset, naive_sampler: NaiveSampler, settings: Settings) -> list[Measurement]:
    """One batch of one task: the device sampler against per-sample numpy assembly plus the copies."""
    config = settings.config
    sampler = DeviceSampler(dataset, config.context_length, config.batch_size, settings.device, seeds=[0])
    tasks = torch.arange(settings.tasks, device=settings.device)
    paths = {"naive": lambda number: naive_sampler.sample(number % settings.tasks),
             "fast": lambda number: sampler.sample(tasks[number % settings.tasks].view(1))}
    return measure("batch sampling only", paths, lambda path: Work(0.0, 0.0, 0.0, 0.0), settings)


def measure_case(case: Case, dataset: TaskDataset, naive_sampler: NaiveSampler,
                 settings: Settings) -> list[Measurement]:
    """Time `case` on the naive path (where the reference has that step), the fast path and, with --compile,
    the fast path under torch.compile; a compilation that fails is a measurement with its error and no time."""
    config = settings.config

    def work(path: str) -> Work:
        return case_work(case, config, config.batch_size * len(case.task_groups), path)

    model, trainable = case_model(case, config)
    model.to(settings.device)
    paths = {}
    if case.naive:
        paths["naive"] = naive_stepper(case, naive_model(model), naive_sampler, config)
    paths["fast"] = fast_stepper(case, model, trainable, dataset, settings, compile_mode="none")
    failures = []
    if settings.compile != "none":
        compiled = fast_stepper(case, model, trainable, dataset, settings, compile_mode=settings.compile)
        error = compile_error(compiled)
        path = f"fast + compile {settings.compile}"
        if error:
            print(f"  {case.name:<40} {path}  failed: {error}", flush=True)
            failures.append(Measurement(case.name, path, None, work(path).train_flops, work(path).train_bytes,
                                        len(case.task_groups), error))
        else:
            paths[path] = compiled
    return measure(case.name, paths, work, settings, expert_steps=len(case.task_groups)) + failures


def compile_error(step: Callable[[int], Any]) -> str:
    """Run one compiled step (the compilation); the first line of what went wrong, or "" if it worked."""
    try:
        step(0)
    except Exception as error:  # noqa: BLE001 - compilation fails in many ways (no C++ compiler, an
        # unsupported op); the bench reports it and goes on with the other measurements.
        lines = str(error).strip().splitlines()
        return (lines[0] if lines else type(error).__name__)[:200]
    return ""


@dataclass
class EvalMeasurement:
    """One path's lockstep evaluation forwards of one model: ms per call, rows/s, work and memory peak."""

    model: str
    rows: int  # rollouts per call
    path: str
    ms_per_forward: float  # per call (all its rows)
    rows_per_second: float
    forward_flops: float
    forward_bytes: float
    rows_per_forward: int  # rows of each model forward of a call (fewer than `rows`: split by --eval_rows)
    peak_bytes: int  # measured memory peak of one call (memory.peak_bytes: CUDA allocator, or live tensors on a CPU)


def measure_evaluation(dataset: TaskDataset, settings: Settings) -> list[EvalMeasurement]:
    """Lockstep policy forwards over `eval_rows` rollouts (K=20 context, inference mode, actions to the
    host), as the evaluator (m3dt/evaluate.py ModelPolicy) runs them: one forward without and with the
    prompt cache, and with the cache split into forwards of a quarter of the rows (`--eval_rows`); the
    naive path takes one rollout per forward, as the reference evaluates."""
    config, device = settings.config, settings.device
    sampler = DeviceSampler(dataset, config.context_length, settings.eval_rows, device, seeds=[0])
    batch = sampler.sample(torch.tensor([0], device=device))
    single = batch.rows(slice(0, 1))
    cases = [Case("Prompt-DT backbone (stage 1)", 1, [[0]]),
             *[Case(f"M3DT, E={count} (stage 3)", 3, [[0]], experts=count)
               for count in settings.expert_counts]]
    numerics = Precision(device, settings.precision)
    quarter = max(1, settings.eval_rows // 4)
    variants = {"naive": (single, False, 1), "fast": (batch, False, settings.eval_rows),
                "fast + prompt cache": (batch, True, settings.eval_rows),
                f"fast + prompt cache, forwards of {quarter} rows": (batch, True, quarter)}
    results = []
    for case in cases:
        model, _ = case_model(case, config)
        model.to(device).eval()
        with numerics:  # the cache holds what the uncached forward computes at this precision
            cache = model.cache_prompt(batch.prompt_states[:1], batch.prompt_actions[:1],
                                       batch.prompt_returns_to_go[:1], batch.prompt_timesteps[:1],
                                       batch.prompt_mask[:1])  # every row is task 0
        paths = {path: policy_forward(naive_model(model), inputs, Precision(device, "fp32")) if path == "naive" else
                 policy_forward(model, inputs, numerics, cache if cached else None, rows_per_forward)
                 for path, (inputs, cached, rows_per_forward) in variants.items()}
        medians = time_paths(paths, settings.warmup, settings.steps, device)
        for path, (inputs, cached, rows_per_forward) in variants.items():
            rows = inputs.states.shape[0]
            peak = peak_bytes(lambda: paths[path](0), device)
            print(f"  eval {case.name:<30} {path:<40} {rows:5d} rows {medians[path]:10.1f} ms/forward (median over "
                  f"{settings.steps} timed forwards), peak "
                  f"{peak / 2**20:,.0f} MiB", flush=True)
            work = case_work(case, config, rows, path, last_step_only=True, cached_prompt=cached)
            results.append(EvalMeasurement(case.name, rows, path, medians[path], rows / medians[path] * 1e3,
                                           work.forward_flops, work.forward_bytes, rows_per_forward, peak))
    return results


@dataclass
class EnvMeasurement:
    """Env steps per second of the evaluator's worker pool with `workers` processes over `rollouts` rollouts."""

    workers: int
    rollouts: int
    env_steps_per_second: float


def measure_env_stepping(settings: Settings) -> list[EnvMeasurement]:
    """Env steps per second of the evaluator's worker pool (m3dt.evaluate.EnvPool) under random actions,
    over `env_rollouts` rollouts taken evenly from one MT160 evaluation (so with its mix of families), with
    one worker and with one per CPU. The first step after reset is not timed."""
    tasks = resolve_tasks("mt160", None, settings.config.seed)
    protocol = [Rollout(get_task(name), slot, episode) for slot, name in enumerate(tasks)
                for episode in range(EPISODES_PER_FAMILY[get_task(name).family])]
    rollouts = protocol[:: max(1, len(protocol) // settings.env_rollouts)][: settings.env_rollouts]
    rng = np.random.default_rng(0)
    results = []
    for workers in sorted({1, os.cpu_count() or 1}):
        pool = EnvPool(rollouts, seed=0, workers=workers)
        try:
            pool.reset()
            live, steps, started = np.arange(len(rollouts)), 0, 0.0
            for step in range(settings.env_steps + 1):
                if step == 1:
                    started, steps = time.perf_counter(), 0
                outcomes = pool.step(live, [rng.uniform(-1, 1, rollouts[r].task.act_dim) for r in live])
                steps += len(live)
                live = live[[not done for _, _, done, _ in outcomes]]
            seconds = time.perf_counter() - started
        finally:
            pool.close()
        print(f"  env steps, {workers:3d} worker(s), {len(rollouts)} rollouts: {steps / seconds:10.0f} steps/s",
              flush=True)
        results.append(EnvMeasurement(workers, len(rollouts), steps / seconds))
    return results


def policy_forward(model: nn.Module, batch: Batch, precision: Precision, cache: PromptCache | None = None,
                   rows_per_forward: int | None = None) -> Callable[[int], torch.Tensor]:
    """One lockstep step's forwards (`rows_per_forward` rows each; the cache's row 0 for every row); each
    step needs the actions on the host."""
    rows = batch.states.shape[0]
    chunk = rows_per_forward or rows
    cache_rows = torch.zeros(rows, dtype=torch.long, device=batch.states.device)

    def forward(_: int) -> torch.Tensor:
        actions = []
        with torch.inference_mode(), precision:
            for first in range(0, rows, chunk):
                part = batch.rows(slice(first, first + chunk))
                selected = None if cache is None else cache.select(cache_rows[first : first + chunk])
                actions.append(model(part, last_step_only=True, prompt_cache=selected)[:, -1].float().cpu())
        return torch.cat(actions)

    return forward


def evaluation_rows(task_names: list[str]) -> int:
    """Policy forwards (one per rollout step) of one evaluation over `task_names`, with full horizons."""
    return sum(EPISODES_PER_FAMILY[get_task(name).family] * get_task(name).horizon for name in task_names)


# ------------------------------------------------------------------------------------------ projections
def projected_hours(results: list[Measurement], settings: Settings) -> list[dict[str, Any]]:
    """The paper schedule (Config defaults: 400k backbone steps, 48 experts x 200k, 400k router steps)
    at the measured speeds. Stage 3 at E=48 is scaled by FLOPs from the largest measured E when E=48
    itself was not measured."""
    config = settings.config
    by_key = {(result.stage, result.path): result for result in results if result.ms_per_step is not None}

    def per_expert_step(path: str) -> float | None:
        candidates = [result.ms_per_step / result.expert_steps for result in results
                      if result.stage.startswith("stage 2") and result.path == path and result.ms_per_step]
        return min(candidates, default=None)

    largest = max(settings.expert_counts)
    target = config.expert_num

    def stage3_scale(path: str) -> float:
        return (case_work(Case("", 3, [[0]], target), config, config.batch_size, path).train_flops
                / case_work(Case("", 3, [[0]], largest), config, config.batch_size, path).train_flops)

    stage3 = f"stage 3: routers, E={largest}"
    rows = []
    for path in ("naive", "fast"):
        scale = stage3_scale(path)
        stage1 = by_key.get(("stage 1: backbone", path))
        router = by_key.get((stage3, path))
        expert = per_expert_step(path)
        hours = {
            "stage 1": stage1 and config.backbone_steps * stage1.ms_per_step / 3.6e6,
            "stage 2": expert and config.expert_num * config.expert_steps * expert / 3.6e6,
            "stage 3": router and config.router_steps * router.ms_per_step * scale / 3.6e6,
        }
        total = sum(hours.values()) if all(hours.values()) else None
        note = "" if largest == target else f"{path}: x{scale:.2f}"  # the paths count different FLOPs
        rows.append({"path": path, **hours, "total": total, "note": note})
    return rows


# ------------------------------------------------------------------------------------------ report
def device_name(device: torch.device) -> str:
    """The device as a file name ({device}.md, .json): the GPU's name or `cpu-{N}core`, lower case, every run of
    other characters than letters and digits as one '-'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_description(device: torch.device) -> str:
    """The device for a reader: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's processor or machine name."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere platform's (often vaguer) answer
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def format_number(value: float | None, digits: int = 1) -> str:
    """`value` with thousands separators and `digits` decimals; "-" for None."""
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The page of one bench run ({device}.md): its settings, training steps, projected paper schedule,
    evaluation forwards, env steps, and how FLOPs and bytes are counted."""
    sections = (header_lines(report), training_lines(report), projection_lines(report), evaluation_lines(report),
                env_lines(report), ["## How FLOPs and bytes are counted", "", WORK_NOTE])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def header_lines(report: dict[str, Any]) -> list[str]:
    """The page's title and what was measured: command, device, model and data, matmul peak and copy bandwidth;
    on a CPU also the torch threads, the CPU-seconds per second the process got and the glibc malloc settings."""
    settings, config = report["settings"], report["settings"]["config"]
    tokens = 3 * (config["context_length"] + config["prompt_length"])
    lines = [
        f"# Speed: {report['device']}",
        "",
        f"`{report['command']}` on {report['description']}, torch {report['torch']}, {report['date']}. "
        f"Mode {settings['mode']}: median of {settings['steps']} steps after {settings['warmup']} warm-up steps, "
        "the paths taking turns.",
        "",
        f"Model: batch {config['batch_size']} per task, K={config['context_length']} + {config['prompt_length']} "
        f"prompt steps ({tokens} tokens), {config['n_layer']} layers, width {config['embed_dim']}, "
        f"{config['n_head']} heads, dropout {config['dropout']}. Synthetic data: {settings['tasks']} tasks of the "
        f"MT160 list, full-horizon episodes. Fast path {settings['precision']}; naive path fp32.",
        "",
        "Measured matmul peak: " + ", ".join(f"{dtype} {value:.2f} TFLOP/s"
                                             for dtype, value in report["peak_tflops"].items())
        + f"; measured copy bandwidth: {report['bandwidth_gbs']:.1f} GB/s (bytes read plus written). The floor of "
        "a step is the larger of its FLOPs over the peak and its bytes over the bandwidth (counted below); "
        "time / floor is the gap to it.",
    ]
    if settings["device"].startswith("cpu"):
        lines.append(f"Torch threads: {report['threads']}; the process got {report['cpu_per_wall']:.2f} "
                     "CPU-seconds per second while measuring (as many as threads when the cores are its own; "
                     "fewer means a shared machine and noisy timings).")
        malloc = {name: os.environ[name] for name in MALLOC_SETTINGS if name in os.environ}
        lines.append(f"glibc malloc settings: {malloc or 'defaults'} (scripts/*.sh set {', '.join(MALLOC_SETTINGS)} so "
                     "that the experts' large activation buffers are reused instead of page-faulted in every step).")
    return lines


def training_lines(report: dict[str, Any]) -> list[str]:
    """The training steps table: per stage and path ms/step, speedup over the naive path, TFLOP/s, % of the
    matmul peak of its precision, the floor (ms), what sets it, and time / floor."""
    settings, peak = report["settings"], report["peak_tflops"]
    training = [Measurement(**row) for row in report["training"]]
    lines = ["## Training steps", "",
             "| stage | path | ms/step | speedup vs naive | TFLOP/s | % of peak | floor ms | bound by | time / floor |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for result in training:
        speedup = speedup_vs_naive(result, training)
        tflops = result.train_flops / result.ms_per_step / 1e9 if result.ms_per_step and result.train_flops else None
        path_peak = peak["fp32" if result.path == "naive" else settings["precision"]]
        ms = format_number(result.ms_per_step) if result.ms_per_step else f"failed: {result.error}"
        least, bound = time_floor(result.train_flops, result.train_bytes, path_peak, report["bandwidth_gbs"])
        gap = result.ms_per_step / least if result.ms_per_step and least else None
        lines.append(f"| {result.stage} | {result.path} | {ms} | {format_number(speedup, 2)} | "
                     f"{format_number(tflops, 3)} | {format_number(tflops and 100 * tflops / path_peak)} | "
                     f"{format_number(least or None, 2)} | {bound if least else '-'} | "
                     f"{format_number(gap)} |")
    lines += ["", f"The `--all` step trains {settings['groups']} experts at once: its speedup is against "
              f"{settings['groups']} naive one-expert steps (the reference runs one process per expert)."]
    return lines


def projection_lines(report: dict[str, Any]) -> list[str]:
    """The paper schedule's projected hours per stage and path (projected_hours), with its scaling note."""
    config = report["settings"]["config"]
    lines = ["## Paper schedule, projected", "",
             f"{config['backbone_steps']:,} backbone steps; {config['expert_num']} experts x "
             f"{config['expert_steps']:,} steps; {config['router_steps']:,} router steps with E="
             f"{config['expert_num']}. Fast stage 2 takes the faster of one expert per run and the `--all` step "
             "(per expert-step).", "",
             "| path | stage 1 h | stage 2 h | stage 3 h | total h |", "|---|---:|---:|---:|---:|"]
    for row in report["projection"]:
        lines.append(f"| {row['path']} | {format_number(row['stage 1'])} | {format_number(row['stage 2'])} | "
                     f"{format_number(row['stage 3'])} | {format_number(row['total'])} |")
    scales = [row["note"] for row in report["projection"] if row["note"]]
    if scales:
        largest = max(report["settings"]["expert_counts"])
        lines += ["", f"Note: stage 3 scaled by FLOPs from E={largest} to E={config['expert_num']} "
                      f"({', '.join(scales)})."]
    return lines


def evaluation_lines(report: dict[str, Any]) -> list[str]:
    """The evaluation forwards table: per model and path ms per call, rows/s, memory peak (MiB), TFLOP/s, the
    floor (ms) and what sets it, and the model time of one MT160 evaluation (min)."""
    lines = ["## Evaluation: policy forwards", "",
             "Model forward only (inference mode, actions copied to the host); env stepping is timed below. "
             f"Fast: the evaluator's lockstep forwards over {report['settings']['eval_rows']} rollouts, without "
             "and with the prompt cache (the prompt tokens' keys and values computed once per task), and split "
             "into forwards of fewer rows (`--eval_rows`); naive: one rollout per forward, as the reference "
             "evaluates. Peak: the memory one call allocated at most (on a GPU the allocator's peak, on a CPU "
             f"the tensors alive at once). One MT160 evaluation is {report['mt160_eval_rows']:,} policy "
             "forwards (rollout steps at full horizon).", "",
             "| model | path | rows | rows per forward | ms per call | rows/s | peak MiB | TFLOP/s | floor ms | bound by "
             "| time / floor | MT160 evaluation, model time (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in report["evaluation"]:
        tflops = row["forward_flops"] / row["ms_per_forward"] / 1e9
        peak = report["peak_tflops"]["fp32" if row["path"] == "naive" else report["settings"]["precision"]]
        least, bound = time_floor(row["forward_flops"], row["forward_bytes"], peak, report["bandwidth_gbs"])
        minutes = report["mt160_eval_rows"] / row["rows_per_second"] / 60
        lines.append(f"| {row['model']} | {row['path']} | {row['rows']} | {row['rows_per_forward']} | "
                     f"{format_number(row['ms_per_forward'])} | {format_number(row['rows_per_second'], 0)} | "
                     f"{format_number(row['peak_bytes'] / 2**20)} | {format_number(tflops, 3)} | "
                     f"{format_number(least, 2)} | {bound} | {format_number(row['ms_per_forward'] / least)} | "
                     f"{format_number(minutes)} |")
    return lines


def env_lines(report: dict[str, Any]) -> list[str]:
    """The env steps table: steps/s per worker count and the env time of one MT160 evaluation (min), or why
    they were not measured."""
    lines = ["## Evaluation: env steps", "",
             "The evaluator's env worker processes stepping rollouts taken evenly from one MT160 evaluation "
             "(its mix of Meta-World, DMC, ant-dir and cheetah-vel), random actions, env construction not timed. "
             "Env time of one MT160 evaluation = its env steps / steps per second; the whole evaluation takes "
             "about the model time above plus this (the forward waits for the envs and the envs for it).", "",
             "| workers | rollouts | env steps/s | MT160 evaluation, env time (min) |", "|---:|---:|---:|---:|"]
    if not report["env_stepping"]:
        return lines[:1] + ["", f"Not measured: {report['env_error'] or '--env_rollouts 0'}."]
    for row in report["env_stepping"]:
        minutes = report["mt160_eval_rows"] / row["env_steps_per_second"] / 60
        lines.append(f"| {row['workers']} | {row['rollouts']} | {format_number(row['env_steps_per_second'], 0)} | "
                     f"{format_number(minutes)} |")
    return lines


WORK_NOTE = (
    "Matrix products only (2 FLOPs per multiply-add), counted from the model's layers: embeddings, "
    "QKV/projection, the attention products against all L = 75 keys (masked entries included), MLP, experts "
    "(dense mixture: every expert on every token; assigned: each on its own rows), routers and action head. "
    "A training step counts each product once forward and once more per gradient autograd computes: its "
    "weight's gradient when that weight trains, its input's gradient when a trainable weight lies below it. "
    "So trained layers cost 3x forward, frozen layers the gradient passes through 2x, frozen layers below "
    "every trainable weight (stages 2-3: embeddings and block 0's attention and MLP) 1x. LayerNorm, softmax, "
    "activations, dropout, the optimiser and the mixture's weighted sum are not counted. Bytes, the least a "
    "step must move through memory: each of those products reads its two operands once and writes its result "
    "once (fp32), and the optimiser makes 10 passes over the trainable values (fused AdamW reads weight, "
    "gradient and two moments and writes three; clipping reads the gradient twice and writes it once); what "
    "lies between the products (LayerNorm, softmax, dropout) is not counted, so the byte floor is low. Each "
    "path is counted as it computes: the naive path's last block computes every token, as the reference does; "
    "the fast path's only the state tokens the action head reads (the last one in evaluation), from keys and "
    "values of every token. Both give the same outputs, so the speedup compares the times of the same result "
    "and the fast path does 9-13% fewer FLOPs in training, 12-16% fewer per evaluation forward, at the "
    "paper's size."
)


def speedup_vs_naive(result: Measurement, results: list[Measurement]) -> float | None:
    """naive ms / this ms for the same work; an `--all` step stands for `expert_steps` naive one-expert steps."""
    if result.ms_per_step is None:
        return None
    naive_stage = "stage 2: one expert" if result.expert_steps > 1 else result.stage
    naive = [other for other in results if other.stage == naive_stage and other.path == "naive"]
    if not naive:
        return None
    return naive[0].ms_per_step * result.expert_steps / result.ms_per_step


def write_page(markdown: Path, text: str, data: Any) -> None:
    """Write a bench page and its data (the .json beside it), each atomically."""
    for path, content in ((markdown, text), (markdown.with_suffix(".json"), json.dumps(data, indent=2))):
        with atomic_path(path) as temporary:
            temporary.write_text(content)


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write the run's page and its data to `out`/{device}.md and {device}.json; returns the .md's path."""
    markdown = out / f"{report['device']}.md"
    write_page(markdown, markdown_report(report), report)
    return markdown


def run_label(report: dict[str, Any], path: str) -> str:
    """A path of a run, named by its precision: "naive", "bf16", "bf16 + compile reduce-overhead"."""
    return path if path == "naive" else path.replace("fast", report["settings"]["precision"], 1)


def combined_markdown(reports: list[dict[str, Any]]) -> str:
    """One page for several runs on one device (scripts/gpu_check.sh runs one per precision and compile
    mode): each stage's ms/step and speedup over the naive path by run, evaluation rows/s by run, then each
    run's own page."""
    first = reports[0]
    columns: dict[str, None] = {}
    training: dict[str, dict[str, str]] = {}
    for report in reports:
        rows = [Measurement(**row) for row in report["training"]]
        for row in rows:
            label = run_label(report, row.path)
            if label == "naive" and label in training.get(row.stage, {}):
                continue  # every run times the naive path; the first run's stands
            speedup = None if row.path == "naive" else speedup_vs_naive(row, rows)
            cell = f"failed: {row.error}" if row.ms_per_step is None else format_number(row.ms_per_step, 2)
            training.setdefault(row.stage, {})[label] = cell + (f" ({speedup:.1f}x)" if speedup else "")
            columns[label] = None
    evaluation: dict[str, dict[str, str]] = {}
    eval_columns: dict[str, None] = {}
    for report in reports:
        for row in report["evaluation"]:
            label = run_label(report, row["path"])
            evaluation.setdefault(row["model"], {}).setdefault(label, format_number(row["rows_per_second"], 0))
            eval_columns[label] = None
    commands = "; ".join(f"`{report['command']}`" for report in reports)
    lines = [f"# Speed: {first['device']}", "",
             f"{first['description']}, torch {first['torch']}, {first['date']}. Runs: {commands}. Each run's own "
             "page follows (its settings, floors and what bounds each step).", "",
             "## Training: ms/step (speedup over the naive path, fp32, of the same run)", "",
             "| stage | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {stage} | " + " | ".join(cells.get(label, "-") for label in columns) + " |"
              for stage, cells in training.items()]
    lines += ["", f"## Evaluation forwards: rows/s ({first['settings']['eval_rows']} rollouts per call)", "",
              "| model | " + " | ".join(eval_columns) + " |", "|---|" + "---:|" * len(eval_columns)]
    lines += [f"| {model} | " + " | ".join(cells.get(label, "-") for label in eval_columns) + " |"
              for model, cells in evaluation.items()]
    pages = [f"## Run: {run_label(report, 'fast')}" + markdown_report(report).replace("\n#", "\n##").split("\n", 1)[1]
             for report in reports]
    return "\n".join(lines) + "\n\n" + "\n".join(pages)


def read_bench_report(path: Path) -> dict:
    """One run's {device}.json: ArtifactError naming the file when it is not JSON or not a bench report."""
    report = read_json(path, "bench report")
    if not isinstance(report, dict) or "device" not in report:
        raise ArtifactError(f"{path}: not a bench report of python -m m3dt.bench (no 'device')")
    return report


def combine(argv: list[str]) -> Path:
    """`python -m m3dt.bench combine DIR... --out benchmarks`: the reports ({device}.json) in DIR... as one
    page, {out}/{device}.md, and their list, {out}/{device}.json."""
    parser = argparse.ArgumentParser(description="Several bench runs on one device as one page.")
    parser.add_argument("folders", nargs="+", help="--out folders of the runs, in the order of the page")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if any(Path(folder).resolve() == out.resolve() for folder in args.folders):
        raise SystemExit(f"error: --out {out} is one of the runs' folders: its {{device}}.json would be overwritten")
    try:
        make_folder(out, "folder of the page (--out)")
        reports = [read_bench_report(path) for folder in args.folders for path in sorted(Path(folder).glob("*.json"))]
    except ArtifactError as error:
        raise SystemExit(f"error: {error}") from None
    if not reports:
        raise SystemExit(f"error: no bench report (*.json) in {', '.join(args.folders)}")
    markdown = out / f"{reports[0]['device']}.md"
    write_page(markdown, combined_markdown(reports), reports)
    print(f"wrote {markdown} and {markdown.with_suffix('.json')}")
    return markdown


# ------------------------------------------------------------------------------------------ main
def parse_settings(argv: list[str] | None) -> Settings:
    """The bench's settings from `argv` (unset options from DEFAULTS of --quick or full mode); sets torch's CPU
    threads (--threads). SystemExit for a count below its minimum (OPTION_MINIMUMS), bad --experts or --stages,
    --tasks beyond MT160 or more --groups than tasks; ConfigError for a --device torch does not know or that is
    not there, a model size the stages would refuse, or an --out that is a file or cannot be made (it is made
    here)."""
    parser = ArgumentParser(description="Time every stage: the project's step against the reference's way.")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=CHOICES["precision"], default="fp32",
                        help="of the fast path: fp32, tf32 (TF32 matmuls on GPUs), bf16 (autocast)")
    parser.add_argument("--stages", default="1,2,3", help="training stages to time, comma-separated (default 1,2,3)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, experts and rows: < 5 min on 2 CPU cores")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (full 20, quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (full 5, quick 2)")
    parser.add_argument("--experts", help="stage-3 expert counts, comma-separated (full 8,16,48; quick 8)")
    parser.add_argument("--groups", type=int, help="experts in the stage-2 --all step (full 48, quick 4)")
    parser.add_argument("--tasks", type=int, help="synthetic tasks (full 160, quick 48)")
    parser.add_argument("--eval_rows", type=int, help="rollouts per lockstep evaluation forward (full 1560, quick 16)")
    parser.add_argument("--env_rollouts", type=int,
                        help="envs stepped together when timing the env workers (full 160, quick 32; 0: skip)")
    parser.add_argument("--env_steps", type=int, help="lockstep env steps timed (full 50, quick 20)")
    parser.add_argument("--compile", choices=CHOICES["compile"], default="none",
                        help="also time the fast path under torch.compile in this mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks", help="folder for {device}.md and {device}.json")
    parser.add_argument("--embed_dim", type=int, default=256, help="model size overrides, for smoke tests")
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=8)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"

    def option(name: str) -> Any:
        value = getattr(args, name)
        return DEFAULTS[mode][name] if value is None else value

    expert_counts = str(option("experts")).split(",")
    if not all(count.strip().isdigit() and int(count) > 0 for count in expert_counts):
        parser.error(f"--experts must be comma-separated counts, got {option('experts')!r}")
    stages = args.stages.replace(" ", "").split(",")
    if not set(stages) <= {"1", "2", "3"}:  # "" (an empty or doubled comma) is not a stage
        parser.error(f"--stages must be comma-separated stages of 1, 2, 3, got {args.stages!r}")
    for name, minimum in OPTION_MINIMUMS.items():
        value = option(name) if name in DEFAULTS[mode] else getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
    if option("tasks") > MT160_TASKS:
        parser.error(f"--tasks must be at most {MT160_TASKS} (the MT160 list), got {option('tasks')}")
    if option("groups") > option("tasks"):
        parser.error(f"--groups {option('groups')} is more experts than the {option('tasks')} tasks (--tasks)")
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings(
        device=resolve_device(args.device), precision=args.precision, mode=mode, steps=option("steps"),
        warmup=option("warmup"), expert_counts=[int(count) for count in expert_counts],
        groups=option("groups"), tasks=option("tasks"), eval_rows=option("eval_rows"),
        env_rollouts=option("env_rollouts"), env_steps=option("env_steps"), compile=args.compile,
        stages=sorted({int(stage) for stage in stages}),
        out=Path(args.out),
        config=Config(embed_dim=args.embed_dim, n_layer=args.n_layer, n_head=args.n_head,
                      precision=args.precision),
    )
    check_values(settings.config)  # the model size overrides (ConfigError)
    make_folder(settings.out, "bench folder (--out)", ConfigError)  # before the timings, not when they are written
    return settings


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the training steps, evaluation forwards and env steps on synthetic data in the MT160 layout, print
    the page and write it (write_report); returns the report as written to {device}.json. Exits (SystemExit)
    with a one-line error for bad options."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_settings(argv)
    except ConfigError as error:  # an unknown --device
        exit_with_message(error, debug=False)
    config, device = settings.config, settings.device
    torch.manual_seed(config.seed)
    task_names = resolve_tasks("mt160", None, config.seed)[: settings.tasks]
    with tempfile.TemporaryDirectory(prefix="m3dt_bench_") as root:
        # Full-horizon episodes: the naive sampler's per-sample return-to-go loop then costs what it would
        # on the real data.
        make_dataset(Path(root), task_names, episodes=TRAIN_EPISODES + 2, steps=None)
        dataset = TaskDataset(root, task_names, prompt_length=config.prompt_length)
        naive_sampler = NaiveSampler(root, task_names, config.context_length, config.batch_size,
                                     config.prompt_length, device, seed=config.seed)
    precisions = CHOICES["precision"] if device.type == "cuda" else sorted({"fp32", settings.precision})
    peak = {precision: matmul_peak(device, precision) for precision in precisions}
    bandwidth = copy_bandwidth(device)
    print(f"{device_description(device)}: matmul peak " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peak.items())
          + f", copy bandwidth {bandwidth:.1f} GB/s")

    wall, cpu = time.perf_counter(), time.process_time()
    training = measure_sampling(dataset, naive_sampler, settings)
    for case in training_cases(settings):
        training += measure_case(case, dataset, naive_sampler, settings)
    evaluation = measure_evaluation(dataset, settings)
    # CPU-seconds this process got per second: the thread count on a machine of its own; less when the
    # host shares its cores (the measurements then run slower than the hardware can).
    cpu_per_wall = (time.process_time() - cpu) / (time.perf_counter() - wall)
    env_stepping, env_error = [], ""
    if settings.env_rollouts:  # after the rest: this process mostly waits on its env workers
        try:
            env_stepping = measure_env_stepping(settings)
        except Exception as error:  # noqa: BLE001 - env workers fail in many ways (a simulator package
            # missing on this machine, a GL setting); the measurements above are still written.
            env_error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            print(f"  env steps: failed: {env_error}", flush=True)

    report = {
        "device": device_name(device), "description": device_description(device), "torch": torch.__version__,
        "date": date.today().isoformat(), "command": " ".join(["python -m m3dt.bench", *argv]),
        "settings": {**asdict(settings), "device": str(device), "out": str(settings.out), "config": vars(config)},
        "peak_tflops": peak, "bandwidth_gbs": bandwidth, "threads": torch.get_num_threads(), "cpu_per_wall": cpu_per_wall,
        "training": [asdict(result) for result in training],
        "projection": projected_hours(training, settings),
        "evaluation": [asdict(result) for result in evaluation],
        "env_stepping": [asdict(result) for result in env_stepping], "env_error": env_error,
        "mt160_eval_rows": evaluation_rows(resolve_tasks("mt160", None, config.seed)),
    }
    path = write_report(report, settings.out)
    print(markdown_report(report))
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["combine"]:
        combine(sys.argv[2:])
    else:
        main()

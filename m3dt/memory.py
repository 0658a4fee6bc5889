"""Memory: what a stage holds at its peak, planned before anything is loaded, and where the dataset goes.

A plan has four parts, in bytes:
- data: the flat dataset arrays (192 bytes per transition, 8 per episode, and each task's statistics and
  prompts) when they sit on the device, else 0 (they are then in host memory);
- weights: every parameter and buffer of the model (frozen ones too: they run in the forward);
- optimizer: AdamW's two moments per trainable value;
- activations: the peak of one step's forward and backward beyond the weights: what autograd keeps for
  the backward, the gradients flowing back, the parameters' gradients, and the step's temporaries. It is
  counted, not estimated: the stage's own model runs one step on PyTorch's "meta" device (shapes only, no
  arithmetic, no memory) while a dispatch hook adds up the bytes of every tensor alive after each operation.

Every part is counted in float32. `--precision bf16` holds about half the activations (and a bf16 copy of
the weights inside autocast), so its plan is an upper bound; tf32 uses float32 tensors and the same memory.
Attention is counted the plain way, which keeps the attention weights for the backward; the fused kernels
of CPUs and GPUs keep less, so that part too is an upper bound. Not counted: the CUDA context (outside
PyTorch's allocator, and no longer in the device's free memory once CUDA has started), cuBLAS workspaces (a
few MiB) and the caching allocator's rounding, which the margin of `--data_device auto` leaves room for.
scripts/gpu_check.sh measures the peak of every stage on a GPU against its plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from m3dt.cli import command, exit_with_message
from m3dt.config import ArgumentParser, Config, ConfigError
from m3dt.data import Batch
from m3dt.model import PromptCache, PromptDecisionTransformer, action_loss, build_model, set_up_stage
from m3dt.run import atomic_path, check_file_target
from m3dt.tasks import EPISODES_PER_FAMILY, MAX_ACT_DIM, MAX_OBS_DIM, get_task, resolve_tasks
from m3dt.train import Precision, build_optimizer, resolve_device, train_step, warmup_factor

GIB = 2**30
FLOAT_BYTES = 4
TRANSITION_BYTES = (MAX_OBS_DIM + MAX_ACT_DIM + 1) * FLOAT_BYTES  # observation, action, scaled return-to-go
EPISODE_BYTES = 8  # one int64 episode start
DATA_MARGIN = 0.9  # `--data_device auto` puts the dataset on the device when the plan fits in 90% of its free memory
EVAL_MEMORY_SHARE = 0.5  # evaluation forwards are split so that each needs at most this share of free memory


@dataclass(frozen=True)
class MemoryPlan:
    """Planned peak memory of one stage on its device, in bytes (see the module docstring)."""

    data: int
    weights: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """The planned peak: data + weights + optimizer + activations, in bytes."""
        return self.data + self.weights + self.optimizer + self.activations

    def describe(self, free: int, capacity: int, device: torch.device) -> str:
        """One line for the log: the plan by part and the device's free memory (GiB)."""
        where = "host memory" if device.type == "cpu" else f"{device} memory"
        return (f"memory plan: peak {self.total / GIB:.2f} GiB of {where} (in GiB: data {self.data / GIB:.2f}, "
                f"weights {self.weights / GIB:.2f}, optimizer {self.optimizer / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}; floating-point values counted at float32's 4 bytes: under bf16 the "
                f"peak is an upper bound); free now {free / GIB:.2f} of {capacity / GIB:.2f} GiB")


# ------------------------------------------------------------------------------------------ the data
def dataset_bytes(transitions: int, episodes: int, tasks: int, prompt_length: int) -> int:
    """Bytes of the sampler's tensors (m3dt/data.py) for this many transitions, episodes and tasks: the flat
    arrays, and per task its offset, size and horizon, action mask, state mean and std, and two prompt
    windows (states, actions, return-to-go, timesteps, mask)."""
    per_task = (3 * 8 + MAX_ACT_DIM * FLOAT_BYTES + 2 * MAX_OBS_DIM * FLOAT_BYTES
                + 2 * prompt_length * (TRANSITION_BYTES + 8 + FLOAT_BYTES))
    return transitions * TRANSITION_BYTES + (episodes + 1) * EPISODE_BYTES + tasks * per_task


def official_size(task_names: list[str]) -> tuple[int, int]:
    """(transitions, episodes) of the official MT160 data of these tasks, from the task table: training
    episodes x horizon (ant-dir episodes can end early, so for it this is an upper bound)."""
    tasks = [get_task(name) for name in task_names]
    return (sum(task.train_trajectories * task.horizon for task in tasks),
            sum(task.train_trajectories for task in tasks))


# ------------------------------------------------------------------------------------------ the model
class LiveMemory(TorchDispatchMode):
    """Counts the bytes of the tensors created inside it that are alive after each operation, and their
    peak. Tensors made before it (weights, inputs) are not counted. Works on any device; on "meta" the
    count costs no memory and no arithmetic."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        # An operation's inputs are freed after it returns, so its outputs and inputs count together here.
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return output


def meta_batch(rows: int, context_length: int, prompt_length: int, device: torch.device | str = "meta") -> Batch:
    """A batch of the right shapes and dtypes (its values are never read on "meta")."""
    def floats(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device)

    def longs(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.long, device=device)

    return Batch(states=floats(rows, context_length, MAX_OBS_DIM), actions=floats(rows, context_length, MAX_ACT_DIM),
                 returns_to_go=floats(rows, context_length, 1), timesteps=longs(rows, context_length),
                 mask=floats(rows, context_length), prompt_states=floats(rows, prompt_length, MAX_OBS_DIM),
                 prompt_actions=floats(rows, prompt_length, MAX_ACT_DIM),
                 prompt_returns_to_go=floats(rows, prompt_length, 1), prompt_timesteps=longs(rows, prompt_length),
                 prompt_mask=floats(rows, prompt_length), action_mask=floats(rows, 1, MAX_ACT_DIM))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, frozen ones included, counted as float32 whatever their dtype."""
    return sum(tensor.numel() * FLOAT_BYTES for tensor in [*model.parameters(), *model.buffers()])


def optimizer_bytes(model: nn.Module) -> int:
    """AdamW keeps two moments per trainable value."""
    return 2 * FLOAT_BYTES * sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def on_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only float32 stand-ins for every parameter and buffer of `model` (which may live anywhere, in
    any floating dtype)."""
    def stand_in(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("meta", torch.float32 if tensor.is_floating_point() else tensor.dtype)

    tensors = {name: stand_in(parameter).requires_grad_(parameter.requires_grad)
               for name, parameter in model.named_parameters()}
    return {**tensors, **{name: stand_in(buffer) for name, buffer in model.named_buffers()}}


def training_step_bytes(model: PromptDecisionTransformer, rows: int, groups: int, context_length: int,
                        prompt_length: int) -> int:
    """Peak bytes beyond the weights of one training forward and backward of `model` (its stage's experts
    installed, frozen parts frozen) over `rows` rows in `groups` row groups, counted on "meta"."""
    batch = meta_batch(rows, context_length, prompt_length)
    was_training = model.training
    model.train()
    with LiveMemory() as live:
        predicted = torch.func.functional_call(model, on_meta(model), (batch,))
        action_loss(predicted, batch, groups).backward()
    model.train(was_training)
    return live.peak


def forward_bytes(model: PromptDecisionTransformer, rows: int, context_length: int, prompt_length: int,
                  cached_prompt: bool = False) -> int:
    """Peak bytes beyond the weights of one evaluation forward of `model` over `rows` rollouts (no gradients,
    the last step only), counted on "meta"; with `cached_prompt` the prompt's keys and values come from a
    PromptCache (which is counted too)."""
    batch = meta_batch(rows, context_length, prompt_length)
    config = model.config
    was_training = model.training
    model.eval()
    cached_prompt = cached_prompt and model.embed_prompt is not None  # MTDT has no prompt
    with torch.no_grad(), LiveMemory() as live:
        cache = PromptCache.empty(len(model.blocks), rows, config.n_head, 3 * prompt_length,
                                  config.embed_dim // config.n_head, "meta") if cached_prompt else None
        torch.func.functional_call(model, on_meta(model), (batch,), {"last_step_only": True, "prompt_cache": cache})
    model.train(was_training)
    return live.peak


def plan_training(model: PromptDecisionTransformer, rows: int, groups: int, context_length: int, prompt_length: int,
                  data: int) -> MemoryPlan:
    """The plan of a training stage whose `model` (on any device, "meta" included) has its stage's experts
    installed and frozen parts frozen; `data`: dataset bytes on the device (0 when in host memory)."""
    return MemoryPlan(data=data, weights=weight_bytes(model), optimizer=optimizer_bytes(model),
                      activations=training_step_bytes(model, rows, groups, context_length, prompt_length))


# ------------------------------------------------------------------------------------------ the device
def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: from the CUDA driver, or the host's available memory for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()}
        return values["MemAvailable"], values["MemTotal"]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, total


def data_device(requested: str, device: torch.device, plan_with_data: MemoryPlan, free: int) -> torch.device:
    """Where the dataset lives (`--data_device`): `auto` keeps it on the training device when the whole plan
    fits in DATA_MARGIN of the free memory, else in host memory; `cuda`/`cpu` as asked. ConfigError for `cuda`
    when training runs on the CPU (it was taken silently: the data can only live where training runs, or on
    the host)."""
    if requested == "cuda" and device.type != "cuda":
        raise ConfigError(f"--data_device cuda: training runs on {device}; the data lives on the training GPU or in "
                          "host memory (--data_device auto or cpu)")
    if device.type == "cpu" or requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or plan_with_data.total <= DATA_MARGIN * free:
        return device
    return torch.device("cpu")


def evaluation_rows(model: PromptDecisionTransformer, context_length: int, prompt_length: int, free: int,
                    cached_prompt: bool = True, probe_rows: int = 64) -> int:
    """Rollouts per evaluation forward so that one forward needs at most EVAL_MEMORY_SHARE of `free` bytes,
    from the count of a `probe_rows`-row forward (activations grow in proportion to the rows)."""
    per_row = forward_bytes(model, probe_rows, context_length, prompt_length, cached_prompt) / probe_rows
    return max(1, int(EVAL_MEMORY_SHARE * free / per_row))


# ------------------------------------------------------------------------------------------ the stages
@dataclass(frozen=True)
class StageCase:
    """One stage at a configuration: what it trains and how many rows a step (or forward) has."""

    name: str
    stage: int  # 1, 2, 3; 0 for an evaluation forward
    experts: int  # installed experts (0: the backbone alone)
    rows: int  # rows of one step or forward
    groups: int = 1  # row groups of a step (the `--all` step: one per expert)
    cached_prompt: bool = False  # evaluation forward with the prompt cache


def stage_cases(experts: tuple[int, int] = (8, 48), eval_rows: int = 1560, batch_size: int = 16) -> list[StageCase]:
    """Every stage: by default at the paper configuration (batch 16, 8 and 48 experts, an MT160 evaluation's
    1,560 rollouts in one forward)."""
    few, many = experts
    return [StageCase("stage 1", 1, 0, batch_size), StageCase("stage 2, one expert", 2, 1, batch_size),
            StageCase(f"stage 2, --all {many} experts", 2, many, batch_size * many, groups=many),
            StageCase(f"stage 3, E={few}", 3, few, batch_size), StageCase(f"stage 3, E={many}", 3, many, batch_size),
            StageCase(f"evaluation forward, E={many}, {eval_rows} rollouts", 0, many, eval_rows),
            StageCase(f"evaluation forward, E={many}, {eval_rows} rollouts, prompt cache", 0, many, eval_rows,
                      cached_prompt=True)]


def case_model(case: StageCase, model_fields: dict, device: torch.device | str = "meta") -> PromptDecisionTransformer:
    """The model of a case, set up as its stage trains it (m3dt/stages.py), on `device`."""

    with torch.device(device):
        model = build_model(model_fields, dropout=0.1)
        set_up_stage(model, 3 if case.stage == 0 else case.stage, case.experts)
    return model


def plan_case(case: StageCase, model_fields: dict, context_length: int = 20, prompt_length: int = 5,
              data: int = 0) -> MemoryPlan:
    """The plan of `case` with its model built on "meta": a training stage's (`plan_training`), or for an evaluation
    forward (stage 0) the weights and the forward's activations, no optimizer; `data`: dataset bytes on the device."""
    model = case_model(case, model_fields)
    if case.stage == 0:
        return MemoryPlan(data=data, weights=weight_bytes(model), optimizer=0,
                          activations=forward_bytes(model, case.rows, context_length, prompt_length, case.cached_prompt))
    return plan_training(model, case.rows, case.groups, context_length, prompt_length, data)


def measured_peak(case: StageCase, model_fields: dict, device: torch.device, precision: str = "fp32",
                  context_length: int = 20, prompt_length: int = 5) -> int:
    """The peak bytes (peak_bytes) of `case` run for real on `device`: model, optimizer and two training
    steps (or an evaluation forward), on a random batch. Comparable to the plan's total without data."""
    batch = meta_batch(case.rows, context_length, prompt_length, device)
    for tensor in vars(batch).values():
        if tensor is None:  # the optional task_index
            continue
        if tensor.is_floating_point():
            tensor.uniform_()
        else:
            tensor.random_(0, 100)  # timesteps
    for mask in (batch.mask, batch.prompt_mask, batch.action_mask):
        mask.fill_(1.0)
    numerics = Precision(device, precision)

    def run() -> None:
        model = case_model(case, model_fields, device)
        if case.stage == 0:
            model.eval()
            with torch.inference_mode(), numerics:
                cache = model.cache_prompt(batch.prompt_states, batch.prompt_actions, batch.prompt_returns_to_go,
                                           batch.prompt_timesteps, batch.prompt_mask) if case.cached_prompt else None
                model(batch, last_step_only=True, prompt_cache=cache)
            return
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = build_optimizer(parameters, Config())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(10))
        for _ in range(2):  # the second step has the optimizer's state and the first step's gradients
            train_step(model.train(), batch, case.groups, optimizer, scheduler, parameters, 0.25,
                       case.stage == 2, numerics)

    return peak_bytes(run, device)


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `run()` runs, beyond what was allocated before. CUDA: the caching
    allocator's peak (cuBLAS workspaces are made beforehand, so they are not in it); a CPU: the tensors
    alive at once, counted by LiveMemory."""
    if device.type != "cuda":
        with LiveMemory() as live:
            run()
        return live.peak
    weight = torch.ones(8, 8, device=device, requires_grad=True)
    torch.nn.functional.linear(weight, weight, weight[0]).sum().backward()  # cuBLAS and cuBLASLt workspaces
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


# ------------------------------------------------------------------------------------------ command line
CARDS_GB = (24, 40, 80)
CARD_RESERVE = GIB  # of a card's memory, for the CUDA context and the allocator's rounding
TABLE_SUITES = ("mt10", "mt80", "mt160")
TABLE_EXPERTS = (8, 48)
CHECK_TOLERANCE = 0.10  # a measured peak may exceed its plan by this share (the allocator rounds up)


def fits_table(model_fields: dict) -> str:
    """The README's "what fits where": per official suite (seed 0) and expert count, each stage's planned
    peak (GiB) with the dataset on the GPU and, in parentheses, with it in host memory; per card size,
    where the dataset has to live."""
    lines = ["| tasks | data GiB | experts | stage 1 GiB (data in host memory) | stage 2 `--all` GiB (same) | "
             "stage 3 GiB (same) | evaluation GiB, all rollouts in one forward | "
             + " | ".join(f"{gb} GB card" for gb in CARDS_GB) + " |",
             "|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(CARDS_GB)]
    for suite in TABLE_SUITES:
        names = resolve_tasks(suite, None, 0)
        transitions, episodes = official_size(names)
        data = dataset_bytes(transitions, episodes, len(names), 5)
        rollouts = sum(EPISODES_PER_FAMILY[get_task(name).family] for name in names)
        for experts in [count for count in TABLE_EXPERTS if count <= len(names)]:
            cases = {"stage 1": StageCase("stage 1", 1, 0, 16),
                     "`--all`": StageCase("--all", 2, experts, 16 * experts, groups=experts),
                     "stage 3": StageCase("stage 3", 3, experts, 16),
                     "evaluation": StageCase("evaluation", 0, experts, rollouts, cached_prompt=True)}
            plans = {name: plan_case(case, model_fields) for name, case in cases.items()}
            cells = [f"{(plan.total + (0 if name == 'evaluation' else data)) / GIB:.1f} ({plan.total / GIB:.1f})"
                     for name, plan in plans.items()]
            cells[-1] = f"{plans['evaluation'].total / GIB:.1f} ({rollouts} rollouts)"
            cards = [card_cell(plans, data, gb * 10**9 - CARD_RESERVE) for gb in CARDS_GB]
            lines.append(f"| {len(names)} | {data / GIB:.1f} | {experts} | " + " | ".join(cells + cards) + " |")
    return "\n".join(lines)


def card_cell(plans: dict[str, MemoryPlan], data: int, usable: int) -> str:
    """Where the data lives on a card with `usable` bytes, for `--data_device auto`, and what does not fit."""
    training = [name for name in plans if name != "evaluation"]
    on_host = [name for name in training if plans[name].total + data > DATA_MARGIN * usable]
    too_big = [name for name in on_host if plans[name].total > usable]
    notes = []
    if too_big:
        notes.append(f"{', '.join(too_big)} does not fit")
    if set(on_host) - set(too_big):
        notes.append(f"data in host memory for {', '.join(name for name in on_host if name not in too_big)}")
    if plans["evaluation"].total > EVAL_MEMORY_SHARE * usable:
        notes.append("evaluation split into forwards")
    return "; ".join(notes) or "everything on the GPU"


def check(device: torch.device, precision: str, tiny: bool) -> list[dict]:
    """Each stage's measured peak against its plan; prints a table. `tiny`: a small model (CPU rehearsal)."""
    config = Config(embed_dim=32, n_layer=2, n_head=2, router_hidden="64,32") if tiny else Config()
    cases = stage_cases((2, 4), eval_rows=64) if tiny else stage_cases()
    rows = []
    print(f"| case ({precision}, {'tiny model' if tiny else 'paper model'}) | planned GiB (weights + optimizer + "
          "activations) | measured peak GiB | measured / planned |\n|---|---:|---:|---:|", flush=True)
    for case in cases:
        plan = plan_case(case, config.model_fields())
        measured = measured_peak(case, config.model_fields(), device, precision)
        ratio = measured / plan.total
        rows.append({"case": case.name, "precision": precision, "planned": plan.total, "measured": measured,
                     "weights": plan.weights, "optimizer": plan.optimizer, "activations": plan.activations,
                     # On a CPU, m3dt/kernels.py computes dropout and attention its own way (the plan counts
                     # the GPU's), so only a GPU's peaks are held to the plan.
                     "ratio": ratio, "within_plan": ratio <= 1 + CHECK_TOLERANCE if device.type == "cuda" else None})
        print(f"| {case.name} | {plan.total / GIB:.3f} ({plan.weights / GIB:.3f} + {plan.optimizer / GIB:.3f} + "
              f"{plan.activations / GIB:.3f}) | {measured / GIB:.3f} | {ratio:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@command
def main(argv: list[str] | None = None) -> int:
    """`python -m m3dt.memory table|check`: print the "what fits where" table, or check measured peaks against plans
    (optionally written as JSON to --out). Returns the exit code: 1 when a GPU peak exceeds its plan by more than
    CHECK_TOLERANCE, else 0."""
    parser = ArgumentParser(description="Memory plans: the README's table, or plans against measured peaks.")
    parser.add_argument("command", choices=("table", "check"),
                        help="table: what fits where (planned, any machine); check: every stage's measured peak "
                             "against its plan on --device")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--tiny", action="store_true", help="check with a small model and 4 experts (CPU rehearsal)")
    parser.add_argument("--out", help="check: write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(fits_table(Config().model_fields()))
        return 0
    try:
        device = resolve_device(args.device)
        if args.out:
            check_file_target(Path(args.out), "--out file", ConfigError)
    except ConfigError as error:  # an unknown device, CUDA asked where there is none, an --out that is a folder
        exit_with_message(error, debug=False)
    rows = check(device, args.precision, args.tiny)
    if args.out:
        with atomic_path(Path(args.out)) as temporary:
            temporary.write_text(json.dumps(rows, indent=2))
    over = [row["case"] for row in rows if row["within_plan"] is False]
    if over:
        print(f"measured peak above its plan by more than {CHECK_TOLERANCE:.0%}: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())

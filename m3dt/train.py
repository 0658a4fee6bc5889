"""The one training loop every stage and comparison method uses. They differ only in what is trainable,
which tasks each step draws, whether gradients are clipped globally or per expert, and the hooks a method
adds around the update (`TrainingHooks`: HarmoDT's task masks, the stage-1 gradient-conflict measure).

Each step draws one task per row group round-robin (`task = tasks[step % n_tasks]`), a batch of 16 segments
from it, and takes one AdamW step with linear warmup and global-norm clipping at 0.25. `--all` expert
training has G row groups (one per expert) in the same step; since every expert's weights are a disjoint
slice of the stacked parameters, one AdamW over them equals G separate AdamWs, and clipping is done per
expert, so each expert is optimised exactly as in its own run.

Under torchrun (stages 1 and 3), rank r of R loads and trains only tasks r, r + R, r + 2R, ... of the task
list (m3dt/stages.py), cycling through them, and DDP averages the gradients: an effective batch of R x 16
segments from R different tasks per step. When R divides the task count, step s trains tasks
(s * R + r) mod n, the round-robin of the single-process order taken R entries at a time; otherwise the
ranks' shares differ by one task, and a task in a shorter share is drawn a little more often. Only rank 0
writes.

Nothing in the loop waits for the device except at log and checkpoint boundaries.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from m3dt.config import Config, ConfigError
from m3dt.data import Batch, DeviceSampler
from m3dt.model import PromptDecisionTransformer, action_loss
from m3dt.run import (ArtifactError, append_jsonl, atomic_path, exclusive_locks, load_checkpoint, make_folder,
                      remove_stale_temporaries, save_checkpoint, truncate_jsonl)

TRAIN_STATE = "train_state.pt"
LOCK_FILE = "train.lock"
WANDB_ID = "wandb_run_id"  # the W&B run a resumed job continues
METRICS = "metrics.jsonl"
# How a resume refusal names the parts of a job's identity that are not an option of their own.
IDENTITY_NAMES = {"data": "data (--data_path, --max_episodes: other episode files)",
                  "data_statistics": "data (the same files with other contents: other per-task statistics)",
                  "inputs": "inputs (the files it was trained on)", "tasks": "tasks", "model": "model",
                  "world_size": "torchrun world size", "method": "method"}  # the other parts are options (--name)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient); the message says where and what to resume from."""


class TrainingHooks:
    """What a method adds to the step of the loop; the default adds nothing. HarmoDT masks the weights per
    task around each update (m3dt/baselines/harmodt.py); stage 1 can measure gradient conflict
    (m3dt/conflict.py). A hook's state is saved in the checkpoint with the weights and restored on resume."""

    def before_forward(self, task_indices: torch.Tensor) -> None:
        """Before the step's forward; `task_indices` (G,): the task of each row group."""

    def before_update(self) -> None:
        """Gradients are computed and clipped; the optimizer has not stepped yet."""

    def after_update(self) -> None:
        """The optimizer has stepped."""

    def after_step(self, step: int) -> dict[str, float]:
        """`step` steps are done. Returns metrics to log at this step (none by default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps of the hooks' state, so that a resumed run continues it (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""


@dataclass
class Job:
    """One training run of the loop."""

    name: str  # shown in the progress bar and logs
    model: PromptDecisionTransformer
    trainable: dict[str, nn.Parameter]  # by name, as saved in checkpoints
    task_groups: list[list[int]]  # per row group, the dataset task indices it cycles through
    task_names: list[str]  # dataset task index -> name, for messages
    steps: int
    job_dir: Path
    per_expert_clip: bool  # trainable parameters are stacked per expert (leading dim = row groups)
    identity: dict[str, Any]  # what must match for a checkpoint to be resumed
    hooks: TrainingHooks = field(default_factory=TrainingHooks)  # what the method adds to each step
    locks: list[Path] = field(default_factory=list)  # beside job_dir's own: files other jobs also train (experts)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and artifacts."""
        return self.rank == 0


def start_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job when there is one (WORLD_SIZE > 1): NCCL with one GPU per rank, else gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size), device


def stop_distributed() -> None:
    """Wait for every rank (rank 0 may still be writing artifacts), then shut the process group down; a
    process that exits with it still open aborts in gloo's teardown. The DDP wrapper of the finished stage
    sits in reference cycles: collect it first, so that no gloo work it holds outlives the group (a rank
    aborted in teardown once in a full test run, SIGABRT after its last step)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def round_robin_table(task_groups: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the groups' task lists into a table so that the tasks of step s are table[g, s % len(group g)]."""
    width = max(len(group) for group in task_groups)
    table = torch.zeros(len(task_groups), width, dtype=torch.long)
    for row, group in enumerate(task_groups):
        table[row, : len(group)] = torch.tensor(group)
    lengths = torch.tensor([len(group) for group in task_groups])
    return table.to(device), lengths.to(device)


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of LambdaLR at each step: linear from 1/warmup_steps to 1 over the
    first `warmup_steps` steps, then 1 (the reference's schedule; no decay)."""
    return lambda step: min((step + 1) / warmup_steps, 1.0)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, per_expert: bool) -> torch.Tensor:
    """Global-norm clipping as torch's clip_grad_norm_; per expert, every parameter's leading dim indexes
    the expert and each expert is clipped by its own norm. Returns the norm(s) before clipping."""
    if not per_expert:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    squares = sum(p.grad.pow(2).reshape(p.shape[0], -1).sum(dim=1) for p in parameters)
    norms = squares.sqrt()
    scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for parameter in parameters:
        parameter.grad.mul_(scale.view(-1, *[1] * (parameter.dim() - 1)))
    return norms


def build_optimizer(parameters: list[nn.Parameter], config: Config) -> torch.optim.AdamW:
    """AdamW over `parameters` with the run's learning rate and weight decay, betas (0.9, 0.999) and eps
    1e-8, as the reference in every stage."""
    return torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=config.weight_decay,
        fused=True,  # one kernel over all parameters; on CPU too (measured: 7 ms vs 37 ms per step, stage 1)
    )


def rng_state(sampler: DeviceSampler) -> dict[str, Any]:
    """Every random stream of the training device: torch's CPU generator, the sampler's streams and, on a
    GPU, that GPU's default generator (dropout), which is the training device's, not the current device's."""
    device = sampler.device
    # One tensor per generator: Generator.set_state crashes (segfault) on a row view of a stacked tensor.
    state = {"device": device.type, "torch": torch.get_rng_state(),
             "sampler": [generator.get_state() for generator in sampler.generators]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def check_rng_device(state: dict[str, Any], sampler: DeviceSampler, path: Path) -> None:
    """CPU and CUDA generators have different states and streams, so a checkpoint resumes only on the device
    type it was trained on; a CUDA state moves between GPUs unchanged (cuda:0 -> cuda:1 is fine). The
    sampler's streams are CPU generators whatever the device (older versions kept them on the GPU)."""
    saved = state.get("device", "an unrecorded device")
    if saved != sampler.device.type:
        raise ArtifactError(f"{path}: checkpoint was trained on {saved}; its random streams cannot continue on "
                            f"{sampler.device}: rerun with --device {saved} to resume, or --restart")
    if any(saved_stream.numel() != generator.get_state().numel()
           for saved_stream, generator in zip(state["sampler"], sampler.generators)):
        raise ArtifactError(f"{path}: checkpoint's batch streams were written by an older version of m3dt "
                            "(on the GPU) and cannot continue here; rerun with --restart")


def restore_rng_state(state: dict[str, Any], sampler: DeviceSampler) -> None:
    """Put back torch's RNG (dropout) and the sampler's batch streams as rng_state saved them."""
    torch.set_rng_state(state["torch"])
    for generator, generator_state in zip(sampler.generators, state["sampler"]):
        generator.set_state(generator_state)
    if sampler.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], sampler.device)


def start_wandb(config: Config, job: Job, start: int) -> Any:
    """A wandb run logging into the job's folder, offline unless WANDB_MODE says otherwise. A job resumed from
    step `start` > 0 continues the W&B run it began (its id is kept in the job's folder; offline, each part
    gets a folder of its own and `wandb sync` joins them); a job started over begins a new run."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed; `wandb sync` uploads later
    id_file = job.job_dir / WANDB_ID
    run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else uuid.uuid4().hex[:8]
    with atomic_path(id_file) as temporary:
        temporary.write_text(run_id)
    return wandb.init(project=config.wandb_project, name=job.name, dir=str(job.job_dir), config=vars(config),
                      id=run_id, resume="allow")


class TF32:
    """Reusable context: float32 matmuls and convolutions on TF32 tensor cores (`enabled`) or in full float32
    inside it. PyTorch's switches are process-wide; they are set on entry and restored on exit, so that paths
    of different precision can take turns in one process (m3dt/bench.py)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: list[tuple[bool, bool]] = []

    def __enter__(self) -> "TF32":
        self.saved.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exception) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved.pop()


class Precision:
    """The arithmetic of the forward passes run inside it (`with Precision(device, "tf32"): ...`), reusable:
    - fp32: float32 matmuls in full precision (TF32 off, PyTorch's default for matmuls);
    - tf32: float32 tensors, matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, float32
      accumulation; NVIDIA Ampere and later; on a CPU the same as fp32);
    - bf16: autocast to bfloat16 (matmuls in bf16; what autocast keeps in float32, such as layer norms, in
      float32; the loss in float32).
    A backward pass runs in `.matmuls` (the TF32 switch alone: autocast covers forwards only, and the
    backward of an autocast forward follows its dtypes by itself)."""

    def __init__(self, device: torch.device, precision: str):
        self.precision = precision
        self.matmuls = TF32(precision == "tf32")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def __enter__(self) -> "Precision":
        self.matmuls.__enter__()
        self.autocast.__enter__()
        return self

    def __exit__(self, *exception) -> None:
        self.autocast.__exit__(*exception)
        self.matmuls.__exit__(*exception)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """`--deterministic` on a GPU: PyTorch's deterministic kernels wherever it has them (an error where it
    has none), e.g. for the attention backward and the embedding gradient; cuBLAS then needs a fixed
    workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts, so set before the first matmul). On a CPU
    every kernel this project uses is deterministic already (resumed runs are tested bit for bit), and
    PyTorch's deterministic mode would only slow it down, so there it changes nothing."""
    if not enabled or device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def train_step(model: Callable[[Batch], torch.Tensor], batch: Batch, groups: int, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR, parameters: list[nn.Parameter], max_norm: float,
               per_expert_clip: bool, precision: Precision, hooks: TrainingHooks = TrainingHooks(),
               task_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on one batch of the tasks `task_indices` (one per row group), its forward in
    `precision`. Returns the loss and the largest gradient norm (before clipping), left on the device so
    that the loop never waits for it."""
    hooks.before_forward(task_indices)
    with precision:
        predicted = model(batch)
    loss = action_loss(predicted.float(), batch, groups)
    optimizer.zero_grad(set_to_none=True)
    with precision.matmuls:
        loss.backward()
    grad_norms = clip_gradients(parameters, max_norm, per_expert_clip)
    hooks.before_update()
    optimizer.step()
    hooks.after_update()
    scheduler.step()
    return loss.detach(), grad_norms.detach().max()  # max propagates NaN


def train(job: Job, sampler: DeviceSampler, config: Config, distributed: Distributed = Distributed()) -> int:
    """Run (or resume) `job` to `job.steps` steps; return the steps done. Trainable weights are updated in
    place in `job.model`; the caller writes the artifacts (on rank 0). ArtifactError, before the first step,
    when the job's folder is a file or cannot be made, or when another process trains the same job or one of
    its `locks` (rank 0 holds them: the job's folder's lock file and the job's own)."""
    make_folder(job.job_dir, f"folder of {job.name}")  # found at the first save, the steps before it would be lost
    locks = [job.job_dir / LOCK_FILE, *job.locks] if distributed.is_main else []
    with exclusive_locks(locks, job.name):
        return train_job(job, sampler, config, distributed)


def train_job(job: Job, sampler: DeviceSampler, config: Config, distributed: Distributed) -> int:
    """train()'s loop, run while the job's locks are held."""
    device = sampler.device
    parameters = list(job.trainable.values())
    optimizer = build_optimizer(parameters, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(config.warmup_steps))
    # The round-robin lives with the data, so that choosing a step's tasks never waits for the device.
    table, lengths = round_robin_table(job.task_groups, sampler.data_device)
    groups = len(job.task_groups)
    group_index = torch.arange(groups, device=sampler.data_device)
    state_file = job.job_dir / TRAIN_STATE

    start = 0
    remove_stale_temporaries(state_file)
    if state_file.exists() and not config.restart:
        start = resume(state_file, job, optimizer, scheduler, sampler, distributed)
        print(f"[{job.name}] resuming from step {start} ({state_file})")
        if start > job.steps:  # an earlier, longer schedule's checkpoint: its weights are what there is
            print(f"[{job.name}] note: the checkpoint is at step {start}, past the {job.steps} steps asked for: "
                  f"written as it is ({start} steps); --restart trains {job.steps}")
    if distributed.is_main:
        truncate_jsonl(job.job_dir / METRICS, start)
    if start >= job.steps:
        return start
    if distributed.is_main:
        print(f"[{job.name}] training on {device} ({config.precision}), steps {start}..{job.steps}")
        if job.steps < config.warmup_steps:
            reached = 100 * job.steps / config.warmup_steps
            print(f"[{job.name}] note: {job.steps} steps end inside the {config.warmup_steps}-step warmup: the "
                  f"learning rate reaches only {reached:.2g}% of {config.learning_rate:g}")

    precision = Precision(device, config.precision)
    run = start_wandb(config, job, start) if config.wandb and distributed.is_main else None
    job.model.train()  # dropout on in every module, frozen ones included (as the reference)
    model = DistributedDataParallel(job.model) if distributed.world_size > 1 else job.model
    if config.compile != "none":  # the weights stay job.model's: checkpoints and artifacts are unchanged
        model = torch.compile(model, mode=config.compile)
    window_losses: list[torch.Tensor] = []
    window_grad_norms: list[torch.Tensor] = []  # a finite loss can still come with a NaN gradient
    window_start = time.perf_counter()
    # closed on an error too, so that the error message starts on a line of its own
    with tqdm(range(start, job.steps), desc=job.name, unit="step", initial=start, total=job.steps, dynamic_ncols=True,
              disable=not distributed.is_main) as progress, say_where_interrupted(job, progress, state_file, config.restart):
        for step in progress:
            task_indices = table[group_index, step % lengths]
            batch = sampler.sample(task_indices)
            loss, grad_norm = train_step(model, batch, groups, optimizer, scheduler, parameters, config.grad_clip,
                                         job.per_expert_clip, precision, job.hooks, task_indices)
            window_losses.append(loss)
            window_grad_norms.append(grad_norm)

            done = step + 1
            extra_metrics = job.hooks.after_step(done)
            if (done % config.log_every == 0 or done % config.save_every == 0 or done == job.steps
                    or extra_metrics):
                window = torch.stack([torch.stack(window_losses) / groups, torch.stack(window_grad_norms)])
                if distributed.world_size > 1:  # every rank sees the same numbers, so all stop together
                    dist.all_reduce(window)
                    window /= distributed.world_size
                losses, grad_norms = window.float().cpu()  # the one host sync of the window
                check_finite(losses, grad_norms, done - len(losses), job, table, lengths, distributed)
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "loss": losses.mean().item(), "lr": scheduler.get_last_lr()[0],
                          "steps_per_second": len(losses) / max(elapsed, 1e-9), **extra_metrics}
                if distributed.is_main:
                    append_jsonl(job.job_dir / METRICS, record)
                progress.set_postfix(action_mse=f"{record['loss']:.4f}")  # the window's mean training loss
                if run is not None:
                    run.log(record, step=done)
                window_losses, window_grad_norms, window_start = [], [], time.perf_counter()
            if done % config.save_every == 0 or done == job.steps:
                save_train_state(state_file, job, optimizer, scheduler, sampler, done, distributed)
    if run is not None:
        run.finish()
    return job.steps


@contextmanager
def say_where_interrupted(job: Job, progress: tqdm, state_file: Path, restart: bool) -> Iterator[None]:
    """Turn Ctrl-C into a KeyboardInterrupt that says at which step training stopped and from which
    checkpoint the same command resumes (m3dt/cli.py prints it as one line)."""
    try:
        yield
    except KeyboardInterrupt:
        saved = checkpoint_step(state_file)
        # the bar counts a step once the next begins, so a step just saved may not be counted yet
        where = f"[{job.name}] stopped at step {max(progress.n, saved or 0)} of {job.steps}"
        if saved is None:
            raise KeyboardInterrupt(f"{where}; no checkpoint yet (one every --save_every steps): rerunning the "
                                    "same command starts this stage over") from None
        again = "rerun it without --restart" if restart else "rerun the same command"  # --restart would start over
        raise KeyboardInterrupt(f"{where}; {again} to resume from step {saved} ({state_file})") from None


def checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at `path` (None: there is none), read without loading its tensors."""
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def check_finite(losses: torch.Tensor, grad_norms: torch.Tensor, first_step: int, job: Job, table: torch.Tensor,
                 lengths: torch.Tensor, distributed: Distributed) -> None:
    """Stop before a window with a non-finite loss or gradient (whose update made the weights NaN) is saved.
    Every save boundary is also a log boundary, so no checkpoint or artifact ever holds such weights."""
    finite_loss = torch.isfinite(losses)
    bad = (~(finite_loss & torch.isfinite(grad_norms))).nonzero()
    if len(bad) == 0:
        return
    index = int(bad[0])
    step = first_step + index
    what = "gradient" if finite_loss[index] else "loss"
    tasks = [job.task_names[int(table[group, step % int(lengths[group])])] for group in range(len(job.task_groups))]
    if distributed.world_size > 1:  # every rank sees the same reduced window, so every rank is here
        every_rank: list[list[str] | None] = [None] * distributed.world_size
        dist.all_gather_object(every_rank, tasks)
        tasks = [task for rank_tasks in every_rank for task in rank_tasks]
    last_good = job.job_dir / TRAIN_STATE
    pointer = f"last good checkpoint: {last_good}" if last_good.exists() else "no checkpoint was written yet"
    raise TrainingError(f"[{job.name}] non-finite {what} at step {step + 1} on task(s) {', '.join(tasks)}; "
                        f"nothing was written for this window; {pointer}")


def save_train_state(path: Path, job: Job, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LambdaLR, sampler: DeviceSampler, step: int,
                     distributed: Distributed) -> None:
    """Rank 0 writes the checkpoint, with every rank's RNG states (each resumes its own streams)."""
    rng_states = [rng_state(sampler)]
    if distributed.world_size > 1:
        rng_states = [None] * distributed.world_size
        dist.all_gather_object(rng_states, rng_state(sampler))
    if not distributed.is_main:
        return
    save_checkpoint(path, {
        "step": step,
        "identity": job.identity,
        "trainable": {name: parameter.detach().cpu() for name, parameter in job.trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "hooks": job.hooks.state_dict(),
    })


def identity_change(name: str, saved: Any, now: Any) -> str:
    """One part of a job's identity that differs from its checkpoint's, in words: an option with both values;
    for the model, the options that differ, with both values; the tasks, inputs and data by name."""
    label = IDENTITY_NAMES.get(name, f"--{name}")
    if name == "model" and isinstance(saved, dict) and isinstance(now, dict):
        options = [f"--{key} {saved.get(key)} -> {now.get(key)}" for key in sorted(set(saved) | set(now))
                   if saved.get(key) != now.get(key)]
        return f"{label} ({', '.join(options)})"
    if all(value is None or isinstance(value, (bool, int, float, str)) for value in (saved, now)):
        return f"{label} {saved} -> {now}"
    return label


def identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The parts of a job's identity (`now`) that differ from what a checkpoint or an artifact's manifest
    recorded (`saved`), in words (identity_change)."""
    changed = [name for name, value in now.items() if saved.get(name) != value]
    if "data" in changed and "data_statistics" in changed:  # other files have other statistics: say it once
        changed.remove("data_statistics")
    return [identity_change(name, saved.get(name), now[name]) for name in changed]


def resume(path: Path, job: Job, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
           sampler: DeviceSampler, distributed: Distributed) -> int:
    """Restore the model, optimiser, schedule and this rank's batch streams from the checkpoint at `path`
    and return the steps it had done. Raises ArtifactError naming what differs when the checkpoint was made
    with other settings or data (the job's identity)."""
    state = load_checkpoint(path)
    changed = identity_differences(state.get("identity", {}), job.identity)
    if changed:
        raise ArtifactError(f"{path}: checkpoint was made with other settings: {', '.join(changed)}; "
                            f"rerun with --restart to start over")
    check_rng_device(state["rng"][distributed.rank], sampler, path)
    with torch.no_grad():
        for name, parameter in job.trainable.items():
            if name not in state["trainable"] or state["trainable"][name].shape != parameter.shape:
                raise ArtifactError(f"{path}: checkpoint has no matching tensor '{name}'; rerun with --restart")
            parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"][distributed.rank], sampler)
    job.hooks.load_state_dict(state.get("hooks", {}))
    return int(state["step"])


def named_device(name: str) -> torch.device:
    """The torch device `--device` names ("auto": CUDA when visible, else the CPU), whether or not this
    machine has it (a plan made here may run elsewhere). Raises ConfigError for a name torch does not know."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None


def resolve_device(name: str) -> torch.device:
    """The torch device of `--device` (named_device), checked to be on this machine. Raises ConfigError for a
    name torch does not know or a CUDA device that is not there."""
    device = named_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible (use --device cpu or auto)")
    return device

"""The stages of M3DT, each reading what the previous one wrote into the run directory.

stage 1  train_backbone   all tasks, every parameter          -> stage1/backbone.safetensors
stage 2  group_tasks      stage-1 gradients or a random split  -> stage2/groups_{method}_{G}.json
stage 2  train_experts    expert i on its group, backbone frozen -> stage2/experts_{method}_{G}/expert_{i}
stage 3  train_router     routers only, over all tasks          -> stage3/{method}_{G}/moe.safetensors
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from m3dt import command_started, memory
from m3dt.cli import USER_ERRORS, exit_interrupted, exit_with_message
from m3dt.config import Config, ConfigError, parse_config
from m3dt.conflict import PLOT as CONFLICT_PLOT, GradientConflict, plot_conflict, spread_tasks
from m3dt.data import DeviceSampler, Prompts, TaskDataset, episode_lengths, files_fingerprint
from m3dt.envs import check_env
from m3dt.grouping import gradient_features, gradient_grouping, groups_to_json, random_grouping, task_gradients
from m3dt.model import PromptDecisionTransformer, build_model, set_up_stage
from m3dt.run import (ArtifactError, RunDir, check_inputs, check_model_fields, file_hash, input_hashes,
                      load_tensors, manifest_path, read_json, read_manifest, safetensors_damage, save_tensors,
                      write_json, write_manifest)
from m3dt.tasks import TaskError, check_timesteps, register_task_rows, resolve_tasks, use_task_table, user_task_rows
from m3dt.train import (METRICS, Distributed, Job, TrainingHooks, identity_differences, resolve_device,
                        set_deterministic, start_distributed, stop_distributed, train)



# ----------------------------------------------------------------------------------------------- helpers
def optimisation_identity(config: Config, tasks: list[str], world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (the step count may grow: the schedule is constant).
    The torchrun world size is part of it: it sets the effective batch (world_size x batch_size)."""
    names = ("seed", "batch_size", "learning_rate", "weight_decay", "warmup_steps", "grad_clip", "dropout",
             "precision", "top_k")
    return {"model": config.model_fields(), "tasks": tasks, "world_size": world_size,
            **{name: getattr(config, name) for name in names}}


def stage_identity(config: Config, tasks: list[str], run: RunDir, inputs: list[Path],
                   world_size: int = 1) -> dict[str, Any]:
    """The identity of a stage-2 or stage-3 artifact: its optimisation and the sha256 of the inputs it
    was trained over (backbone, group file, experts)."""
    return {**optimisation_identity(config, tasks, world_size), "inputs": input_hashes(inputs, run.root)}


def seed_rank(config: Config, distributed: Distributed) -> int:
    """Rank 0 uses the run seed, so a one-process run and rank 0 of a torchrun job draw the same streams."""
    return config.seed + 1000 * distributed.rank


def stage1_tasks(run: RunDir, config: Config) -> list[str]:
    """The stage-1 task list; an explicit --prefix_name/--tasks must agree with it."""
    manifest = read_manifest(run.backbone, "stage-1 backbone")
    check_model_fields(manifest, config.backbone_fields(), run.backbone)
    trained_seed = manifest.get("config", {}).get("seed", config.seed)
    if trained_seed != config.seed:  # a run directory holds one seed's stages: mixed, none would be reproducible
        raise ArtifactError(f"{run.backbone}: trained with --seed {trained_seed}, this stage has --seed {config.seed}; "
                            f"pass --seed {trained_seed}, or another --run_dir for seed {config.seed}")
    register_task_rows(manifest.get("user_tasks", []), str(run.backbone))  # the run's own tasks, if any
    tasks = manifest["tasks"]
    if config.prefix_name or config.tasks:
        asked = resolve_tasks(config.prefix_name, config.tasks, config.seed)
        if asked != tasks:
            raise ArtifactError(f"{run.backbone}: trained on {len(tasks)} tasks that differ from the {len(asked)} "
                                f"tasks asked for now (--prefix_name/--tasks)")
    return tasks


def load_backbone(run: RunDir, config: Config) -> PromptDecisionTransformer:
    """The stage-1 Prompt-DT of `run` (stage1/backbone.safetensors) in a model built from `config`, on the
    CPU. Raises ArtifactError, naming the file, when it is missing, unreadable or of another shape."""
    model = build_model(config, config.dropout)
    state = load_tensors(run.backbone, "stage-1 backbone")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ArtifactError(f"{run.backbone}: does not fit the model ({str(error).splitlines()[0]})") from None
    return model


def make_sampler(config: Config, tasks: list[str], device: torch.device, streams: list[int],
                 model: PromptDecisionTransformer, run: RunDir | None = None,
                 optimizer: bool = True) -> tuple[DeviceSampler, dict[str, str]]:
    """Plan the stage's peak memory and print it before reading the data (m3dt/memory.py), put the data
    where `--data_device` says, then load `tasks` from --data_path. `model`: the stage's model as it will
    train (experts installed, frozen parts frozen), on any device; one row group per stream; `optimizer`
    False for a stage that only computes gradients (the grouping: no AdamW moments). Returns the sampler and
    the per-task statistics fingerprints; with `run` (stages after stage 1), they must equal what stage 1
    recorded."""
    check_timesteps(config.max_timestep, tasks)
    workers = os.cpu_count() if config.workers is None else config.workers
    lengths = episode_lengths(config.data_path, tasks, config.max_episodes, workers)
    data = memory.dataset_bytes(sum(map(sum, lengths)), sum(map(len, lengths)), len(tasks), config.prompt_length)
    groups = len(streams)
    plan = memory.plan_training(model, config.batch_size * groups, groups, config.context_length,
                                config.prompt_length, data)
    if not optimizer:
        plan = dataclasses.replace(plan, optimizer=0)
    free, capacity = memory.free_memory(device)
    data_device = memory.data_device(config.data_device, device, plan, free)
    if data_device != device:
        plan = dataclasses.replace(plan, data=0)
    # under torchrun every rank plans and loads its own share of the tasks, so each line says whose it is
    rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
    print(rank + plan.describe(free, capacity, device))
    if data_device != device:
        print(f"{rank}the dataset ({data / memory.GIB:.2f} GiB) stays in host memory (--data_device "
              f"{config.data_device}); batches are gathered there and copied to the device")
    dataset = TaskDataset(config.data_path, tasks, config.max_episodes, config.prompt_length, workers, lengths)
    print(f"{rank}loaded {len(tasks)} tasks, {len(dataset.returns_to_go):,} transitions ({dataset.nbytes() / memory.GIB:.2f} GiB) "
          f"from {config.data_path}")
    statistics = dataset.statistics_fingerprints()
    if run is not None:
        compare_with_stage1(run, config, "statistics", statistics, f"the files under --data_path {config.data_path} "
                            "hold other episodes (other state statistics or prompts)")
    return DeviceSampler(dataset, config.context_length, config.batch_size, device, streams, data_device), statistics


def data_files(config: Config, tasks: list[str], run: RunDir | None = None) -> dict[str, str]:
    """The fingerprint of the episode files of `tasks` that --data_path and --max_episodes select (cheap:
    names and sizes); with `run` (stages after stage 1), it must equal what stage 1 recorded."""
    found = files_fingerprint(config.data_path, tasks, config.max_episodes)
    if run is not None:
        compare_with_stage1(run, config, "files", found, f"--data_path {config.data_path} with --max_episodes "
                            f"{config.max_episodes} selects other episode files")
    return found


def compare_with_stage1(run: RunDir, config: Config, kind: str, found: dict[str, str], what: str) -> None:
    """Stages 2 and 3 train on the data stage 1 trained on (its statistics drive evaluation too): ArtifactError
    saying what differs, and whether the options or the data behind the same options changed."""
    manifest = read_json(manifest_path(run.backbone), "manifest of the stage-1 backbone")
    recorded = manifest.get("data")
    if recorded is None:
        print(f"note: {manifest_path(run.backbone)} records no data fingerprint (written by an older version); "
              "the data is not compared with stage 1's")
        return
    stage1 = manifest.get("config", {})
    if (stage1.get("data_path"), stage1.get("max_episodes")) == (config.data_path, config.max_episodes):
        advice = ("stage 1 was given the same --data_path and --max_episodes, so the data there changed since: "
                  "restore it, or train again from stage 1 (--restart)")
    else:
        advice = "give the --data_path and --max_episodes stage 1 used"
    for task, digest in found.items():
        if recorded[kind].get(task) != digest:
            raise ArtifactError(f"{run.backbone}: stage 1 trained on other data for {task}: {what}; {advice}")


def recorded_config(config: Config, device: torch.device | None) -> dict[str, Any]:
    """The options as manifests record them: the router widths and the device resolved (None: the stage
    used no device)."""
    return {**vars(config), **config.model_fields(), "device": None if device is None else str(device)}


def finished(artifact: Path, steps: int, config: Config, identity: dict[str, Any]) -> int | None:
    """The steps `artifact` holds when it was already trained for at least `steps` steps with this configuration;
    None otherwise (fewer steps: the same schedule continues; --restart). ArtifactError, without --restart, when
    it was trained with other settings: a finished artifact is never replaced unasked (what was trained on it
    would no longer fit)."""
    if config.restart or not artifact.exists() or not manifest_path(artifact).exists():
        return None
    damage = safetensors_damage(artifact)
    if damage:  # not finished: the training resumes from its checkpoint, at its last step, and writes it again
        print(f"{artifact}: damaged ({damage}); writing it again")
        return None
    manifest = read_json(manifest_path(artifact), "manifest")
    changed = identity_differences(manifest.get("identity") or {}, identity)
    if changed:
        raise ArtifactError(f"{artifact}: made with other settings: {', '.join(changed)}; --restart replaces it "
                            "(what was trained on it would then be refused), or use another --run_dir")
    done = manifest.get("steps_done", 0)
    return done if done >= steps else None


def start_over(artifacts: list[Path], is_main: bool = True) -> None:
    """--restart: the artifacts a training replaces are removed as it starts (after every check passed; by the
    main process of a torchrun job), so that a restart cut short is resumed by the command without --restart,
    not taken for the run it replaces."""
    removed = [artifact for artifact in artifacts if artifact.exists()]
    if not is_main or not removed:
        return
    for artifact in removed:
        artifact.unlink()
        manifest_path(artifact).unlink(missing_ok=True)
    print(f"--restart: removed {len(removed)} earlier artifact(s) ({removed[0]}{', ...' if len(removed) > 1 else ''})")


def read_groups(run: RunDir, config: Config, tasks: list[str]) -> tuple[Path, list[list[str]]]:
    """The grouping chosen by --grouping/--expert_num, validated against the stage-1 task list."""
    path = run.groups(config.grouping, config.expert_num)
    if not path.exists():
        raise ArtifactError(f"{path}: group file does not exist (run stage2_task_grouping_{config.grouping}.py "
                            f"--group_num {config.expert_num} first)")
    return path, check_groups(path, read_json(path, "group file"), config.expert_num, tasks)


def check_groups(path: Path, content: Any, group_count: int, tasks: list[str]) -> list[list[str]]:
    """The groups of a group file's `content` ({"expert_0": [task, ...], ...}) in expert order, checked to
    split `tasks` into `group_count` non-empty groups."""
    expected_keys = [f"expert_{index}" for index in range(group_count)]
    if not isinstance(content, dict) or sorted(content) != sorted(expected_keys):
        raise ArtifactError(f"{path}: expected keys expert_0..expert_{group_count - 1}")
    groups = [content[key] for key in expected_keys]
    seen: set[str] = set()
    for key, group in zip(expected_keys, groups):
        if not isinstance(group, list) or not group:
            raise ArtifactError(f"{path}: group {key} is empty or not a list")
        for task in group:
            if task not in tasks:
                raise ArtifactError(f"{path}: group {key} has task '{task}', which stage 1 did not train on")
            if task in seen:
                raise ArtifactError(f"{path}: task '{task}' appears in more than one group")
            seen.add(task)
    missing = [task for task in tasks if task not in seen]
    if missing:
        raise ArtifactError(f"{path}: {len(missing)} task(s) in no group, e.g. {missing[0]}")
    return groups


def shard_experts(shard: str | None, num_experts: int) -> list[int]:
    """The experts of `--shard i/n` (experts i, i+n, i+2n, ...), or all of them without a shard."""
    if shard is None:
        return list(range(num_experts))
    index, count = (int(part) for part in shard.split("/"))  # the format was checked with the options
    experts = list(range(index, num_experts, count))
    if not experts:
        raise ConfigError(f"--shard {shard}: no expert of {num_experts} falls in this shard")
    return experts


def expert_seed(config: Config, expert_id: int) -> int:
    """The seed of expert `expert_id`'s initial weights and batch stream: distinct per expert and run seed,
    and the same whether the expert trains alone, in an `--all` process or in one of its shards."""
    return config.seed * 1000 + expert_id + 1


def expert_tensors(model: PromptDecisionTransformer, slot: int) -> dict[str, torch.Tensor]:
    """Expert `slot` of every block, as tensors with a leading expert dim of 1."""
    return {f"blocks.{layer}.{name}": parameter[slot : slot + 1]
            for layer, block in enumerate(model.blocks)
            for name, parameter in block.expert_mixture.experts.named_parameters()}


# ----------------------------------------------------------------------------------------------- stages
def train_backbone(config: Config) -> Path:
    """Stage 1 (README, "The MT160 pipeline"): train the whole Prompt-DT on every task, round-robin over tasks, for
    `backbone_steps`; under torchrun each rank trains its share of the tasks. Resumes a killed run from its
    last checkpoint, returns at once when the same stage already finished. Returns the backbone's path."""
    run = RunDir(config.resolved_run_dir())
    tasks = resolve_tasks(config.prefix_name, config.tasks, config.seed)
    steps = config.stage_steps(config.backbone_steps)
    distributed, device = start_distributed(config.device)
    files = data_files(config, tasks)
    identity = {**optimisation_identity(config, tasks, distributed.world_size), "data": files}
    done = finished(run.backbone, steps, config, identity)
    if done is not None:
        print(f"stage 1 already finished ({done} steps): {run.backbone}; --restart to train again")
        return run.backbone
    if config.restart:
        start_over([run.backbone], distributed.is_main)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, config.dropout)
    share = rank_share(tasks, distributed)
    sampler, share_statistics = make_sampler(config, share, device, [seed_rank(config, distributed)], model)
    statistics = gather_statistics(share_statistics, distributed)  # every task's, on every rank
    model.to(device)
    torch.manual_seed(seed_rank(config, distributed))  # each rank its own dropout stream
    # a checkpoint resumes only on the same data: the same files, and (known once loaded) the same contents
    hooks = TrainingHooks()
    if config.conflict_every:  # tasks spread over the whole list; under torchrun the ranks gather them
        hooks = GradientConflict(model, sampler, spread_tasks(len(tasks), config.conflict_tasks),
                                 config.conflict_every, config.conflict_batches, config.grad_clip, config.seed,
                                 distributed)
    job = Job(name="stage1", model=model, trainable=set_up_stage(model, stage=1),
              task_groups=[list(range(len(share)))], task_names=share, steps=steps, job_dir=run.stage1,
              per_expert_clip=False, identity={**identity, "data_statistics": statistics}, hooks=hooks)
    done = train(job, sampler, config, distributed)
    stats = gather_shares(data_stats(sampler.state_mean, sampler.state_std, sampler.prompts), len(tasks), distributed)
    if not distributed.is_main:
        return run.backbone
    if plot_conflict(run.stage1 / METRICS, run.stage1 / CONFLICT_PLOT):
        print(f"stage 1: gradient conflict curve in {run.stage1 / CONFLICT_PLOT}")
    save_tensors(run.data_stats, stats)
    save_tensors(run.backbone, model.state_dict())
    write_manifest(run.backbone, "stage1", recorded_config(config, device), tasks, [], run.root, steps_done=done,
                   identity=identity, data={"files": files, "statistics": statistics},
                   data_stats_sha256=file_hash(run.data_stats), user_tasks=user_task_rows(tasks))
    print(f"stage 1: wrote {run.backbone}")
    return run.backbone


def rank_share(tasks: list[str], distributed: Distributed) -> list[str]:
    """The tasks this torchrun rank loads and trains: every world_size-th from its rank on (all of them in
    one process), so that a rank holds about 1/world_size of the data (m3dt/train.py: the order of tasks)."""
    if len(tasks) < distributed.world_size:
        raise ConfigError(f"{len(tasks)} tasks for {distributed.world_size} torchrun ranks: each rank needs a task")
    return tasks[distributed.rank :: distributed.world_size]


def gather_shares(tensors: dict[str, torch.Tensor], count: int, distributed: Distributed) -> dict[str, torch.Tensor]:
    """Per-task tensors of every rank's share (rank_share), put back in task-list order (`count` tasks)."""
    if distributed.world_size == 1:
        return tensors
    shares: list[dict[str, torch.Tensor] | None] = [None] * distributed.world_size
    dist.all_gather_object(shares, {name: tensor.cpu() for name, tensor in tensors.items()})
    world = distributed.world_size
    return {name: torch.stack([shares[task % world][name][task // world] for task in range(count)])
            for name in tensors}


def gather_statistics(share_statistics: dict[str, str], distributed: Distributed) -> dict[str, str]:
    """Every rank's per-task statistics fingerprints, so that all ranks hold the same identity."""
    if distributed.world_size == 1:
        return share_statistics
    shares: list[dict[str, str] | None] = [None] * distributed.world_size
    dist.all_gather_object(shares, share_statistics)
    return {task: digest for share in shares for task, digest in share.items()}


def data_stats(state_mean: torch.Tensor, state_std: torch.Tensor, prompts: Prompts) -> dict[str, torch.Tensor]:
    """What evaluation needs from the data, in the order of the tasks given: state statistics (tasks, 39) and
    the eval prompt (the higher-return one, index 1)."""
    return {
        "state_mean": state_mean, "state_std": state_std,
        "prompt_states": prompts.states[:, 1], "prompt_actions": prompts.actions[:, 1],
        "prompt_returns_to_go": prompts.returns_to_go[:, 1], "prompt_timesteps": prompts.timesteps[:, 1],
        "prompt_mask": prompts.mask[:, 1],
    }


def group_tasks(config: Config, method: str) -> Path:
    """Stage 2's task grouping into `group_num` groups: `method` "gradient" clusters the stage-1 backbone's
    per-task gradients, "random" splits the tasks at random with the run's seed. Returns the groups file
    (stage2/groups_{method}_{G}.json). Raises ConfigError when there are more groups than tasks."""
    run = RunDir(config.resolved_run_dir())
    tasks = stage1_tasks(run, config)
    run.make(run.stage2)  # before the gradients are computed, not when their groups are written
    if config.group_num > len(tasks):
        raise ConfigError(f"--group_num {config.group_num} is more groups than the {len(tasks)} stage-1 tasks")
    path = run.groups(method, config.group_num)
    identity = grouping_identity(config, method, tasks, run)
    if finished(path, 0, config, identity) is not None:
        print(f"stage 2 grouping ({method}) already finished: {path}; --restart to group again")
        return path
    extra, device = {}, None
    if method == "random":
        groups = random_grouping(len(tasks), config.group_num, config.seed)
    else:
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        model = load_backbone(run, config)
        sampler, _ = make_sampler(config, tasks, device, [config.seed], model, run, optimizer=False)
        model.to(device)
        print(f"task gradients on {device}")
        gradients = task_gradients(model, sampler, list(range(len(tasks))), config.grouping_gradients, config.grad_clip)
        features = gradient_features(gradients)
        extra["feature_max_abs"] = float(features.abs().max())
        grouping = gradient_grouping(features, config.group_num, config.seed, config.kmeans_restarts,
                                     config.kmeans_repeats, config.kmeans_iterations, config.kmeans_tolerance,
                                     config.kmeans_stop)
        groups, steps = grouping.groups, np.array(grouping.lloyd_steps)
        extra["kmeans_lloyd_steps"] = {"min": int(steps.min()), "median": float(np.median(steps)),
                                       "max": int(steps.max()), "runs": len(steps)}
        print(f"gradient features: {features.shape[0]} tasks x {features.shape[1]:,} coordinates, largest |value| "
              f"{extra['feature_max_abs']:.3g}; k-means ({config.kmeans_stop} stop, tolerance "
              f"{config.kmeans_tolerance:g}): Lloyd steps per run min {steps.min()}, median {np.median(steps):g}, "
              f"max {steps.max()} over {len(steps)} runs")
    write_json(path, groups_to_json(groups, tasks))
    write_manifest(path, f"stage2_grouping_{method}", recorded_config(config, device), tasks, [run.backbone],
                   run.root, method=method, group_num=config.group_num, identity=identity, **extra)
    sizes = [len(group) for group in groups]
    print(f"stage 2 grouping ({method}): {len(groups)} groups of {min(sizes)}..{max(sizes)} tasks; wrote {path}")
    return path


def grouping_identity(config: Config, method: str, tasks: list[str], run: RunDir) -> dict[str, Any]:
    """What a group file depends on: the method, group count and seed, the gradient method's options, the
    backbone it read and the episode files (which must be stage 1's; the random split reads neither)."""
    identity: dict[str, Any] = {"method": method, "group_num": config.group_num, "seed": config.seed, "tasks": tasks}
    if method == "gradient":
        names = ("grouping_gradients", "kmeans_restarts", "kmeans_repeats", "kmeans_iterations", "kmeans_tolerance",
                 "kmeans_stop", "batch_size", "grad_clip", "dropout")
        identity.update({name: getattr(config, name) for name in names})
        identity["inputs"] = input_hashes([run.backbone], run.root)
        identity["data"] = data_files(config, tasks, run)
    return identity


def train_experts(config: Config) -> list[Path]:
    """`--expert_id i` trains expert i; `--all` trains every expert of the grouping in one process."""
    run = RunDir(config.resolved_run_dir())
    tasks = stage1_tasks(run, config)
    groups_file, groups = read_groups(run, config, tasks)
    if config.all == (config.expert_id is not None):
        raise ConfigError("give exactly one of --expert_id I or --all")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("expert training does not run under torchrun: stage2_expert_train_total.sh spreads "
                          "experts over the GPUs")
    expert_ids = shard_experts(config.shard, len(groups)) if config.all else [config.expert_id]
    if not 0 <= expert_ids[0] < len(groups) or expert_ids[-1] >= len(groups):
        raise ConfigError(f"--expert_id must be in 0..{len(groups) - 1} for {groups_file}")
    steps = config.stage_steps(config.expert_steps)
    identity = stage_identity(config, tasks, run, [run.backbone, groups_file])
    outputs = [run.expert(config.grouping, config.expert_num, expert) for expert in expert_ids]
    group_tasks_needed = [task for expert in expert_ids for task in groups[expert]]
    data_files(config, group_tasks_needed, run)
    done = [finished(output, steps, config, identity) for output in outputs]
    if None not in done:
        counts = "/".join(map(str, sorted(set(done))))
        print(f"stage 2 experts {expert_ids} already finished ({counts} steps); --restart to train again")
        return outputs
    again = [expert for expert, expert_done in zip(expert_ids, done) if expert_done is not None]
    if again:  # one job trains its experts together: those finished alone are trained again
        print(f"note: experts {again} are already finished; this job trains them again with the others and replaces "
              "them (train the others alone with --expert_id to keep them)")
    if config.restart:
        start_over(outputs)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = load_backbone(run, config)
    trainable = set_up_stage(model, stage=2, num_experts=len(expert_ids),
                             seeds=[expert_seed(config, expert) for expert in expert_ids])
    sampler, _ = make_sampler(config, group_tasks_needed, device,
                              [expert_seed(config, expert) for expert in expert_ids], model, run)
    model.to(device)
    task_groups, offset = [], 0
    for expert in expert_ids:
        task_groups.append(list(range(offset, offset + len(groups[expert]))))
        offset += len(groups[expert])
    if config.all:
        job_name = "all" if config.shard is None else "shard_" + config.shard.replace("/", "_of_")
    else:
        job_name = f"expert_{config.expert_id}"
    job = Job(name=f"stage2 {job_name}", model=model, trainable=trainable, task_groups=task_groups,
              task_names=group_tasks_needed, steps=steps,
              job_dir=run.expert_job(config.grouping, config.expert_num, job_name), per_expert_clip=True,
              identity={**identity, "experts": expert_ids},
              locks=[output.with_suffix(".lock") for output in outputs])  # --expert_id, --all and shards alike
    done = train(job, sampler, config)
    for slot, (expert, output) in enumerate(zip(expert_ids, outputs)):
        save_tensors(output, expert_tensors(model, slot))
        write_manifest(output, "stage2_expert", recorded_config(config, device), groups[expert],
                       [run.backbone, groups_file], run.root, expert_id=expert, steps_done=done, identity=identity)
    print(f"stage 2: wrote {len(outputs)} expert(s) to {outputs[0].parent}")
    return outputs


def train_router(config: Config) -> Path:
    """Stage 3: load the backbone and every expert of the grouping, then train only the routers on all
    tasks for `router_steps` (torchrun shares the tasks among ranks). Resumes and skips like stage 1.
    Returns the mixture's path (stage3/{grouping}_{G}/moe.safetensors)."""
    run = RunDir(config.resolved_run_dir())
    tasks = stage1_tasks(run, config)
    groups_file, groups = read_groups(run, config, tasks)
    output = run.moe(config.grouping, config.expert_num)
    steps = config.stage_steps(config.router_steps)
    data_files(config, tasks, run)
    expert_files = [run.expert(config.grouping, config.expert_num, expert) for expert in range(len(groups))]
    check_experts(run, expert_files, groups_file, config)
    inputs = [run.backbone, groups_file, *expert_files]
    distributed, device = start_distributed(config.device)
    identity = stage_identity(config, tasks, run, inputs, distributed.world_size)
    done = finished(output, steps, config, identity)
    if done is not None:
        print(f"stage 3 already finished ({done} steps): {output}; --restart to train again")
        return output
    if config.restart:
        start_over([output], distributed.is_main)

    torch.manual_seed(config.seed)  # the routers' initial weights, the same on every rank
    model = load_backbone(run, config)
    trainable = set_up_stage(model, stage=3, num_experts=len(groups), top_k=config.top_k)
    load_experts(model, expert_files)
    share = rank_share(tasks, distributed)
    sampler, _ = make_sampler(config, share, device, [seed_rank(config, distributed)], model, run)
    model.to(device)
    torch.manual_seed(seed_rank(config, distributed))  # each rank its own dropout stream
    job = Job(name="stage3 router", model=model, trainable=trainable, task_groups=[list(range(len(share)))],
              task_names=share, steps=steps, job_dir=run.stage3(config.grouping, config.expert_num),
              per_expert_clip=False, identity=identity)
    done = train(job, sampler, config, distributed)
    if not distributed.is_main:
        return output
    save_tensors(output, model.state_dict())
    write_manifest(output, "stage3", recorded_config(config, device), tasks, inputs, run.root, steps_done=done,
                   identity=identity, num_experts=len(groups), top_k=config.top_k)
    print(f"stage 3: wrote {output}")
    return output


def check_experts(run: RunDir, files: list[Path], groups_file: Path, config: Config) -> None:
    """Every expert exists, has this run's model configuration, and was trained on this run's backbone and
    grouping (an expert left from before stage 1 or the grouping was redone would not fit)."""
    expected_inputs = input_hashes([run.backbone, groups_file], run.root)
    for slot, path in enumerate(files):
        manifest = read_manifest(path, f"expert {slot}")
        check_model_fields(manifest, config.backbone_fields(), path)
        check_inputs(manifest, expected_inputs, path)


def load_experts(model: PromptDecisionTransformer, files: list[Path]) -> None:
    """Stack the experts' weights (checked by check_experts) into the routed mixture."""
    with torch.no_grad():
        for slot, path in enumerate(files):
            tensors = load_tensors(path, f"expert {slot}")
            for layer, block in enumerate(model.blocks):
                for name, parameter in block.expert_mixture.experts.named_parameters():
                    key = f"blocks.{layer}.{name}"
                    if key not in tensors or tensors[key].shape != parameter[slot : slot + 1].shape:
                        raise ArtifactError(f"{path}: missing or misshapen tensor '{key}'")
                    parameter[slot : slot + 1].copy_(tensors[key])


# ----------------------------------------------------------------------------------------------- CLI
def use_task_table_checked(config: Config) -> None:
    """--task_table: register the user's tasks, then build the env of each of them the run trains on before
    anything trains (check_env): TaskError naming the file; one line says which could not be checked here.
    A later stage without --prefix_name/--tasks takes its tasks from stage 1's manifest: all the table's
    tasks are checked then."""
    table_tasks = use_task_table(config.task_table)
    run_tasks = ({task.name for task in table_tasks} if config.prefix_name is None and config.tasks is None
                 else resolve_tasks(config.prefix_name, config.tasks, config.seed))
    unchecked = []
    for task in table_tasks:
        try:
            if task.name in run_tasks and not check_env(task):
                unchecked.append(task.name)
        except TaskError as error:
            raise TaskError(f"{config.task_table}: {error}") from None
    if unchecked:
        print(f"task table: the envs of {', '.join(unchecked)} are not checked here (their simulator is not "
              "installed); the evaluation builds them")


def run_cli(stage: Callable[[Config], Any], description: str, argv: list[str] | None = None) -> None:
    """Parse options, run `stage`, and turn bad input and Ctrl-C into one clear line (tracebacks with --debug)."""
    command_started()
    arguments = sys.argv[1:] if argv is None else argv
    debug = "--debug" in arguments  # until the options are parsed; then --debug from the YAML file counts too
    try:
        config = parse_config(description, arguments)
        debug = config.debug
        set_deterministic(config.deterministic, resolve_device(config.device))
        if config.task_table:
            use_task_table_checked(config)
        stage(config)
        stop_distributed()
    except USER_ERRORS as error:
        exit_with_message(error, debug)
    except KeyboardInterrupt as interrupt:
        exit_interrupted(interrupt, debug)

"""The paper's comparison methods and ablations, trained by the stages' loop (m3dt/train.py) on the same
data layer, into the same run directory, and evaluated by the same evaluator:

    python -m m3dt.baselines --method mtdt|harmodt|m3dt-end2end|m3dt-no-grouping [any option of the stages]
    python -m m3dt.evaluate --run_dir R --method NAME

Each method is one module saying what it trains and what it freezes:

    mtdt               m3dt/baselines/mtdt.py              Prompt-DT's backbone without prompt
    harmodt            m3dt/baselines/harmodt.py           a shared DT with a learned mask per task
    m3dt-end2end       m3dt/baselines/m3dt_end2end.py      M3DT without the three-stage training
    m3dt-no-grouping   m3dt/baselines/m3dt_no_grouping.py  M3DT without task grouping (no stage 2)

A method module defines NAME (the display name in results), `steps(config)` (its schedule),
`build(config, run)` (the model and its trainable parameters), `policy(config, manifest, tensors)` (the
evaluated model from its artifact) and, where it needs them, USES_BACKBONE (it starts from the stage-1
backbone), HYPERPARAMETERS (its own options, part of a checkpoint's identity), DISTRIBUTED (runs under
torchrun), `hooks(model, sampler, config, steps)` (what it adds to the loop's step) and
`artifact_tensors(hooks)` (what it saves beside the weights). Everything else, the sampler, the loop,
resume, the artifact `{run_dir}/baselines/{method}/model.safetensors` with its manifest and
`data_stats.safetensors` (what evaluation needs from the data), is shared below; the manifest records the
rows of the run's own tasks (README "Your own tasks"), so that evaluation needs no --task_table.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from m3dt.config import Config, ConfigError
from m3dt.model import PromptDecisionTransformer, build_model
from m3dt.run import ArtifactError, RunDir, file_hash, load_tensors, read_manifest, save_tensors, write_manifest
from m3dt.stages import (data_files, data_stats, finished, gather_shares, gather_statistics, make_sampler,
                         rank_share, recorded_config, seed_rank, stage1_tasks, stage_identity, start_over)
from m3dt.tasks import resolve_tasks, user_task_rows
from m3dt.train import Job, TrainingHooks, start_distributed, train


METHODS = ("mtdt", "harmodt", "m3dt-end2end", "m3dt-no-grouping")


def method_module(method_id: str) -> ModuleType:
    """The module of a --method value (m3dt-end2end -> m3dt/baselines/m3dt_end2end.py)."""
    return importlib.import_module(f"m3dt.baselines.{method_id.replace('-', '_')}")


def train_baseline(config: Config, method_id: str) -> Path:
    """Train (or resume, or find finished) `method_id` into {run_dir}/baselines/{method_id}/; return the artifact."""
    method = method_module(method_id)
    run = RunDir(config.resolved_run_dir())
    uses_backbone = getattr(method, "USES_BACKBONE", False)
    if uses_backbone:
        tasks = stage1_tasks(run, config)
    else:
        tasks = resolve_tasks(config.prefix_name, config.tasks, config.seed)
    inputs = [run.backbone] if uses_backbone else []
    steps = config.stage_steps(method.steps(config))
    distributed, device = start_distributed(config.device)
    if distributed.world_size > 1 and not getattr(method, "DISTRIBUTED", True):
        raise ConfigError(f"--method {method_id} does not run under torchrun (one process)")
    hyperparameters = {name: getattr(config, name) for name in getattr(method, "HYPERPARAMETERS", ())}
    files = data_files(config, tasks, run if uses_backbone else None)
    identity = {**stage_identity(config, tasks, run, inputs, distributed.world_size), "method": method_id,
                **hyperparameters, "data": files}
    output = run.baseline_model(method_id)
    done = finished(output, steps, config, identity)
    if done is not None:
        print(f"{method_id} already finished ({done} steps): {output}; --restart to train again")
        return output
    if config.restart:
        start_over([output], distributed.is_main)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, trainable = method.build(config, run)
    share = rank_share(tasks, distributed)  # under torchrun each rank loads and trains its share, as the stages
    sampler, share_statistics = make_sampler(config, share, device, [seed_rank(config, distributed)], model,
                                             run if uses_backbone else None)
    statistics = gather_statistics(share_statistics, distributed)
    model.to(device)
    torch.manual_seed(seed_rank(config, distributed))  # each rank its own dropout stream
    hooks = method.hooks(model, sampler, config, steps) if hasattr(method, "hooks") else TrainingHooks()
    job = Job(name=method_id, model=model, trainable=trainable, task_groups=[list(range(len(share)))],
              task_names=share, steps=steps, job_dir=run.baseline(method_id), per_expert_clip=False,
              identity={**identity, "data_statistics": statistics}, hooks=hooks)
    done = train(job, sampler, config, distributed)
    stats = gather_shares(data_stats(sampler.state_mean, sampler.state_std, sampler.prompts), len(tasks), distributed)
    if not distributed.is_main:
        return output
    save_tensors(run.baseline_data_stats(method_id), stats)
    extra = method.artifact_tensors(hooks) if hasattr(method, "artifact_tensors") else {}
    save_tensors(output, {**model.state_dict(), **extra})
    write_manifest(output, f"baseline_{method_id}", recorded_config(config, device), tasks, inputs, run.root,
                   method=method_id, steps_done=done, identity=identity, num_experts=experts_of(model),
                   top_k=config.top_k, data={"files": files, "statistics": statistics},
                   data_stats_sha256=file_hash(run.baseline_data_stats(method_id)), user_tasks=user_task_rows(tasks))
    print(f"{method_id}: wrote {output}")
    return output


def experts_of(model: PromptDecisionTransformer) -> int:
    """Experts per block of `model` (its first block's mixture; 0 without one), the manifest's num_experts."""
    mixture = model.blocks[0].expert_mixture
    return 0 if mixture is None else mixture.experts.num_experts


def load_baseline(run: RunDir, method_id: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The evaluated model of a trained method (dropout off, eval mode) and its manifest."""
    artifact = run.baseline_model(method_id)
    manifest = read_manifest(artifact, f"{method_id} model")
    tensors = load_tensors(artifact, f"{method_id} model")
    model = method_module(method_id).policy(manifest["config"], manifest, tensors)
    return model.eval(), manifest


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Load `tensors` (exactly the model's) into `model`; a mismatch names the manifest's artifact."""
    artifact = manifest["artifact"]
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise ArtifactError(f"{artifact}: does not fit the model its manifest describes "
                            f"({str(error).splitlines()[0]})") from None


def moe_model(fields: Config | dict[str, Any], dropout: float, num_experts: int, top_k: int,
              seeds: list[int] | None = None) -> PromptDecisionTransformer:
    """A Prompt-DT with a routed mixture of `num_experts` experts in every block (the M3DT architecture)."""
    model = build_model(fields, dropout)
    model.install_experts(num_experts, routed=True, top_k=top_k, seeds=seeds)
    return model


def moe_policy(fields: dict[str, Any], manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
               ) -> PromptDecisionTransformer:
    """The evaluated routed-MoE model of an M3DT ablation (dropout off, the manifest's num_experts and top_k) with
    the weights of `tensors`; raises ArtifactError when they do not fit."""
    model = moe_model(fields, 0.0, manifest["num_experts"], manifest["top_k"])
    load_weights(model, tensors, manifest)
    return model

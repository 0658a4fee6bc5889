"""M3DT without task grouping (the paper's ablation "w/o task grouping").

After stage 1, no stage 2: `--expert_num` fresh experts and the routers are installed over the frozen
stage-1 backbone (as stage 3 builds the model) and trained together on all tasks, one task per step
round-robin, for the steps stages 2 and 3 have after stage 1 (`--expert_steps + --router_steps`, 600k on
MT160, so that the whole run has M3DT's 1M steps). No expert ever sees a task group of its own: which
expert learns what is left to the routers. The authors' repository holds a compiled module for this
variant (`prompt_dt/__pycache__/prompt_decision_transformer_with_moe_both_training.cpython-38.pyc`):
unlike their main MoE model it leaves the experts trainable beside the routers, the backbone frozen
(README, "Comparison methods").

Trains: the experts and the routers of every block. Freezes: the stage-1 backbone.
"""

from __future__ import annotations

import torch

from m3dt.baselines import moe_policy
from m3dt.config import Config
from m3dt.model import PromptDecisionTransformer, set_trainable
from m3dt.run import RunDir
from m3dt.stages import expert_seed, load_backbone

NAME = "M3DT w/o grouping"
USES_BACKBONE = True
HYPERPARAMETERS = ("expert_num",)


def steps(config: Config) -> int:
    """The steps of stages 2 and 3 together: `--expert_steps + --router_steps`."""
    return config.expert_steps + config.router_steps


def build(config: Config, run: RunDir) -> tuple[PromptDecisionTransformer, dict[str, torch.nn.Parameter]]:
    """The run's stage-1 backbone with `--expert_num` fresh routed experts per block (seeded as stage 2's experts,
    `--top_k`); only the expert mixtures (experts and routers) trainable. Raises ArtifactError without a backbone."""
    model = load_backbone(run, config)
    seeds = [expert_seed(config, expert) for expert in range(config.expert_num)]
    model.install_experts(config.expert_num, routed=True, top_k=config.top_k, seeds=seeds)
    return model, set_trainable(model, ".expert_mixture.")


policy = moe_policy  # the evaluated model: routed experts as the manifest records them

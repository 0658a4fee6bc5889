"""M3DT without the three-stage training (the paper's ablation "w/o three-stage training").

The M3DT model (backbone, `--expert_num` experts in every block, a router per block, as stage 3 builds it)
trained end to end from scratch: every part at once, on all tasks, one task per step round-robin, for
the three stages' steps together (`--backbone_steps + --expert_steps + --router_steps`, 1M on MT160).
The authors' repository holds a compiled module for this variant (`prompt_dt/__pycache__/
prompt_decision_transformer_with_moe_end2end.cpython-38.pyc`): unlike their main MoE model it freezes
neither the backbone nor the experts and loads no trained experts (README, "Comparison methods").

Trains: everything (backbone, experts, routers). Freezes: nothing.
"""

from __future__ import annotations

import torch

from m3dt.baselines import moe_model, moe_policy
from m3dt.config import Config
from m3dt.model import PromptDecisionTransformer, set_trainable
from m3dt.run import RunDir
from m3dt.stages import expert_seed

NAME = "M3DT w/o three-stage"
HYPERPARAMETERS = ("expert_num",)


def steps(config: Config) -> int:
    """The three stages' steps together: `--backbone_steps + --expert_steps + --router_steps`."""
    return config.backbone_steps + config.expert_steps + config.router_steps


def build(config: Config, run: RunDir) -> tuple[PromptDecisionTransformer, dict[str, torch.nn.Parameter]]:
    """A fresh M3DT model (`--expert_num` routed experts per block, seeded as stage 2's experts, `--top_k`),
    every parameter trainable."""
    seeds = [expert_seed(config, expert) for expert in range(config.expert_num)]
    model = moe_model(config, config.dropout, config.expert_num, config.top_k, seeds)
    return model, set_trainable(model, "")


policy = moe_policy  # the evaluated model: routed experts as the manifest records them

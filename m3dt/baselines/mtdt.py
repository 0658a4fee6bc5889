"""MTDT: the multi-task Decision Transformer without prompt, a baseline of the paper's tables.

The same backbone as Prompt-DT (stage 1) and the same training (one task per step round-robin, AdamW,
warmup, clipping, the stage-1 schedule `--backbone_steps`), but the model has no prompt embeddings and
reads no prompt: its input is the task's trajectory segment only, so nothing tells it which task it is in
beyond the states themselves.

Trains: every parameter (embeddings, blocks, action head). Freezes: nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from m3dt.baselines import load_weights
from m3dt.config import Config
from m3dt.model import PromptDecisionTransformer
from m3dt.run import RunDir
from m3dt.model import build_model, set_trainable

NAME = "MTDT"


def steps(config: Config) -> int:
    """MTDT's schedule: stage 1's, `--backbone_steps` steps."""
    return config.backbone_steps


def build(config: Config, run: RunDir) -> tuple[PromptDecisionTransformer, dict[str, torch.nn.Parameter]]:
    """A fresh Prompt-DT without prompt embeddings, every parameter trainable."""
    model = build_model(config, config.dropout, prompt=False)
    return model, set_trainable(model, "")


def policy(fields: dict[str, Any], manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PromptDecisionTransformer:
    """The evaluated MTDT (no prompt embeddings, dropout off) with the weights of `tensors`; raises ArtifactError
    when they do not fit."""
    model = build_model(fields, dropout=0.0, prompt=False)
    load_weights(model, tensors, manifest)
    return model

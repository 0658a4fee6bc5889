"""Prompt-DT: a GPT-2 style decoder over (return-to-go, state, action) tokens, with a task prompt prepended.

Each block has a slot for an expert mixture (m3dt/moe.py). Stage 1 trains the plain backbone; stage 2
installs experts in assigned mode (one expert per row group); stage 3 installs all experts plus a router
per block. What follows the reference code and what is an option: the README's "Faithfulness, and
options that deviate"; the docstrings below give the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3dt.config import Config
from m3dt.data import Batch
from m3dt.kernels import Dropout, attention
from m3dt.moe import ExpertMixture
from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM

PADDING_SCORE = -1e4  # added to the attention scores of padded keys, as GPT-2 does


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape, the part of Config a checkpoint's weights depend on."""

    embed_dim: int = 256
    n_layer: int = 6
    n_head: int = 8
    dropout: float = 0.1
    max_timestep: int = 1000
    residual: str = "ln2"  # "ln2" (reference, once experts are installed) or "standard"
    router_hidden: tuple[int, ...] | None = None  # None: tied to embed_dim (4d, 4d, 4d, 2d), as the reference
    prompt: bool = True  # False: no prompt embeddings, prompt inputs ignored (MTDT, m3dt/baselines/mtdt.py)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (GPT-2's, as the reference's Prompt-DT) over (B, L, d) tokens."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.projection = nn.Linear(config.embed_dim, config.embed_dim)
        self.attention_dropout = config.dropout
        self.residual_dropout = Dropout(config.dropout)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, H, L, d / H)."""
        batch, _, width = x.shape
        return x.reshape(batch, -1, self.n_head, width // self.n_head).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the tokens x (B, L, d), each (B, H, L, d / H)."""
        _, key, value = self.qkv(x).split(x.shape[-1], dim=2)
        return self.heads(key), self.heads(value)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor, rows: slice = slice(None),
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Outputs at token positions `rows` of x only (all by default); keys and values come from every
        token of x, after the keys and values `past` of earlier tokens when given (a PromptCache's)."""
        batch, _, width = x.shape
        query, key, value = self.qkv(x).split(width, dim=2)
        query, key, value = self.heads(query[:, rows]), self.heads(key), self.heads(value)
        if past is not None:
            key, value = torch.cat((past[0], key), dim=2), torch.cat((past[1], value), dim=2)
        dropout = self.attention_dropout if self.training else 0.0
        out = attention(query, key, value, attention_bias[:, :, rows], dropout)
        out = out.transpose(1, 2).reshape(batch, -1, width)
        return self.residual_dropout(self.projection(out))


class MLP(nn.Module):
    """The block's dense feed-forward layer: d -> 4d -> d with ReLU and residual dropout (as the reference)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.embed_dim, 4 * config.embed_dim)
        self.down = nn.Linear(4 * config.embed_dim, config.embed_dim)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, d)."""
        return self.dropout(self.down(F.relu(self.up(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block; stages 2 and 3 add an expert mixture beside its MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.embed_dim)
        self.attention = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)
        self.residual = config.residual
        self.expert_mixture: ExpertMixture | None = None  # installed by stages 2 and 3

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor, rows: slice = slice(None),
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output at token positions `rows` (all by default); `past`: keys and values of tokens
        before `hidden` (see SelfAttention)."""
        hidden = hidden[:, rows] + self.attention(self.ln1(hidden), attention_bias, rows, past)
        normed = self.ln2(hidden)
        if self.expert_mixture is None:
            return hidden + self.mlp(normed)
        # The reference takes the residual from the LayerNorm output once experts are installed.
        residual = normed if self.residual == "ln2" else hidden
        return residual + self.mlp(normed) + self.expert_mixture(normed)


def interleave(returns: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(B, T, d) x3 -> (B, 3T, d) ordered R1, s1, a1, R2, ..."""
    batch, steps, width = states.shape
    return torch.stack((returns, states, actions), dim=2).reshape(batch, 3 * steps, width)


class TokenEmbedding(nn.Module):
    """Linear projections of return, state and action plus a learned timestep embedding added to all three.
    The trajectory and the prompt each have their own (PyTorch default init, as the reference)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.timestep = nn.Embedding(config.max_timestep, config.embed_dim)
        self.return_to_go = nn.Linear(1, config.embed_dim)
        self.state = nn.Linear(MAX_OBS_DIM, config.embed_dim)
        self.action = nn.Linear(MAX_ACT_DIM, config.embed_dim)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """states (B, T, 39), actions (B, T, 8), returns_to_go (B, T, 1), timesteps (B, T) -> tokens
        (B, 3T, d) in the order R1, s1, a1, R2, ..."""
        time = self.timestep(timesteps)
        return interleave(self.return_to_go(returns_to_go) + time, self.state(states) + time, self.action(actions) + time)


class PromptDecisionTransformer(nn.Module):
    """Prompt-DT (Xu et al., 2022) as M3DT's backbone: a prompt of two short trajectories of the task, then
    the (return-to-go, state, action) tokens of the trajectory; predicts each step's action (B, K, 8) from its
    state token, tanh-squashed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config)
        self.embed_prompt = TokenEmbedding(config) if config.prompt else None
        self.embed_ln = nn.LayerNorm(config.embed_dim)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.embed_dim)
        self.action_head = nn.Linear(config.embed_dim, MAX_ACT_DIM)
        # The last block computes only the tokens the action head reads: the same outputs for 9-13% less
        # training arithmetic at the paper's size (counted by m3dt/bench.py). The bench's reference-style
        # path turns it off (m3dt/naive.py).
        self.skip_unread_tokens = True
        # GPT-2 init for the transformer blocks and final LayerNorm only; the rest keeps PyTorch's defaults.
        for module in [*self.blocks, self.ln_final]:
            module.apply(gpt2_init)

    def install_experts(self, num_experts: int, routed: bool, top_k: int = 0, seeds: list[int] | None = None) -> None:
        """Put a fresh expert mixture into every block (stage 2: routed=False; stage 3: routed=True).
        `seeds`: one per expert, so that expert e's initial weights do not depend on which others train."""
        config = self.config
        for layer, block in enumerate(self.blocks):
            layer_seeds = None if seeds is None else [seed * 100 + layer for seed in seeds]
            block.expert_mixture = ExpertMixture(num_experts, config.embed_dim, config.dropout, routed, top_k,
                                                 layer_seeds, config.router_hidden)

    def forward(self, batch: Batch, last_step_only: bool = False, prompt_cache: PromptCache | None = None) -> torch.Tensor:
        """Predicted actions (B, K, 8), read from each step's state token; (B, 1, 8) with `last_step_only`
        (evaluation acts on the last step). Without prompt embeddings (MTDT) the prompt fields of `batch` are
        unused. With `prompt_cache` (evaluation only: it holds the prompt tokens' keys and values of every
        block, see cache_prompt) the prompt tokens are not computed again."""
        steps = batch.states.shape[1]
        tokens = self.embed_ln(self.embed(batch.states, batch.actions, batch.returns_to_go, batch.timesteps))
        token_mask = batch.mask
        if self.embed_prompt is not None:
            token_mask = torch.cat((batch.prompt_mask, batch.mask), dim=1)
            if prompt_cache is None:
                prompt_tokens = self.embed_prompt(
                    batch.prompt_states, batch.prompt_actions, batch.prompt_returns_to_go, batch.prompt_timesteps
                )
                tokens = torch.cat((prompt_tokens, tokens), dim=1)
        hidden = self.dropout(tokens)
        token_mask = token_mask.repeat_interleave(3, dim=1)
        attention_bias = attention_bias_for(token_mask)
        pasts = [None] * len(self.blocks)
        if prompt_cache is not None:
            if self.training:
                raise ValueError("a prompt cache is for evaluation: in training, dropout changes the prompt tokens")
            # the trajectory's queries only
            attention_bias = attention_bias[:, :, attention_bias.shape[-1] - hidden.shape[1]:]
            pasts = list(zip(prompt_cache.keys, prompt_cache.values))
        # Tokens are R, s, a per step and the action head reads the state tokens. Nothing later depends on
        # the last block's other outputs, so with `skip_unread_tokens` that block computes the read ones only.
        length = hidden.shape[1]
        read = slice(length - 2, length - 1) if last_step_only else slice(length - 3 * steps + 1, None, 3)
        for block, past in zip(self.blocks[:-1], pasts):
            hidden = block(hidden, attention_bias, past=past)
        hidden = self.blocks[-1](hidden, attention_bias, read if self.skip_unread_tokens else slice(None), pasts[-1])
        if not self.skip_unread_tokens:
            hidden = hidden[:, read]
        return torch.tanh(self.action_head(self.ln_final(hidden)))

    @torch.no_grad()
    def cache_prompt(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                     timesteps: torch.Tensor, mask: torch.Tensor) -> PromptCache:
        """Keys and values of prompt tokens at every block, one row per prompt (the shapes of a Batch's
        prompt_* fields). Prompt tokens come first and attention is causal, so they never see the
        trajectory: in evaluation (no dropout) a task's fixed prompt gives the same keys and values at every
        step, and a forward with this cache equals one without (exactly, up to rounding: test in float64)."""
        if self.training:
            raise ValueError("a prompt cache is for evaluation: in training, dropout changes the prompt tokens")
        if self.embed_prompt is None:
            raise ValueError("this model has no prompt embeddings (MTDT): there is no prompt to cache")
        hidden = self.embed_prompt(states, actions, returns_to_go, timesteps)
        attention_bias = attention_bias_for(mask.repeat_interleave(3, dim=1))
        keys, values = [], []
        for block in self.blocks:
            key, value = block.attention.keys_values(block.ln1(hidden))
            keys.append(key)
            values.append(value)
            if block is not self.blocks[-1]:
                hidden = block(hidden, attention_bias)
        return PromptCache(keys, values)


@dataclass
class PromptCache:
    """Keys and values of the prompt tokens at every block: per block (rows, heads, 3 x prompt steps,
    embed_dim / heads) each; row i belongs to row i of the batch it was made from."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @staticmethod
    def empty(blocks: int, rows: int, heads: int, tokens: int, head_width: int, device: torch.device | str) -> PromptCache:
        """A cache of the right shapes with unset values (to count memory on "meta")."""
        def tensors() -> list[torch.Tensor]:
            return [torch.empty(rows, heads, tokens, head_width, device=device) for _ in range(blocks)]

        return PromptCache(tensors(), tensors())

    def select(self, rows: torch.Tensor) -> PromptCache:
        """The cache of the given rows (an index tensor), in that order."""
        return PromptCache([key[rows] for key in self.keys], [value[rows] for value in self.values])


def attention_bias_for(token_mask: torch.Tensor) -> torch.Tensor:
    """Additive attention bias (B, 1, L, L): -inf above the diagonal (causal), -1e4 on padded keys."""
    length = token_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=token_mask.device).tril()
    padding = (1.0 - token_mask)[:, None, None, :] * PADDING_SCORE
    return padding.masked_fill(~causal, float("-inf"))


def gpt2_init(module: nn.Module) -> None:
    """GPT-2's initialisation of one module, as the reference's transformer: Linear weights normal with std
    0.02 and zero biases, LayerNorm weight 1 and bias 0 (apply with `model.apply`)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def action_loss(predicted: torch.Tensor, batch: Batch, groups: int = 1) -> torch.Tensor:
    """MSE on valid steps and the task's true action dims; with `groups` > 1 (rows grouped by expert),
    the sum over groups of each group's own mean, so each expert gets exactly its separate-run gradient."""
    weight = batch.mask[..., None] * batch.action_mask  # (B, K, 8)
    squared = (predicted - batch.actions) ** 2 * weight
    per_group_sum = squared.reshape(groups, -1).sum(dim=1)
    per_group_count = weight.reshape(groups, -1).sum(dim=1)
    return (per_group_sum / per_group_count).sum()


# ------------------------------------------------------------------------------------------ a stage's model
def build_model(config: Config | dict[str, Any], dropout: float, prompt: bool = True) -> PromptDecisionTransformer:
    """The model a config (or a manifest's config) describes; `prompt=False`: without prompt embeddings (MTDT)."""
    fields = config.model_fields() if isinstance(config, Config) else config
    return PromptDecisionTransformer(ModelConfig(
        embed_dim=fields["embed_dim"], n_layer=fields["n_layer"], n_head=fields["n_head"], dropout=dropout,
        max_timestep=fields["max_timestep"], residual=fields["residual"],
        router_hidden=tuple(int(width) for width in fields["router_hidden"].split(",")), prompt=prompt,
    ))


def set_up_stage(model: PromptDecisionTransformer, stage: int, num_experts: int = 0, top_k: int = 0,
                 seeds: list[int] | None = None) -> dict[str, torch.nn.Parameter]:
    """Install what `stage` trains (stage 2: experts assigned to row groups; stage 3: all experts and a router
    per block) and freeze the rest. Returns the trainable parameters by name."""
    if stage == 1:
        return set_trainable(model, "")
    model.install_experts(num_experts, routed=stage == 3, top_k=top_k, seeds=seeds)
    return set_trainable(model, ".router." if stage == 3 else ".expert_mixture.")


def set_trainable(model: PromptDecisionTransformer, part: str) -> dict[str, torch.nn.Parameter]:
    """Train the parameters whose name contains `part` ("" = all of them) and freeze the rest. Returns the
    trainable parameters by name."""
    selected = {}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(part in name)
        if part in name:
            selected[name] = parameter
    return selected

"""Experts and routers.

All E experts of a block live in one module with stacked weights, so running them is one batched matmul
per layer (`torch.baddbmm`), never a Python loop over experts. Two ways to feed them:

- assigned (stage 2): rows are already grouped by expert. The input (E * rows, L, d) is viewed as E slices,
  and slice e goes through expert e only. Training one expert is the case E = 1; `--all` training of
  G experts puts every group's batch in one forward.
- routed (stage 3): a router gives every token a weight per expert, and the block adds
  sum_e weight_e * expert_e(token). Dense soft mixture by default (the paper); top-k gating as an option
  (the softmax probabilities of the k largest, as Switch Transformer's gate; computed densely with zero
  weights outside the top k, which is exact and cheap for E <= 48).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from m3dt.kernels import Dropout


class StackedExperts(nn.Module):
    """E two-layer MLPs d -> 4d -> d (ReLU, dropout on the output), weights stacked along dim 0.

    Shapes are in matmul convention, `x @ weight`: up_weight (E, d, 4d), down_weight (E, 4d, d).
    """

    def __init__(self, num_experts: int, embed_dim: int, dropout: float, seeds: list[int] | None = None):
        super().__init__()
        hidden = 4 * embed_dim
        self.up_weight = nn.Parameter(torch.empty(num_experts, embed_dim, hidden))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden, embed_dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, 1, embed_dim))
        self.dropout = Dropout(dropout)
        self.reset_parameters(seeds)

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int] | None = None) -> None:
        """N(0, 0.02) weights, zero biases (as the reference initialises experts). With `seeds`, expert e draws
        from its own generator seeded with seeds[e], so an expert starts the same whether trained alone or with
        all others."""
        self.up_bias.zero_()
        self.down_bias.zero_()
        if seeds is None:
            nn.init.normal_(self.up_weight, std=0.02)
            nn.init.normal_(self.down_weight, std=0.02)
            return
        for expert, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            for weight in (self.up_weight, self.down_weight):
                weight[expert].copy_(torch.randn(weight.shape[1:], generator=generator) * 0.02)

    @property
    def num_experts(self) -> int:
        """E, the number of stacked experts."""
        return self.up_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (E, N, d) or (1, N, d) broadcast to every expert -> (E, N, d), expert e applied to x[e]."""
        if x.shape[0] != self.num_experts:
            x = x.expand(self.num_experts, -1, -1)
        # In place: the (E, N, 4d) hidden is the largest tensor of the model, and baddbmm's backward does
        # not need its output, so one copy of it is enough (the peak of a forward is about 1.25x it, not 2x).
        hidden = torch.baddbmm(self.up_bias, x, self.up_weight).relu_()
        # Each expert drops out its own output, as separate expert MLPs would.
        return self.dropout(torch.baddbmm(self.down_bias, hidden, self.down_weight))


def tied_router_hidden(embed_dim: int) -> tuple[int, ...]:
    """The reference's router widths, tied to the model width: d -> 4d -> 4d -> 4d -> 2d -> E
    (1024, 1024, 1024, 512 at the paper's d = 256)."""
    return (4 * embed_dim, 4 * embed_dim, 4 * embed_dim, 2 * embed_dim)


class Router(nn.Module):
    """Per-token MLP d -> hidden widths -> E with ReLU; softmax over experts (in `gate_weights`).
    No dropout, no LayerNorm, PyTorch's default Linear init (as the reference)."""

    def __init__(self, embed_dim: int, num_experts: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        width = embed_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_experts))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d) tokens -> (N, E) router logits (no softmax)."""
        return self.network(x)  # router logits


def gate_weights(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N, E) router logits -> (N, E) expert weights, float32 (float64 for float64 logits): the softmax over
    all E experts (the paper's dense mixture); with 0 < top_k < E, the same probabilities kept for the k
    largest and zero elsewhere.

    Not renormalised over the k, as Switch Transformer's gate (Fedus et al., 2021): renormalised, top-1
    weights are always exactly 1, and the router would get no gradient at all; kept as softmax
    probabilities, every logit moves the chosen experts' weights, and k = E is the dense mixture. The
    softmax is taken in float32 at least whatever the logits' dtype (bf16 under bf16 autocast), so the
    weights' dtype does not depend on the device's autocast rules."""
    dtype = torch.promote_types(router_logits.dtype, torch.float32)
    probabilities = torch.softmax(router_logits.to(dtype), dim=-1)
    if top_k <= 0 or top_k >= router_logits.shape[-1]:
        return probabilities
    top_index = router_logits.topk(top_k, dim=-1).indices
    return torch.zeros_like(probabilities).scatter(-1, top_index, probabilities.gather(-1, top_index))


class ExpertMixture(nn.Module):
    """The expert part of one block. Without a router: assigned mode; with one: routed mode."""

    def __init__(self, num_experts: int, embed_dim: int, dropout: float, routed: bool, top_k: int = 0,
                 seeds: list[int] | None = None, router_hidden: tuple[int, ...] | None = None):
        """`router_hidden`: the router's hidden widths; None: tied to `embed_dim` as the reference's."""
        super().__init__()
        self.experts = StackedExperts(num_experts, embed_dim, dropout, seeds)
        hidden = router_hidden or tied_router_hidden(embed_dim)
        self.router = Router(embed_dim, num_experts, hidden) if routed else None
        self.top_k = top_k

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """normed: (B, L, d), the LayerNorm output of the block -> the experts' contribution (B, L, d)."""
        batch, length, width = normed.shape
        num_experts = self.experts.num_experts
        if self.router is None:
            if batch % num_experts:
                raise ValueError(f"assigned mode needs rows in multiples of {num_experts} experts, got {batch}")
            grouped = normed.reshape(num_experts, (batch // num_experts) * length, width)
            return self.experts(grouped).reshape(batch, length, width)
        tokens = normed.reshape(batch * length, width)
        weights = gate_weights(self.router(tokens), self.top_k)  # (N, E) float32
        outputs = self.experts(tokens.unsqueeze(0))  # (E, N, d), bf16 under bf16 autocast
        return torch.einsum("ne,end->nd", weights.to(outputs.dtype), outputs).reshape(batch, length, width)


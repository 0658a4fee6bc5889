"""m3dt/kernels.py: the CPU versions of dropout and attention compute what PyTorch's do."""

import math

import pytest
import torch
import torch.nn.functional as F

from m3dt.kernels import Dropout, attention, dropout
from m3dt.model import attention_bias_for


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    out = dropout(x, p, training=True)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))  # gradient through the same mask


def test_dropout_is_the_identity_in_eval_mode():
    x = torch.randn(4, 5)
    module = Dropout(0.5).eval()
    assert torch.equal(module(x), x) and torch.equal(dropout(x, 0.5, training=False), x)


def qkv_and_bias(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(3, 2, 12, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 12, dtype=torch.float64)
    mask[0, :4] = 0  # a left-padded row
    return query, key, value, attention_bias_for(mask)


def test_attention_without_dropout_is_scaled_dot_product_attention():
    query, key, value, bias = qkv_and_bias()
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    torch.testing.assert_close(attention(query, key, value, bias, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_attention_with_dropout_drops_attention_weights():
    """With dropout, the CPU path equals softmax weights times the mask drawn from the same stream, and
    averaged over many draws it approaches the dropout-free attention."""
    query, key, value, bias = qkv_and_bias()
    torch.manual_seed(1)
    out = attention(query, key, value, bias, 0.25)
    torch.manual_seed(1)
    weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(8) + bias, dim=-1)
    keep = torch.rand_like(weights) >= 0.25
    torch.testing.assert_close(out, (weights * keep / 0.75) @ value, rtol=1e-12, atol=1e-12)
    mean = torch.stack([attention(query, key, value, bias, 0.25) for _ in range(4000)]).mean(dim=0)
    torch.testing.assert_close(mean, attention(query, key, value, bias, 0.0), rtol=0, atol=0.05)

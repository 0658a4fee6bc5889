"""Model shapes, parameter counts at the paper config, and the batched MoE against a plain per-expert loop."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from m3dt.data import Batch
from m3dt.model import ModelConfig, PromptDecisionTransformer, action_loss
from m3dt.moe import ExpertMixture, gate_weights


def random_batch(rows: int, steps: int = 20, prompt_steps: int = 5, padded: int = 0, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, steps)
    mask[:, :padded] = 0
    return Batch(
        states=torch.randn(rows, steps, 39, generator=generator),
        actions=torch.rand(rows, steps, 8, generator=generator) * 2 - 1,
        returns_to_go=torch.randn(rows, steps, 1, generator=generator),
        timesteps=torch.randint(0, 500, (rows, steps), generator=generator),
        mask=mask,
        prompt_states=torch.randn(rows, prompt_steps, 39, generator=generator),
        prompt_actions=torch.rand(rows, prompt_steps, 8, generator=generator),
        prompt_returns_to_go=torch.randn(rows, prompt_steps, 1, generator=generator),
        prompt_timesteps=torch.randint(0, 500, (rows, prompt_steps), generator=generator),
        prompt_mask=torch.ones(rows, prompt_steps),
        action_mask=(torch.arange(8) < 4).float().expand(rows, 1, 8),
        task_index=torch.zeros(rows, dtype=torch.long),
    )


def test_paper_config_parameter_counts():
    model = PromptDecisionTransformer(ModelConfig())
    backbone = sum(p.numel() for p in model.parameters())
    # The reference counts 5,290,288: ours plus its never-trained return head (257), state head
    # (10,023) and unused GPT-2 token embedding (256).
    assert backbone == 5_290_288 - 257 - 10_023 - 256
    model.install_experts(1, routed=False)
    per_expert = sum(p.numel() for block in model.blocks for p in block.expert_mixture.parameters())
    assert per_expert == 3_153_408  # ~3.15M per expert over the 6 blocks
    model.install_experts(48, routed=True)
    router = sum(p.numel() for p in model.blocks[0].expert_mixture.router.parameters())
    assert 2.8e6 < router < 3.0e6  # ~2.9M per router at E=48


def test_forward_shapes():
    model = PromptDecisionTransformer(ModelConfig(embed_dim=64, n_layer=2, n_head=4))
    assert model(random_batch(3)).shape == (3, 20, 8)


def per_expert_reference(mixture: ExpertMixture, u: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The plain way: loop over experts, each a separate MLP."""
    experts = mixture.experts
    outputs = []
    for e in range(experts.num_experts):
        hidden = F.relu(u @ experts.up_weight[e] + experts.up_bias[e, 0])
        outputs.append(hidden @ experts.down_weight[e] + experts.down_bias[e, 0])
    if weights is None:  # assigned: row group e goes through expert e
        groups = u.shape[0] // experts.num_experts
        return torch.cat([outputs[e][e * groups : (e + 1) * groups] for e in range(experts.num_experts)])
    return sum(weights[..., e : e + 1] * outputs[e] for e in range(experts.num_experts))


@pytest.mark.parametrize("top_k", [0, 2])
def test_routed_mixture_matches_per_expert_loop(top_k):
    torch.manual_seed(0)
    mixture = ExpertMixture(5, 32, dropout=0.0, routed=True, top_k=top_k).double().eval()
    for parameter in mixture.experts.parameters():
        parameter.data.normal_()  # non-zero biases too
    u = torch.randn(3, 7, 32, dtype=torch.float64)
    weights = gate_weights(mixture.router(u), top_k)
    if top_k:
        assert ((weights > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(mixture(u), per_expert_reference(mixture, u, weights), rtol=1e-10, atol=1e-10)


def test_assigned_mixture_matches_per_expert_loop():
    torch.manual_seed(1)
    mixture = ExpertMixture(4, 16, dropout=0.0, routed=False).double().eval()
    for parameter in mixture.experts.parameters():
        parameter.data.normal_()
    u = torch.randn(8, 5, 16, dtype=torch.float64)  # 4 experts x 2 rows
    torch.testing.assert_close(mixture(u), per_expert_reference(mixture, u, None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("experts, routed", [(0, False), (2, False), (3, True)])
def test_last_block_on_read_tokens_only_gives_the_full_models_outputs_and_gradients(experts, routed):
    """Computing the last block on the read state tokens only (the default) changes nothing the model
    returns, for every step and for the last one, nor any gradient (float64, dropout off)."""
    torch.manual_seed(0)
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=3, n_head=4, router_hidden=(16,)))
    if experts:
        model.install_experts(experts, routed=routed)
    model = model.double().eval()
    batch = Batch(**{key: value.double() if value.is_floating_point() else value
                     for key, value in vars(random_batch(6, padded=3)).items()})
    results = {}
    for skip in (True, False):
        model.skip_unread_tokens = skip
        model.zero_grad()
        predicted = model(batch)
        action_loss(predicted, batch, groups=2 if experts == 2 else 1).backward()
        gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        results[skip] = predicted, model(batch, last_step_only=True), gradients
    (predicted, last, gradients), (full_predicted, full_last, full_gradients) = results[True], results[False]
    assert predicted.shape == (6, 20, 8) and last.shape == (6, 1, 8)
    torch.testing.assert_close(predicted, full_predicted, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, full_predicted[:, -1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full_last, full_predicted[:, -1:], rtol=1e-12, atol=1e-12)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, full_gradients[name], rtol=1e-10, atol=1e-12, msg=name)


def test_ln2_residual_changes_the_function_and_standard_does_not():
    """With zero expert output, the reference's LN2 residual still changes the block; the standard one not."""
    torch.manual_seed(0)
    batch = random_batch(2)
    for residual, changes in (("ln2", True), ("standard", False)):
        model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=4, residual=residual)).eval()
        before = model(batch)
        model.install_experts(1, routed=False)
        for block in model.blocks:
            for parameter in block.expert_mixture.parameters():
                parameter.data.zero_()
        after = model(batch)
        assert (not torch.allclose(before, after)) == changes


def test_padded_steps_do_not_affect_valid_predictions():
    """Padded positions are masked: whatever they hold (training pads action -10, the evaluator pads 0),
    the predictions at valid steps are identical."""
    torch.manual_seed(0)
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=4)).eval()
    batch = random_batch(2, padded=7)
    other = random_batch(2, padded=7)
    batch_zero_padding = Batch(**{**batch.__dict__})
    batch_zero_padding.actions = batch.actions.clone()
    batch_zero_padding.actions[:, :7] = 0.0
    batch.actions[:, :7] = -10.0
    batch_zero_padding.states = batch.states.clone()
    batch_zero_padding.states[:, :7] = other.states[:, :7]
    torch.testing.assert_close(model(batch)[:, 7:], model(batch_zero_padding)[:, 7:], rtol=1e-4, atol=1e-4)


def test_loss_uses_only_valid_steps_and_true_action_dims():
    batch = random_batch(2, padded=5)
    predicted = batch.actions.clone()
    predicted[:, :5] += 3.0  # padded steps: ignored
    predicted[..., 4:] += 3.0  # dims beyond act_dim 4: ignored
    assert action_loss(predicted, batch).item() == 0.0
    predicted[:, 5:, :4] += 0.5
    assert action_loss(predicted, batch).item() == pytest.approx(0.25)


class SoftmaxInFloat32AsCudaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast computes softmax in float32 (CPU autocast does not): emulated here, so that a
    machine without a GPU sees the dtypes a GPU run sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.softmax, torch.Tensor.softmax, F.softmax) and args[0].dtype == torch.bfloat16:
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_gate_weights_are_softmax_probabilities_of_the_top_k(top_k):
    logits = torch.randn(50, 4, dtype=torch.float64)
    probabilities = torch.softmax(logits, dim=-1)
    kept = probabilities >= probabilities.topk(top_k, dim=-1).values[:, -1:]
    torch.testing.assert_close(gate_weights(logits, top_k), torch.where(kept, probabilities, 0.0), rtol=0, atol=0)
    assert gate_weights(logits.bfloat16(), top_k).dtype == torch.float32


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_every_router_parameter_gets_a_gradient(top_k):
    """Renormalised top-1 weights are constantly 1: the router would never train (issue: router weights the
    same after 1 and 8 steps)."""
    torch.manual_seed(0)
    mixture = ExpertMixture(4, 16, dropout=0.0, routed=True, top_k=top_k, router_hidden=(32, 32))
    u = torch.randn(8, 10, 16)
    ((mixture(u) - torch.randn(8, 10, 16)) ** 2).mean().backward()
    for name, parameter in mixture.router.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (mixture.router.network[-1].bias.grad != 0).all()  # every expert's logit


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_routed_mixture_under_bf16_autocast_with_float32_softmax(top_k):
    """The dtypes of a CUDA bf16 autocast run: bf16 router logits, a float32 softmax, float32 weights."""
    torch.manual_seed(0)
    mixture = ExpertMixture(4, 16, dropout=0.0, routed=True, top_k=top_k, router_hidden=(32,))
    u = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), SoftmaxInFloat32AsCudaAutocast():
        logits = mixture.router(u.reshape(10, 16))
        assert logits.dtype == torch.bfloat16 and gate_weights(logits, top_k).dtype == torch.float32
        output = mixture(u)
    output.float().sum().backward()
    torch.testing.assert_close(output.float(), mixture(u), rtol=0.05, atol=0.05)
    assert all(parameter.grad is not None for parameter in mixture.router.parameters())

"""--precision fp32 | tf32 | bf16 with dense and top-k routing, --compile modes and --deterministic: each
runs and agrees with float64 within its rounding. The tests marked `device` run on --device (a GPU in
scripts/gpu_check.sh, where TF32, bf16 kernels and CUDA graphs are real)."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from m3dt.config import Config
from m3dt.model import action_loss
from m3dt.model import build_model, set_up_stage
from m3dt.train import Precision, build_optimizer, train_step, warmup_factor
from tests.test_model import on, random_batch

# Agreement with float64 of a loss (relative) and of actions in [-1, 1] (absolute): bf16 keeps 8 bits of
# mantissa, TF32 10, fp32 24.
LOSS_TOLERANCE = {"fp32": 1e-5, "tf32": 1e-2, "bf16": 5e-2}
ACTION_TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 5e-2}


@pytest.mark.device
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("top_k", [0, 2])
def test_router_training_and_evaluation_in_every_precision(precision, top_k, device):
    """A stage-3 step (routers over 4 frozen experts) and an evaluation forward in each precision: finite,
    close to float64, and the step moves every router."""
    config = Config(embed_dim=32, n_layer=2, n_head=4, router_hidden="64,32", dropout=0.0, learning_rate=1e-3)
    torch.manual_seed(0)
    model = build_model(config, config.dropout)
    trainable = set_up_stage(model, 3, num_experts=4, top_k=top_k)
    batch = random_batch(8, padded=3)
    reference = model.double()(on(batch, torch.device("cpu"), torch.float64))
    model.float().to(device)
    batch = on(batch, device)
    numerics = Precision(device, precision)
    with torch.no_grad(), numerics:
        evaluated = model.eval()(batch, last_step_only=True)
    assert torch.isfinite(evaluated).all()
    torch.testing.assert_close(evaluated.double().cpu(), reference[:, -1:], rtol=0, atol=ACTION_TOLERANCE[precision])

    parameters = list(trainable.values())
    optimizer = build_optimizer(parameters, config)
    before = [parameter.detach().clone() for parameter in parameters]
    loss, grad_norm = train_step(model.train(), batch, 1, optimizer, LambdaLR(optimizer, warmup_factor(1)),
                                 parameters, config.grad_clip, per_expert_clip=False, precision=numerics)
    expected = action_loss(reference, on(batch, torch.device("cpu"), torch.float64)).item()
    assert loss.item() == pytest.approx(expected, rel=LOSS_TOLERANCE[precision])
    assert torch.isfinite(grad_norm) and all(not torch.equal(b, p) for b, p in zip(before, parameters))


@pytest.mark.device
def test_tf32_is_on_inside_its_context_only(device):
    """On a GPU TF32 changes a float32 matmul's result, on a CPU nothing; the switch is restored after."""
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(256, 256, generator=generator).to(device) for _ in range(2))
    exact = left.double() @ right.double()
    with Precision(device, "fp32"):
        full = left @ right
    with Precision(device, "tf32"):
        tf32 = left @ right
    assert not torch.backends.cuda.matmul.allow_tf32
    assert (device.type == "cuda") == (not torch.equal(full, tf32))
    assert (tf32.double() - exact).abs().max() < 0.05 and (full.double() - exact).abs().max() < 1e-3

"""The evaluator's model forward, without a simulator (scripts/gpu_check.sh runs it on a GPU): the live
rollouts split into forwards of at most --eval_rows rows, each with its tasks' cached prompt, give the
actions of one forward over all of them."""

import numpy as np
import pytest
import torch

from m3dt.evaluate import History, ModelPolicy, Rollout, Statistics
from m3dt.model import ModelConfig, PromptDecisionTransformer
from m3dt.tasks import get_task
from tests.conftest import SMALL_TASKS


@pytest.mark.device
def test_policy_forwards_in_chunks_give_the_actions_of_one_forward(device):
    torch.manual_seed(0)
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=2, dropout=0.0, router_hidden=(16,)))
    model.install_experts(3, routed=True)
    model = model.double().eval().to(device)
    generator = torch.Generator().manual_seed(1)
    tasks = len(SMALL_TASKS)
    statistics = Statistics(np.zeros((tasks, 39), dtype=np.float32), np.ones((tasks, 39), dtype=np.float32), {
        "states": torch.randn(tasks, 5, 39, generator=generator), "actions": torch.rand(tasks, 5, 8, generator=generator),
        "returns_to_go": torch.randn(tasks, 5, 1, generator=generator),
        "timesteps": torch.randint(0, 400, (tasks, 5), generator=generator), "mask": torch.ones(tasks, 5)})
    rollouts = [Rollout(get_task(name), slot, episode) for slot, name in enumerate(SMALL_TASKS) for episode in (0, 1)]
    rng = np.random.default_rng(0)
    count, steps = len(rollouts), 30
    history = History(rng.normal(size=(count, steps, 39)).astype(np.float32),
                      rng.uniform(-1, 1, size=(count, steps, 8)).astype(np.float32),
                      rng.normal(size=(count, steps)).astype(np.float32))
    live = np.array([0, 1, 3, 4, 6, 8, 9, 10, 11])
    for t in (3, 25):  # a padded context and a full one
        whole = ModelPolicy(model, statistics, rollouts, 20, device, torch.float64)(history, live, t)
        chunked = ModelPolicy(model, statistics, rollouts, 20, device, torch.float64, eval_rows=4)(history, live, t)
        assert whole.shape == (len(live), 8) and np.isfinite(whole).all()
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)

"""The memory planner (m3dt/memory.py): what it counts on the meta device is what real tensors hold, its
data term is the sampler's tensors, and the choices made from it (where the data lives, rows per
evaluation forward). Peaks measured on a GPU against the plans: scripts/gpu_check.sh."""

import pytest
import torch

from m3dt import memory
from m3dt.config import Config, ConfigError
from m3dt.data import DeviceSampler, TaskDataset
from m3dt.model import ModelConfig, PromptDecisionTransformer, action_loss, set_up_stage
from tests.conftest import REPO, SMALL_TASKS

TINY = Config(embed_dim=32, n_layer=2, n_head=2, router_hidden="64,32").model_fields()


def test_data_term_is_the_samplers_tensors(small_data):
    dataset = TaskDataset(small_data, SMALL_TASKS, prompt_length=5)
    sampler = DeviceSampler(dataset, 20, 16, torch.device("cpu"), seeds=[0])
    tensors = [value for value in vars(sampler).values() if isinstance(value, torch.Tensor)]
    tensors += list(vars(sampler.prompts).values())
    held = sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not sampler.prompt_choice)
    episodes = len(dataset.episode_starts) - 1
    assert memory.dataset_bytes(len(dataset.returns_to_go), episodes, len(SMALL_TASKS), 5) == held


def test_plan_counts_weights_and_adamw_moments():
    case = memory.StageCase("stage 3", 3, 4, 16)
    model = memory.case_model(case, TINY)
    plan = memory.plan_case(case, TINY)
    assert plan.weights == 4 * sum(parameter.numel() for parameter in model.parameters())
    routers = sum(parameter.numel() for name, parameter in model.named_parameters() if ".router." in name)
    assert plan.optimizer == 2 * 4 * routers and plan.activations > 0 and plan.data == 0


@pytest.mark.parametrize("stage, experts, training", [(1, 0, True), (3, 3, True), (3, 3, False)])
def test_meta_count_bounds_the_live_tensors_of_a_real_step(stage, experts, training):
    """The count on shapes alone is an upper bound of the live tensors of the same step run for real (CPU,
    no dropout): the meta device computes attention PyTorch's plain way, which keeps the attention
    weights; the CPU's and GPU's fused kernels keep less. On this tiny model (width 32, where the 75 x 75
    attention weights weigh most) by less than 1.7x; at the paper's size a GPU measures it (gpu_check)."""
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=2, dropout=0.0, router_hidden=(16,)))
    set_up_stage(model, stage, experts)
    batch = memory.meta_batch(8, 20, 5, "cpu")
    batch.action_mask.fill_(1.0)
    if training:
        counted = memory.training_step_bytes(model, 8, 1, 20, 5)
        with memory.LiveMemory() as live:
            action_loss(model.train()(batch), batch).backward()
    else:
        counted = memory.forward_bytes(model, 8, 20, 5)
        with torch.no_grad(), memory.LiveMemory() as live:
            model.eval()(batch, last_step_only=True)
    assert live.peak <= counted < 1.7 * live.peak


def test_planning_leaves_the_random_streams_alone():
    state = torch.get_rng_state()
    memory.plan_case(memory.StageCase("stage 3", 3, 4, 16), TINY)
    assert torch.equal(torch.get_rng_state(), state)


def test_data_goes_to_the_gpu_only_when_the_plan_fits_with_a_margin():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plan = memory.MemoryPlan(data=8 * memory.GIB, weights=memory.GIB, optimizer=0, activations=memory.GIB)
    assert memory.data_device("auto", cuda, plan, free=12 * memory.GIB) == cuda
    assert memory.data_device("auto", cuda, plan, free=10 * memory.GIB) == cpu  # 10 GiB fit, not with 10% to spare
    assert memory.data_device("cuda", cuda, plan, free=memory.GIB) == cuda  # as asked
    assert memory.data_device("cpu", cuda, plan, free=100 * memory.GIB) == cpu
    assert memory.data_device("auto", cpu, plan, free=memory.GIB) == cpu
    with pytest.raises(ConfigError, match="--data_device cuda: training runs on cpu; the data lives on the training "
                                          "GPU or in host memory"):
        memory.data_device("cuda", cpu, plan, free=100 * memory.GIB)  # was trained on the CPU, recorded as cuda


def test_evaluation_rows_keep_each_forward_within_its_share_of_free_memory():
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=2, dropout=0.0, router_hidden=(16,)))
    model.install_experts(4, routed=True)
    model.eval()
    free = 40 * 2**20
    rows = memory.evaluation_rows(model, 20, 5, free)
    assert rows > 1
    for count, within in ((rows, True), (2 * rows, False)):
        batch = memory.meta_batch(count, 20, 5, "cpu")
        with torch.no_grad():
            cache = model.cache_prompt(batch.prompt_states, batch.prompt_actions, batch.prompt_returns_to_go,
                                       batch.prompt_timesteps, batch.prompt_mask)
            with memory.LiveMemory() as live:
                model(batch, last_step_only=True, prompt_cache=cache)
        assert (live.peak <= memory.EVAL_MEMORY_SHARE * free) == within


def test_measured_peak_of_a_stage_is_near_its_plan_on_a_cpu():
    """`python -m m3dt.memory check` on a CPU: two real router steps (model, optimizer, batch) and their peak
    of live tensors, which holds the weights and stays near the plan (the CPU's own dropout and attention
    kernels, m3dt/kernels.py, make it differ a little; a GPU holds it to the plan)."""
    case = memory.StageCase("stage 3", 3, 2, 8)
    plan = memory.plan_case(case, TINY)
    measured = memory.measured_peak(case, TINY, torch.device("cpu"))
    assert plan.weights < measured < 1.3 * plan.total


def test_the_grouping_stage_plans_no_optimizer_state(small_data, tmp_path, monkeypatch):
    """Stage 2's grouping computes gradients only: its printed plan has no AdamW moments (stage 1's has)."""
    from m3dt.stages import group_tasks, train_backbone

    plans = []
    describe = memory.MemoryPlan.describe
    monkeypatch.setattr(memory.MemoryPlan, "describe", lambda plan, *args: plans.append(plan) or describe(plan, *args))
    config = Config(tasks=",".join(SMALL_TASKS[:3]), data_path=str(small_data), run_dir=str(tmp_path), max_iters=2,
                    embed_dim=32, n_layer=2, n_head=2, device="cpu", workers=0, group_num=2, grouping_gradients=1,
                    kmeans_restarts=1, kmeans_repeats=1)
    train_backbone(config)
    group_tasks(config, "gradient")
    stage1, grouping = plans
    assert stage1.optimizer == 2 * stage1.weights and grouping.optimizer == 0 and grouping.weights == stage1.weights


def test_the_readme_table_of_what_fits_where_is_the_planners():
    """The README's table is `python -m m3dt.memory table`'s output: a change to what the planner counts must
    come with the table it gives."""
    readme = (REPO / "README.md").read_text()
    assert memory.fits_table(Config().model_fields()) in readme

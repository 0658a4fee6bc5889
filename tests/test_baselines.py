"""The comparison methods (m3dt/baselines) and the stage-1 gradient-conflict curve: each method trains through
its command line with a falling loss and is evaluated in the simulator; each trains exactly what it claims."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m3dt.baselines import harmodt, load_baseline, method_module
from m3dt.baselines.__main__ import main as baselines_main
from m3dt.baselines.dense_sizes import dense_configs, parameter_count
from m3dt.config import Config, load_yaml
from m3dt.conflict import conflict_measures
from m3dt.data import DeviceSampler, TaskDataset
from m3dt.evaluate import main as evaluate_main
from m3dt.report import model_size
from m3dt.model import build_model
from m3dt.run import RunDir
from m3dt.stages import train_backbone
from m3dt.train import Precision, build_optimizer, train_step, warmup_factor
from tests.conftest import SMALL_TASKS

SIZE = dict(embed_dim=32, n_layer=2, n_head=2, warmup_steps=5, learning_rate=1e-3, device="cpu", workers=0,
            router_hidden="16,16")  # the routers at the width of this tiny model
FLAGS = [item for name, value in {**SIZE, "log_every": 10, "save_every": 40, "expert_num": 2,
                                 "harmodt_mask_interval": 20, "harmodt_eta_max": 40}.items()
         for item in (f"--{name}", str(value))]
STEPS = {"mtdt": 60, "harmodt": 60, "m3dt-end2end": 60, "m3dt-no-grouping": 100}  # no-grouping: experts only


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """A tiny stage 1 (with the conflict curve on) and every method trained after it, through the CLI."""
    run_dir = tmp_path_factory.mktemp("baselines_run")
    common = ["--data_path", str(small_data), "--run_dir", str(run_dir), *FLAGS]
    train_backbone(Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), run_dir=str(run_dir), max_iters=30,
                          log_every=10, conflict_every=15, conflict_tasks=4, conflict_batches=1, **SIZE))
    for method, steps in STEPS.items():
        arguments = ["--method", method, "--max_iters", str(steps), *common]
        if method != "m3dt-no-grouping":  # the others start from scratch and name their tasks
            arguments += ["--tasks", ",".join(SMALL_TASKS)]
        baselines_main(arguments)
    return RunDir(run_dir), common


def losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", list(STEPS))
def test_method_loss_falls_and_it_evaluates(trained, method):
    run, _ = trained
    logged = losses(run.baseline(method) / "metrics.jsonl")
    assert len(logged) >= 6 and sum(logged[-2:]) < 0.85 * sum(logged[:2]), logged
    manifest = json.loads((run.baseline(method) / "model.manifest.json").read_text())
    assert manifest["method"] == method and manifest["steps_done"] == STEPS[method] and manifest["tasks"] == SMALL_TASKS
    evaluate_main(["--run_dir", str(run.root), "--method", method, "--tasks", "pendulum-swingup,cheetah-vel-8",
                   "--episodes", "1", "--max_steps", "3", "--workers", "0", "--device", "cpu"])
    (folder,) = (run.root / "eval").glob(f"{method}_tasks2-*_episodes1_steps3")  # 2 of the run's tasks
    results = json.loads((folder / "results.json").read_text())
    assert results["method_id"] == method and results["method"] == method_module(method).NAME
    assert results["checkpoint"]["path"] == f"baselines/{method}/model.safetensors" and not results["protocol"]["full"]
    assert results["num_experts"] == (2 if method.startswith("m3dt") else 0) and results["grouping"] is None
    assert all(np.isfinite(row["score"]) and row["steps_mean"] == 3 for row in results["tasks"].values())
    if method in ("mtdt", "harmodt"):  # dense: the report's parameter count is the values its artifact holds
        saved = load_file(run.baseline(method) / "model.safetensors")  # (HarmoDT's masks are not parameters)
        parameters = sum(tensor.numel() for name, tensor in saved.items() if name != harmodt.MASKS_KEY)
        assert model_size(run.root, results)[1] == parameters


def test_rerun_is_finished_and_missing_method_is_one_line(trained, capsys, tmp_path):
    run, common = trained
    baselines_main(["--method", "mtdt", "--max_iters", "60", "--tasks", ",".join(SMALL_TASKS), *common])
    assert "mtdt already finished (60 steps)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--run_dir", str(tmp_path), "--method", "harmodt"])
    assert exit_info.value.code == 2 and "HarmoDT model does not exist" in capsys.readouterr().err


def test_mtdt_has_no_prompt_parameters_and_ignores_prompt_inputs(trained, small_data):
    run, _ = trained
    model, _ = load_baseline(run, "mtdt")
    assert not [name for name, _ in model.named_parameters() if "prompt" in name]
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 4, torch.device("cpu"), seeds=[0])
    batch = sampler.sample(torch.tensor([2]))
    other = sampler.sample(torch.tensor([5]))  # another task's prompts, and a shorter prompt window
    batch_with_other_prompt = type(batch)(**{**vars(batch), **{key: value[:, :3] for key, value in vars(other).items()
                                                              if key.startswith("prompt_")}})
    assert torch.equal(model(batch), model(batch_with_other_prompt))
    assert not torch.equal(model(batch), model(other))


def test_ablations_train_exactly_what_they_claim(trained):
    run, common = trained
    stage1 = load_file(run.backbone)
    config = Config(tasks=",".join(SMALL_TASKS), run_dir=str(run.root), expert_num=2, **SIZE)
    for method, frozen_part in (("m3dt-end2end", None), ("m3dt-no-grouping", "backbone")):
        trained_tensors = load_file(run.baseline_model(method))
        torch.manual_seed(config.seed)  # as the method's training builds its initial model
        initial, trainable = method_module(method).build(config, run)
        assert set(trainable) == set(trained_tensors) if frozen_part is None else \
            set(trainable) == {name for name in trained_tensors if ".expert_mixture." in name}
        for name, before in initial.state_dict().items():
            changed = not torch.equal(before, trained_tensors[name])
            assert changed == (name in trainable), (method, name)
            if name not in trainable:  # frozen: the stage-1 backbone as it was
                assert torch.equal(trained_tensors[name], stage1[name])


def test_harmodt_masks_keep_sparsity_and_differ_between_tasks_after_updates(trained):
    run, _ = trained
    policy, manifest = load_baseline(run, "harmodt")
    masks = policy.masks
    config = Config(**SIZE)
    initial = harmodt.initial_masks(build_model(config, 0.0), len(SMALL_TASKS), 0.8, torch.Generator().manual_seed(0))
    # every update swaps as many entries in as out: each task keeps the count it was drawn with
    assert torch.equal(masks.sum(dim=1), initial.sum(dim=1))
    assert abs(1.0 - masks.float().mean().item() - 0.2) < 0.01
    # updates after steps 20, 40, 60 of 60 swap k = int(40 - 20 (1 + cos(2 pi (step - 1) / 60))) = 28, 31, 0
    # entries in and as many out (an entry may go out and back in)
    records = [json.loads(line) for line in (run.baseline("harmodt") / "metrics.jsonl").read_text().splitlines()]
    assert [record["harmodt_mask_changes"] for record in records if "harmodt_mask_changes" in record] == [28, 31, 0]
    changed = (masks != initial).sum(dim=1)
    assert ((changed > 0) & (changed <= 2 * (28 + 31)) & (changed % 2 == 0)).all(), changed
    assert all(not torch.equal(masks[a], masks[b]) for a in range(len(masks)) for b in range(a))


def test_harmodt_change_count_and_erk_densities():
    assert [harmodt.change_count(step, 1000, 0, 100) for step in (0, 250, 499, 750, 999)] == [0, 50, 99, 50, 0]
    shapes = {"matrix": (1024, 256), "embedding": (1000, 256), "head": (8, 256), "bias": (256,), "column": (256, 1)}
    densities = harmodt.erk_densities(shapes, 0.8)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    assert sum(densities[name] * sizes[name] for name in shapes) == pytest.approx(0.8 * sum(sizes.values()))
    assert densities["bias"] == densities["column"] == densities["head"] == 1.0
    assert densities["matrix"] / densities["embedding"] == pytest.approx((1280 / (1024 * 256)) / (1256 / (1000 * 256)))


def test_harmodt_step_updates_each_task_inside_its_mask_only(small_data):
    config = Config(**SIZE)
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 4, torch.device("cpu"), seeds=[0])
    torch.manual_seed(0)
    model, trainable = harmodt.build(config, None)
    hooks = harmodt.hooks(model, sampler, config, total_steps=100)
    parameters = list(trainable.values())
    optimizer = build_optimizer(parameters, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(1))
    task = torch.tensor([3])
    before = torch.cat([p.detach().flatten() for p in parameters])
    up_before = trainable["blocks.0.mlp.up.weight"].detach().clone()
    train_step(model, sampler.sample(task), 1, optimizer, scheduler, parameters, 0.25, False,
               Precision(torch.device("cpu"), "fp32"), hooks, task)
    after = torch.cat([p.detach().flatten() for p in parameters])
    mask = hooks.masks[3]
    assert torch.equal(after[~mask], before[~mask])  # masked-out entries untouched, the zeroing undone
    up_mask = dict((name, view) for name, _, view in harmodt.mask_views(model, mask))["blocks.0.mlp.up.weight"]
    up_after = trainable["blocks.0.mlp.up.weight"].detach()
    assert 0.5 < up_mask.float().mean() < 0.95 and (up_after != up_before)[up_mask].all()


def test_harmodt_policy_runs_each_row_with_its_tasks_masked_weights(trained, small_data):
    run, _ = trained
    policy, _ = load_baseline(run, "harmodt")
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 3, torch.device("cpu"), seeds=[0, 1])
    batch = sampler.sample(torch.tensor([1, 4]))
    together = policy(batch)
    for rows, task in ((slice(0, 3), 1), (slice(3, 6), 4)):
        plain = build_model(Config(**SIZE), 0.0).eval()
        plain.load_state_dict({name: value.detach() for name, value in policy.masked_parameters(task).items()})
        part = type(batch)(**{key: value[rows] for key, value in vars(batch).items()})
        torch.testing.assert_close(together[rows], plain(part), rtol=0, atol=0)
    assert not torch.equal(policy.masked_parameters(1)["blocks.0.mlp.up.weight"],
                           policy.masked_parameters(4)["blocks.0.mlp.up.weight"])


def test_top_k_entries_breaks_ties_at_random_among_candidates():
    scores = torch.tensor([5.0, 1.0, 1.0, 1.0, 9.0, 1.0])
    candidates = torch.tensor([True, True, True, True, False, True])
    picks = {tuple(sorted(harmodt.top_k_entries(scores, candidates, 2, torch.Generator().manual_seed(seed)).tolist()))
             for seed in range(20)}
    assert all(pick[0] == 0 and pick[1] in (1, 2, 3, 5) for pick in picks) and len(picks) > 1


def test_gradient_conflict_logged_plotted_and_training_unchanged(trained, small_data, tmp_path):
    run, _ = trained
    records = [json.loads(line) for line in (run.stage1 / "metrics.jsonl").read_text().splitlines()]
    measured = [record for record in records if "conflict_share" in record]
    assert [record["step"] for record in measured] == [15, 30] and measured[0]["conflict_tasks"] == 4
    assert all(0 <= r["conflict_share"] <= 1 and -1 <= r["conflict_mean_cosine"] <= 1 for r in measured)
    assert (run.stage1 / "gradient_conflict.png").stat().st_size > 10_000
    # the same stage 1 without the measurement ends with the same weights
    train_backbone(Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), run_dir=str(tmp_path), max_iters=30,
                          log_every=10, **SIZE))
    plain = load_file(tmp_path / "stage1" / "backbone.safetensors")
    measured_run = load_file(run.backbone)
    assert all(torch.equal(plain[name], measured_run[name]) for name in plain)


def test_conflict_measures_on_known_gradients():
    gradients = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    # pairs: (0,1) 0, (0,2) -1, (0,3) .707, (1,2) 0, (1,3) .707, (2,3) -.707
    measures = conflict_measures(gradients)
    assert measures["conflict_share"] == pytest.approx(2 / 6)
    assert measures["conflict_mean_cosine"] == pytest.approx((-1 + 2 * 0.5 ** 0.5 - 0.5 ** 0.5) / 6)


def test_dense_configs_match_m3dt_parameter_counts():
    paper = Config()
    for experts, path in dense_configs().items():
        dense = parameter_count(Config(**load_yaml(str(path))))
        assert abs(dense / parameter_count(paper, experts) - 1) < 0.01, path
    assert set(dense_configs()) == {8, 16, 24, 32, 40, 48}


def test_harmodt_checkpoint_state_restores_masks_and_tie_breaking(small_data):
    config = Config(**SIZE)
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 4, torch.device("cpu"), seeds=[0])
    model, _ = harmodt.build(config, None)
    hooks = harmodt.hooks(model, sampler, config, total_steps=100)
    hooks.swap(torch.randn(len(SMALL_TASKS), hooks.masks.shape[1]), 7)
    state = hooks.state_dict()
    resumed = harmodt.hooks(model, sampler, Config(**SIZE, seed=5), total_steps=100)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.masks, hooks.masks)
    assert torch.equal(torch.rand(3, generator=resumed.generator), torch.rand(3, generator=hooks.generator))


def test_conflict_plot_without_any_conflict_says_so(tmp_path, monkeypatch):
    """Every share 0: the % axis spanned -0.04..0.04, the steps ticked 12.5, and the title named a "highest share"."""
    import matplotlib.pyplot as plt

    from m3dt.conflict import plot_conflict

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "conflict_share": 0.0, "conflict_mean_cosine": 0.3,
                                           "conflict_tasks": 4}) + "\n" for step in (10, 15, 20)))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_conflict(metrics, tmp_path / "conflict.png")
    top, bottom = figures[0].axes
    assert top.get_title().endswith("(no task pair in conflict at any measured step)")
    assert top.get_ylim() == (0.0, 5.0) and all(tick == int(tick) for tick in bottom.get_xticks())
    assert (tmp_path / "conflict.png").stat().st_size > 10_000

"""The bench's two paths (m3dt/bench.py) do the same math: the naive numpy sampler builds the device
sampler's batch for the same draws, and from the same weights and batches the project's step and the
reference-style step give the same losses and the same updated weights. Nothing here is timed."""

import json
import os
import re

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from m3dt import bench
from m3dt.config import Config
from m3dt.data import Batch, DeviceSampler, TaskDataset
from m3dt.naive import NaiveSampler, naive_model, naive_optimizer, naive_train_step
from m3dt.train import Precision, build_optimizer, train_step, warmup_factor
from tests.conftest import SMALL_TASKS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(small_data):
    return TaskDataset(small_data, SMALL_TASKS)


@pytest.fixture(scope="module")
def naive_sampler(small_data):
    return NaiveSampler(small_data, SMALL_TASKS, context_length=20, batch_size=16, prompt_length=5, device=CPU, seed=0)


@pytest.fixture(scope="module")
def short_naive_sampler(small_data, device):
    """Fewer, shorter rows for the training-step comparison, to keep the float64 router cheap."""
    return NaiveSampler(small_data, SMALL_TASKS, context_length=8, batch_size=4, prompt_length=5, device=device, seed=1)


def device_sampler_draws(dataset: TaskDataset, seed: int, task: int) -> list[tuple[int, int]]:
    """(episode within the task, start within the episode) of each row the device sampler draws from a
    stream seeded with `seed`, recomputed with the sampler's own arithmetic."""
    uniform = torch.rand(16, generator=torch.Generator().manual_seed(seed))
    starts = (dataset.task_offsets[task] + (uniform * torch.tensor(dataset.task_sizes[task])).long()).numpy()
    episodes = np.searchsorted(dataset.episode_starts, starts, side="right") - 1
    first = np.searchsorted(dataset.episode_starts, dataset.task_offsets[task])
    return [(int(episode - first), int(start - dataset.episode_starts[episode]))
            for episode, start in zip(episodes, starts)]


@pytest.mark.parametrize("task", range(len(SMALL_TASKS)))
def test_naive_sampler_builds_the_device_samplers_batch(dataset, naive_sampler, task):
    seed = 10 + task
    device_batch = DeviceSampler(dataset, 20, 16, CPU, seeds=[seed]).sample(torch.tensor([task]))
    naive_batch = naive_sampler.build(task, device_sampler_draws(dataset, seed, task))
    assert (naive_batch.mask == 0).any()  # some rows are left-padded, so padding is compared too
    for key, expected in vars(device_batch).items():
        torch.testing.assert_close(getattr(naive_batch, key), expected, rtol=1e-5, atol=1e-5, msg=key)


def test_naive_draws_follow_episode_lengths(naive_sampler):
    """Episodes in proportion to their length, starts uniform within them: every start is in range."""
    task = SMALL_TASKS.index("ant-dir-2")  # the one family with episodes of different lengths
    lengths = [episode.rewards.shape[0] for episode in naive_sampler.tasks[task].episodes]
    draws = [draw for _ in range(300) for draw in naive_sampler.draw(task)]
    assert all(0 <= start < lengths[episode] for episode, start in draws)
    shares = np.bincount([episode for episode, _ in draws], minlength=len(lengths)) / len(draws)
    np.testing.assert_allclose(shares, np.array(lengths) / sum(lengths), atol=0.04)


def double(batch: Batch) -> Batch:
    return Batch(**{key: value.double() if value.is_floating_point() else value for key, value in vars(batch).items()})


@pytest.mark.device
@pytest.mark.parametrize("stage, experts", [(1, 0), (2, 1), (3, 3)])
def test_fast_and_naive_steps_agree(short_naive_sampler, stage, experts, device):
    # Dropout off: the two paths draw their dropout masks in a different order. A tight clip so that
    # clipping acts at every step.
    config = Config(embed_dim=32, n_layer=2, n_head=4, router_hidden="64,32", dropout=0.0, learning_rate=1e-3,
                    warmup_steps=2, grad_clip=1e-3)
    case = bench.Case("test", stage, [[0]], experts=experts)
    torch.manual_seed(stage)
    fast, trainable = bench.case_model(case, config)
    fast.double().to(device)
    with torch.no_grad():
        for name, parameter in fast.named_parameters():
            if "_bias" in name:  # non-zero expert biases, so that converting them is checked too
                parameter.normal_(std=0.1)
    naive = naive_model(fast)
    initial = [parameter.detach().clone() for parameter in trainable.values()]

    fast_parameters = list(trainable.values())
    fast_optimizer = build_optimizer(fast_parameters, config)
    fast_scheduler = LambdaLR(fast_optimizer, warmup_factor(config.warmup_steps))
    naive_parameters = [parameter for parameter in naive.parameters() if parameter.requires_grad]
    naive_optimizer_ = naive_optimizer(naive_parameters, config.learning_rate, config.weight_decay)
    naive_scheduler = LambdaLR(naive_optimizer_, warmup_factor(config.warmup_steps))
    assert sum(p.numel() for p in fast_parameters) == sum(p.numel() for p in naive_parameters)

    for step in range(3):
        task = step % len(SMALL_TASKS)
        batch = double(short_naive_sampler.sample(task))
        fast_loss, _ = train_step(fast, batch, 1, fast_optimizer, fast_scheduler, fast_parameters,
                                  config.grad_clip, per_expert_clip=stage == 2, precision=Precision(device, "fp32"))
        naive_loss = naive_train_step(naive, batch, short_naive_sampler.act_dim(task), naive_optimizer_,
                                      naive_scheduler, naive_parameters, config.grad_clip)
        # Float64 models, but the project's step computes the loss from `predicted.float()` (for bf16
        # autocast): agreement is to float32 rounding of the predictions. Adam's first steps move every
        # weight by about +-lr whatever its gradient's size, so weights agree to a small fraction of lr.
        assert fast_loss.item() == pytest.approx(naive_loss, rel=1e-7)

    updated, reference = naive_model(fast).state_dict(), naive.state_dict()
    assert updated.keys() == reference.keys()
    for key in updated:
        torch.testing.assert_close(updated[key], reference[key], rtol=1e-7, atol=1e-5 * config.learning_rate,
                                   msg=lambda message: f"{key}: {message}")
    assert all(not torch.equal(before, after) for before, after in zip(initial, fast_parameters))


@pytest.mark.parametrize("path", ["naive", "fast"])
def test_training_flops_count_each_gradient_once(path):
    """Stage 1 trains everything: 3x forward, less the embeddings' input gradients (their inputs are data).
    Stage 3 adds 2x for frozen layers the gradient passes through and 1x below every router."""
    config = Config(embed_dim=32, n_layer=2, n_head=4)
    work = bench.case_work(bench.Case("", 1, [[0]]), config, rows=16, path=path)
    with torch.device("meta"):
        model, _ = bench.case_model(bench.Case("", 1, [[0]]), config)
    embeddings = sum(part.flops() for part in bench.model_matmuls(model, 16, 20, 5, read=20)[:6])
    assert work.train_flops == pytest.approx(3 * work.forward_flops - embeddings)
    work = bench.case_work(bench.Case("", 3, [[0]], experts=4), config, rows=16, path=path)
    assert 1 * work.forward_flops < work.train_flops < 2.5 * work.forward_flops


@pytest.mark.parametrize("last_step_only", [False, True])
def test_fast_path_counts_its_last_block_on_the_read_tokens_only(last_step_only):
    """The naive path's last block computes all 3(K+P) tokens per row, the fast one the K (or 1) read
    state tokens: the difference is the projection, Q K^T and P V, and the MLP over the others."""
    config = Config(embed_dim=32, n_layer=2, n_head=4)
    rows, width, length = 16, 32, 3 * (20 + 5)
    read = 1 if last_step_only else 20
    naive = bench.case_work(bench.Case("", 1, [[0]]), config, rows, "naive", last_step_only).forward_flops
    fast = bench.case_work(bench.Case("", 1, [[0]]), config, rows, "fast", last_step_only).forward_flops
    per_token = 2 * (width * width + 2 * length * width + 2 * width * 4 * width)  # projection, attention, MLP
    assert naive - fast == rows * (length - read) * per_token


def test_prompt_cache_counts_no_work_for_the_prompt_tokens():
    """With the prompt's keys and values cached, an evaluation forward skips the prompt embedding, the 15
    prompt tokens' QKV in every block, and their projection, attention and MLP in every block but the last
    (which computes only the one read token either way)."""
    config = Config(embed_dim=32, n_layer=3, n_head=4, router_hidden="64,32")
    rows, width, layers, length, prompt_tokens = 16, 32, 3, 75, 15
    case = bench.Case("", 3, [[0]], experts=2)
    full, cached = (bench.case_work(case, config, rows, "fast", last_step_only=True, cached_prompt=cached).forward_flops
                    for cached in (False, True))
    embedding = 2 * rows * 5 * (1 + 39 + 8) * width
    qkv, rest = 2 * width * 3 * width, 2 * width * width + 2 * 2 * length * width + 2 * 2 * width * 4 * width
    experts_and_router = 2 * 2 * 2 * width * 4 * width + 2 * (width * 64 + 64 * 32 + 32 * 2)
    per_token = layers * qkv + (layers - 1) * (rest + experts_and_router)
    assert full - cached == embedding + rows * prompt_tokens * per_token


def test_bytes_count_weights_once_per_forward_and_the_optimiser_passes():
    """A forward reads each weight once whatever the row count, and its activations grow with the rows:
    2 x bytes(1 row) - bytes(2 rows) is exactly the weights. A stage-2 step adds 10 passes over the
    trainable (expert) values to its products' traffic."""
    config = Config(embed_dim=32, n_layer=2, n_head=4, router_hidden="64,32")
    case = bench.Case("", 3, [[0]], experts=4)
    one, two = (bench.case_work(case, config, rows, "fast", last_step_only=True).forward_bytes for rows in (1, 2))
    with torch.device("meta"):
        model, _ = bench.case_model(case, config)
    weights = sum(layer.weight.numel() for layer in model.modules() if isinstance(layer, torch.nn.Linear))
    weights += sum(block.expert_mixture.experts.up_weight.numel() + block.expert_mixture.experts.down_weight.numel()
                   for block in model.blocks)
    assert 2 * one - two == 4 * weights
    stage2 = bench.case_work(bench.Case("", 2, [[0]], experts=1), config, rows=16, path="fast")
    with torch.device("meta"):
        model, trainable = bench.case_model(bench.Case("", 2, [[0]], experts=1), config)
    products = sum(part.bytes() * part.passes() for part in bench.model_matmuls(model, 16, 20, 5, read=20))
    trainable_values = sum(value.numel() for value in trainable.values())
    assert stage2.train_bytes == products + 10 * 4 * trainable_values


def test_floor_is_set_by_the_slower_of_arithmetic_and_memory():
    assert bench.time_floor(2e12, 1e9, peak_tflops=1.0, bandwidth=1000.0) == (2000.0, "FLOPs")  # 2 s vs 1 ms
    assert bench.time_floor(1e9, 1e12, peak_tflops=1.0, bandwidth=1000.0) == (1000.0, "bytes")  # 1 ms vs 1 s


def test_ceilings_take_the_fastest_window_and_training_rows_the_median(monkeypatch):
    """time_paths hands the statistic one time per window (one call per window on the CPU): the matmul
    peak and copy bandwidth take the fastest, training rows the median. Clock readings are scripted: the
    path's calls take 3, 1, 2 ms."""
    durations = iter([0.003, 0.001, 0.002])
    clock = [0.0]

    def perf_counter() -> float:
        return clock[0]

    def call(_: int) -> None:
        clock[0] += next(durations)

    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    cpu = torch.device("cpu")
    assert bench.time_paths({"path": call}, warmup=0, steps=3, device=cpu, statistic=min)["path"] == pytest.approx(1.0)
    durations = iter([0.003, 0.001, 0.002])
    assert bench.time_paths({"path": call}, warmup=0, steps=3, device=cpu)["path"] == pytest.approx(2.0)


def test_bench_runs_end_to_end_with_tiny_settings(tmp_path):
    report = bench.main(["--quick", "--device", "cpu", "--embed_dim", "16", "--n_layer", "1", "--n_head", "2",
                         "--tasks", "4", "--groups", "2", "--experts", "2", "--eval_rows", "4", "--steps", "1",
                         "--warmup", "0", "--env_rollouts", "4", "--env_steps", "2", "--out", str(tmp_path)])
    stages = {(row["stage"], row["path"]) for row in report["training"]}
    assert {("stage 1: backbone", "naive"), ("stage 2: all 2 experts in one step", "fast"),
            ("stage 3: routers, E=2", "fast")} <= stages
    assert all(row["ms_per_step"] > 0 for row in report["training"])
    markdown = (tmp_path / f"{report['device']}.md").read_text()
    assert "| stage 3: routers, E=2 | naive |" in markdown and "## Evaluation: policy forwards" in markdown
    # each path's own FLOPs ratio scales its stage 3 to the paper's E=48 (the naive path counts more FLOPs)
    assert re.search(r"Note: stage 3 scaled by FLOPs from E=2 to E=48 \(naive: x[\d.]+, fast: x[\d.]+\)\.", markdown)
    # env stepping: one worker and one per CPU, 4 rollouts x 2 timed steps each, at some positive rate
    assert [row["workers"] for row in report["env_stepping"]] == sorted({1, os.cpu_count()})
    assert all(row["rollouts"] == 4 and row["env_steps_per_second"] > 0 for row in report["env_stepping"])
    assert "| workers | rollouts | env steps/s |" in markdown
    assert json.loads((tmp_path / f"{report['device']}.json").read_text())["projection"][1]["path"] == "fast"


def test_bench_keeps_its_measurements_when_the_env_workers_fail(tmp_path, monkeypatch):
    """A machine without the simulators (a lent GPU, say) still gets its training and forward tables."""

    def no_simulator(settings):
        raise ModuleNotFoundError("No module named 'metaworld'")

    monkeypatch.setattr(bench, "measure_env_stepping", no_simulator)
    report = bench.main(["--quick", "--device", "cpu", "--embed_dim", "16", "--n_layer", "1", "--n_head", "2",
                         "--tasks", "2", "--groups", "2", "--experts", "2", "--eval_rows", "2", "--steps", "1",
                         "--warmup", "0", "--out", str(tmp_path)])
    assert report["training"] and report["evaluation"] and report["env_stepping"] == []
    markdown = (tmp_path / f"{report['device']}.md").read_text()
    assert "Not measured: ModuleNotFoundError: No module named 'metaworld'." in markdown


def test_the_gpu_check_page_of_several_runs_gives_the_plain_fp32_figures(tmp_path, monkeypatch):
    """scripts/gpu_check.sh combines its bench runs into one {device}.json (a list of reports): the grid's
    cost estimates (m3dt.experiment) read its fp32 run without compile; combining into one of the runs' own
    folders is refused."""
    from m3dt.experiment import load_benches

    monkeypatch.setattr(bench, "measure_env_stepping", lambda settings: [])
    report = bench.main(["--quick", "--device", "cpu", "--embed_dim", "16", "--n_layer", "1", "--n_head", "2",
                         "--tasks", "2", "--groups", "2", "--experts", "2", "--eval_rows", "2", "--steps", "1",
                         "--warmup", "0", "--out", str(tmp_path / "measured")])
    for index, precision in enumerate(("bf16", "fp32")):  # the bf16 run first, its step times doubled
        run = {**report, "settings": {**report["settings"], "precision": precision},
               "peak_tflops": {**report["peak_tflops"], precision: 1.0},
               "training": [{**row, "ms_per_step": row["ms_per_step"] * (2 - index)} for row in report["training"]]}
        (tmp_path / precision).mkdir()
        (tmp_path / precision / f"{report['device']}.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="is one of the runs' folders"):
        bench.combine([str(tmp_path / "bf16"), str(tmp_path / "fp32"), "--out", str(tmp_path / "bf16")])
    bench.combine([str(tmp_path / "bf16"), str(tmp_path / "fp32"), "--out", str(tmp_path / "page")])
    assert len(json.loads((tmp_path / "page" / f"{report['device']}.json").read_text())) == 2
    (combined,) = load_benches(tmp_path / "page")
    (measured,) = load_benches(tmp_path / "measured")
    assert combined.training == measured.training  # the fp32 run's figures, not the bf16 run's doubled ones
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cpu.json").write_text('{"device": ')
    with pytest.raises(SystemExit, match=r"^error: .*broken/cpu.json: bench report is not valid JSON"):
        bench.combine([str(tmp_path / "fp32"), str(tmp_path / "broken"), "--out", str(tmp_path / "page2")])
    (tmp_path / "broken" / "cpu.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"broken/cpu.json: not a bench report of python -m m3dt.bench \(no 'device'\)"):
        bench.combine([str(tmp_path / "fp32"), str(tmp_path / "broken"), "--out", str(tmp_path / "page2")])


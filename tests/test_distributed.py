"""Stages 1 and 3 under torchrun: 2 CPU processes with the gloo backend, each loading half of the tasks; the
stage-1 gradient-conflict measure gathered from both."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from m3dt.config import Config
from m3dt.conflict import GradientConflict, spread_tasks
from m3dt.data import DeviceSampler, TaskDataset
from m3dt.model import build_model, set_up_stage
from m3dt.stages import data_stats, make_sampler
from tests.conftest import REPO, SMALL_TASKS
from tests.test_pipeline import TINY, run_stage


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)
    assert result.returncode == 0, f"{script} under torchrun failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_stage1_and_stage3_under_torchrun(small_data, tmp_path):
    common = [*TINY, "--data_path", str(small_data), "--run_dir", str(tmp_path)]
    result = torchrun("stage1_backbone_train.py", "--tasks", ",".join(SMALL_TASKS), "--max_iters", "60", *common)
    # each rank loads only its half of the tasks; rank 0 still writes every task's statistics, in task order
    assert all(result.stdout.count(f"rank {rank}: loaded {len(SMALL_TASKS) // 2} tasks") == 1 for rank in (0, 1))
    assert all(result.stdout.count(f"rank {rank}: memory plan: peak") == 1 for rank in (0, 1))
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 16, torch.device("cpu"), [0])
    expected = data_stats(sampler.state_mean, sampler.state_std, sampler.prompts)
    written = load_file(tmp_path / "stage1" / "data_stats.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[key], expected[key]) for key in expected)
    manifest = json.loads((tmp_path / "stage1" / "backbone.manifest.json").read_text())
    assert manifest["identity"]["world_size"] == 2 and manifest["steps_done"] == 60
    steps = [json.loads(line)["step"] for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [20, 40, 60]  # one log, written by rank 0 only
    state = torch.load(tmp_path / "stage1" / "train_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["sampler"][0], state["rng"][1]["sampler"][0])

    # resumed under torchrun (each rank restores its own RNG streams): 40 steps, then on to 60, ends with the
    # weights of the uninterrupted 60-step run, bit for bit
    resumed_dir = tmp_path / "resumed"
    resumed = [*TINY, "--data_path", str(small_data), "--run_dir", str(resumed_dir), "--tasks", ",".join(SMALL_TASKS)]
    torchrun("stage1_backbone_train.py", "--max_iters", "40", *resumed)
    assert "resuming from step 40" in torchrun("stage1_backbone_train.py", "--max_iters", "60", *resumed).stdout
    expected, weights = (load_file(run / "stage1" / "backbone.safetensors") for run in (tmp_path, resumed_dir))
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())

    run_stage("stage2_task_grouping_random.py", "--group_num", "2", *common)
    run_stage("stage2_expert_train.py", "--expert_num", "2", "--grouping", "random", "--all", "--max_iters", "10", *common)
    torchrun("stage3_router_train.py", "--expert_num", "2", "--grouping", "random", "--max_iters", "20", *common)
    moe = load_file(tmp_path / "stage3" / "random_2" / "moe.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in moe.values())

    # the same command again: finished under the same world size
    again = torchrun("stage3_router_train.py", "--expert_num", "2", "--grouping", "random", "--max_iters", "20", *common)
    assert "already finished" in again.stdout


def test_gradient_conflict_under_torchrun_covers_every_ranks_tasks(small_data, tmp_path):
    """Under torchrun the conflict measure gathers the chosen tasks from both ranks' shares: at the last step it
    equals the measure one process computes on the same weights (no dropout, so the gradients do not depend on
    a rank's dropout stream; the batches of each task come from its own (seed, step, task) stream)."""
    torchrun("stage1_backbone_train.py", *TINY, "--data_path", str(small_data), "--run_dir", str(tmp_path),
             "--tasks", ",".join(SMALL_TASKS), "--max_iters", "20", "--dropout", "0", "--conflict_every", "20",
             "--conflict_tasks", "4", "--conflict_batches", "2")
    logged = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    measured = [record for record in logged if "conflict_share" in record]
    assert [record["step"] for record in measured] == [20] and measured[0]["conflict_tasks"] == 4

    config = Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), embed_dim=32, n_layer=2, n_head=2,
                    dropout=0.0, device="cpu")
    model = build_model(config, 0.0)
    model.load_state_dict(load_file(tmp_path / "stage1" / "backbone.safetensors"))
    set_up_stage(model, stage=1)
    sampler, _ = make_sampler(config, SMALL_TASKS, torch.device("cpu"), [0], model)
    chosen = spread_tasks(len(SMALL_TASKS), 4)
    assert sorted(task % 2 for task in chosen) == [0, 0, 1, 1]  # both ranks hold chosen tasks
    one_process = GradientConflict(model, sampler, chosen, 20, 2, config.grad_clip, config.seed).after_step(20)
    assert one_process["conflict_mean_cosine"] == pytest.approx(measured[0]["conflict_mean_cosine"], abs=1e-5)
    assert one_process["conflict_share"] == measured[0]["conflict_share"]

"""The evaluator end to end on a tiny run directory, one task of each family, short horizon."""

import json

import numpy as np
import pytest
import torch

from m3dt.config import Config
from m3dt.evaluate import ModelPolicy, Rollout, evaluate, load_policy, load_statistics, main, run_rollouts
from m3dt.run import RunDir
from m3dt.stages import train_backbone
from m3dt.tasks import get_task
from tests.conftest import SMALL_TASKS

ONE_PER_FAMILY = ["reach-v2", "walker-walk", "ant-dir-2", "cheetah-vel-8"]


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_run")
    config = Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), run_dir=str(run_dir), embed_dim=32,
                    n_layer=2, n_head=2, max_iters=3, log_every=1, device="cpu")
    train_backbone(config)
    return run_dir


def test_evaluate_cli_writes_results_table_and_plots(tiny_run, capsys):
    main(["--run_dir", str(tiny_run), "--stage", "1", "--tasks", ",".join(ONE_PER_FAMILY), "--episodes", "2",
          "--max_steps", "8", "--workers", "2", "--device", "cpu"])
    out_dir = tiny_run / "eval" / "stage1"
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results["tasks"]) == ONE_PER_FAMILY
    assert set(results["families"]) == {"metaworld", "dmc", "ant_dir", "cheetah_vel"}
    for row in results["tasks"].values():
        assert row["episodes"] == 2 and row["steps_mean"] == 8 and np.isfinite(row["score"])
    assert results["total"]["score"] == pytest.approx(np.mean([row["score"] for row in results["tasks"].values()]))
    assert (out_dir / "results.csv").read_text().count("\n") == 5
    assert all((out_dir / f"scores_{family}.png").stat().st_size > 1000 for family in results["families"])
    assert "| **total** | 4 |" in capsys.readouterr().out


def test_batched_and_one_at_a_time_rollouts_agree(tiny_run):
    run = RunDir(tiny_run)
    model, manifest = load_policy(run, "prompt-dt", "gradient", 0)
    model.double()
    statistics = load_statistics(run.data_stats)
    trained = manifest["tasks"]
    rollouts = [Rollout(get_task(name), trained.index(name), episode) for name in ONE_PER_FAMILY for episode in (0, 1)]

    def rollout_outcome(selection):
        policy = ModelPolicy(model, statistics, selection, 20, torch.device("cpu"), torch.float64)
        return run_rollouts(policy, statistics, selection, seed=0, workers=0, max_steps=25)

    together = rollout_outcome(rollouts)
    for index, rollout in enumerate(rollouts):
        alone = rollout_outcome([rollout])
        np.testing.assert_array_equal(alone["actions"][0], together["actions"][index, : alone["actions"].shape[1]])
        assert alone["returns"][0] == together["returns"][index]


def test_worker_processes_do_not_change_results(tiny_run):
    first = evaluate(str(tiny_run), "1", tasks="reach-v2,pendulum-swingup", episodes=2, max_steps=6, workers=0, device="cpu")
    second = evaluate(str(tiny_run), "1", tasks="reach-v2,pendulum-swingup", episodes=2, max_steps=6, workers=3, device="cpu")
    assert first["tasks"] == second["tasks"]


def test_waves_give_the_same_results(tiny_run):
    tasks = "reach-v2,walker-walk,cheetah-vel-8"
    at_once = evaluate(str(tiny_run), "1", tasks=tasks, episodes=2, max_steps=6, workers=0, device="cpu")
    in_waves = evaluate(str(tiny_run), "1", tasks=tasks, episodes=2, max_steps=6, workers=0, device="cpu", max_rollouts=4)
    for name, row in at_once["tasks"].items():  # float32 forwards over 6 or 4 rows round differently
        assert in_waves["tasks"][name]["return_mean"] == pytest.approx(row["return_mean"], rel=1e-5)
        assert in_waves["tasks"][name]["episodes"] == row["episodes"]


def test_random_policy_baseline(tiny_run):
    results = evaluate(str(tiny_run), "random", tasks="reach-v2,cheetah-vel-8", episodes=2, max_steps=6, workers=0)
    assert results["method"] == "random policy"
    assert (tiny_run / "eval" / "random" / "results.json").exists()


def test_unknown_stage_artifact_is_a_clear_error(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--run_dir", str(tiny_run), "--stage", "3", "--expert_num", "7"])
    assert exit_info.value.code == 2
    assert "moe.safetensors: M3DT model does not exist" in capsys.readouterr().err

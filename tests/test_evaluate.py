"""The evaluator end to end on a tiny run directory, one task of each family, short horizon; what its outputs
say; the context it keeps; failures as one line; goals shared with the training data."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from m3dt.collect import collect, mt1_goal_blocks
from m3dt.config import Config, parse_config
from m3dt.report import build_report
from m3dt.envs import TaskEnv
from m3dt.demo import side_by_side
from m3dt.evaluate import (EnvFailure, ModelPolicy, RandomPolicy, Rollout, describe_settings, evaluate, load_policy,
                           load_statistics, main, run_rollouts)
from m3dt.run import RunDir, file_hash
from m3dt.scores import episode_score, full_episode_return
from m3dt.stages import train_backbone
from m3dt.tasks import get_task
from tests.conftest import REPO, SMALL_TASKS

ONE_PER_FAMILY = ["reach-v2", "walker-walk", "ant-dir-2", "cheetah-vel-8"]


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_run")
    config = Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), run_dir=str(run_dir), embed_dim=32,
                    n_layer=2, n_head=2, max_iters=3, log_every=1, device="cpu")
    train_backbone(config)
    return run_dir


def test_evaluate_cli_takes_a_config_file_and_labels_a_short_evaluation_everywhere(tiny_run, tmp_path, capsys):
    config_file = tmp_path / "eval.yaml"  # the stages' format; flags win over it
    config_file.write_text(f"run_dir: {tiny_run}\ntasks: {','.join(ONE_PER_FAMILY)}\neval_episodes: 2\n"
                           "eval_max_steps: 30\nworkers: 2\ndevice: cpu\nembed_dim: 32\n")
    main(["--config", str(config_file), "--stage", "1", "--max_steps", "8"])
    # 4 of the run's 6 tasks, a quick check: it overwrites neither eval/stage1 nor an evaluation of all tasks
    names = hashlib.sha256(" ".join(ONE_PER_FAMILY).encode()).hexdigest()[:6]
    out_dir = tiny_run / "eval" / f"stage1_tasks4-{names}_episodes2_steps8"
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results["tasks"]) == ONE_PER_FAMILY
    assert set(results["families"]) == {"metaworld", "dmc", "ant_dir", "cheetah_vel"}
    for row in results["tasks"].values():
        assert row["episodes"] == 2 and row["steps_mean"] == 8 and row["max_steps"] == 8 and np.isfinite(row["score"])
        assert row["full_protocol"] is False
    assert results["total"]["score"] == pytest.approx(np.mean([row["score"] for row in results["tasks"].values()]))
    backbone = tiny_run / "stage1" / "backbone.safetensors"
    assert results["checkpoint"] == {"path": "stage1/backbone.safetensors", "sha256": file_hash(backbone)}
    assert (results["method"], results["method_id"], results["grouping"], results["num_experts"]) == ("Prompt-DT", "prompt-dt", None, 0)
    assert results["seed"] == 0 and results["context_actions"] == "full"
    assert results["protocol"] == {
        "full": False, "episodes": 2, "max_steps": 8,
        "note": "Not the full evaluation protocol: 2 episode(s) per task instead of the protocol's (Meta-World 10, "
                "DMC 10, ant-dir 1, cheetah-vel 1); episodes cut at 8 of 200/500 steps (returns of cut episodes scaled by horizon / 8 "
                "before normalisation, an extrapolation that is high where reward comes early, as in a task that starts "
                "balanced; Meta-World success within 8 steps)."}
    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    assert len(rows) == 4 and {row["full_protocol"] for row in rows} == {"False"} and rows[0]["max_steps"] == "8"
    assert {row["seed"] for row in rows} == {"0"}
    printed = capsys.readouterr().out
    for text in (printed, (out_dir / "table.md").read_text()):
        assert "**Not the full evaluation protocol: 2 episode(s) per task" in text
        assert "| **total** | 4 |" in text and "| family | tasks | Prompt-DT (not full protocol): score |" in text
        assert "metaworld: success rate (%); dmc: return / 10; ant_dir: clip(return / 5, 0, 100)" in text
        assert "4 task(s), 2 episode(s)/task, at most 8 steps, seed 0," in text
    assert all((out_dir / f"scores_{family}.png").stat().st_size > 1000 for family in results["families"])
    # the demo's closing table says the same about the three policies it compares
    demo_table = side_by_side({"random policy": results, "Prompt-DT (stage 1)": results})
    assert demo_table.startswith(f"Evaluated with run {tiny_run.name}, 4 task(s), 2 episode(s)/task, at most 8 steps, "
                                 "seed 0, context actions full.")
    assert "| metaworld | " in demo_table and "metaworld: success rate (%)" in demo_table
    assert demo_table.endswith(results["protocol"]["note"])
    # a full-protocol evaluation gives its episode counts (the protocol's differ by family)
    full = {**results, "protocol": {"full": True, "episodes": None, "max_steps": None, "note": None}}
    mixed = {**full, "tasks": {**results["tasks"], "ant-dir-2": {**results["tasks"]["ant-dir-2"], "episodes": 1}}}
    assert "4 task(s), 1-2 episode(s)/task (the protocol's), full horizons" in describe_settings(mixed)
    # a family's plot says what it shows: its own tasks and episodes
    assert "1 task(s), 1 episode(s)/task (the protocol's), full horizons" in describe_settings(mixed, "ant_dir")
    assert side_by_side({"random policy": full}).endswith("Full evaluation protocol.")
    # the random policy reads no context: its settings do not name the context's actions; the demo's table
    # takes them from the learned policy beside it
    random = {**results, "method_id": "random", "method": "random policy"}
    assert describe_settings(random).endswith("seed 0") and "context actions" not in describe_settings(random)
    assert "seed 0, context actions full." in side_by_side({"random policy": random, "Prompt-DT (stage 1)": results})


def test_random_policy_cut_short_on_cheetah_vel_is_scored_on_the_full_episode_scale(tiny_run):
    """A random policy at --max_steps 20 scored 100.00 on cheetah-vel: the 200-step thresholds (-100, -30)
    applied to a 20-step return. Normalised per allowed step it scores what full episodes give, 0."""
    cut = evaluate(str(tiny_run), "random", tasks="cheetah-vel-8", max_steps=20, workers=0)["tasks"]["cheetah-vel-8"]
    full = evaluate(str(tiny_run), "random", tasks="cheetah-vel-8", workers=0)["tasks"]["cheetah-vel-8"]
    assert -30 < cut["return_mean"] < 0  # above -30: the unscaled normalisation gives 100
    assert episode_score("cheetah_vel", [cut["return_mean"]], [False]) == 100.0
    assert cut["score"] == full["score"] == 0.0 and full["return_mean"] < -100
    assert not cut["full_protocol"] and full["full_protocol"]
    assert cut["episode_steps"] == [20] and cut["episode_ended"] == [False]
    assert full_episode_return(-5.0, 20, 200, ended=False) == -50.0  # cut: per allowed step
    assert full_episode_return(-5.0, 20, 200, ended=True) == -5.0  # ended by the env: complete
    assert full_episode_return(-5.0, 200, 200, ended=False) == -5.0


def test_context_holds_the_full_predicted_action_unless_masked(tiny_run, monkeypatch):
    """The reference stores all 8 predicted dims in the context; the env gets the first act_dim."""
    run = RunDir(tiny_run)
    model, manifest = load_policy(run, 1, "gradient", 0)
    model.double()
    statistics = load_statistics(run)
    rollouts = [Rollout(get_task("reach-v2"), manifest["tasks"].index("reach-v2"), 0)]  # act_dim 4
    received = []
    step = TaskEnv.step
    monkeypatch.setattr(TaskEnv, "step", lambda env, action: received.append(np.array(action)) or step(env, action))
    actions = {}
    for mode in ("full", "masked"):
        policy = ModelPolicy(model, statistics, rollouts, 20, torch.device("cpu"), torch.float64)
        actions[mode] = run_rollouts(policy, statistics, rollouts, seed=0, workers=0, max_steps=3,
                                     context_actions=mode)["actions"][0]
    assert np.abs(actions["full"][:, 4:]).min() > 1e-4  # the model's outputs beyond act_dim, kept in the context
    assert not actions["masked"][:, 4:].any()
    np.testing.assert_array_equal(actions["full"][0, :4], actions["masked"][0, :4])
    assert np.abs(actions["full"][1, :4] - actions["masked"][1, :4]).max() > 1e-7  # the second step sees them
    assert [action.shape for action in received] == [(4,)] * 6
    np.testing.assert_array_equal(np.stack(received[:3]), actions["full"][:, :4])


def test_env_failure_in_a_worker_is_one_line(tiny_run):
    statistics = load_statistics(RunDir(tiny_run))
    rollouts = [Rollout(get_task("reach-v2"), 0, episode=50)]  # MT1 has goals 0-49; evaluate() refuses this
    for workers in (0, 1):
        with pytest.raises(EnvFailure) as raised:
            run_rollouts(RandomPolicy(0), statistics, rollouts, seed=0, workers=workers, max_steps=2)
        assert str(raised.value) == ("reach-v2 episode 50: building the env failed: ValueError: reach-v2: episode 50 "
                                     "has no goal; MT1 samples 50 goals per seed (use another seed for more)")


def test_evaluation_warns_when_its_goals_are_training_goals(tmp_path, capsys):
    """The demo's old setting: data collected with seed 0 and evaluation on the MT1 goals of seed 0 (5 of the
    5 evaluation goals of reach-v2 were training goals)."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    collect(["reach-v2"], episodes=5, out=data, seed=0, noise=0.1, workers=0, max_steps=8)
    train_backbone(Config(tasks="reach-v2", data_path=str(data), run_dir=str(run_dir), embed_dim=16, n_layer=1,
                          n_head=1, max_iters=1, device="cpu", workers=0))
    capsys.readouterr()
    shared = evaluate(str(run_dir), "random", episodes=5, max_steps=2, workers=0, seed=0)["shared_goals"]
    assert shared == {"collect_json": str(data / "collect.json"), "evaluation_goals": 5, "shared": 5,
                      "tasks": {"reach-v2": 5}}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: 5 of 5 Meta-World evaluation goals are goals of the training data (1 task(s), "
                        f"{data / 'collect.json'}): the scores measure memorisation; evaluate with another --seed or "
                        "collect the data with another seed"]
    # its table and the report say it too (only the console and results.json did)
    memorised = run_dir / "eval" / "random_episodes5_steps2"
    assert "**5 of 5 Meta-World evaluation goals are goals of the training data: these scores measure memorisation.**" \
        in (memorised / "table.md").read_text()
    apart = evaluate(str(run_dir), "random", episodes=5, max_steps=2, workers=0, seed=1)["shared_goals"]
    assert apart["shared"] == 0 and "warning:" not in capsys.readouterr().err
    text = build_report([run_dir], tmp_path / "report", reps=20)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "random policy" in line]
    assert len(rows) == 2  # the memorised evaluation is a row of its own, flagged; the seed-1 one is not
    assert sum("MEMORISED goals (5 of 5 Meta-World goals trained on)" in line for line in rows) == 1
    assert "**Rows marked MEMORISED goals were evaluated on Meta-World goals" in text
    # the demo now collects on the goals of demo_collect_seed, evaluates on those of its seed
    demo = parse_config("", ["--config", str(REPO / "configs" / "demo.yaml")])
    assert all(block["seed"] != demo.seed for block in mt1_goal_blocks(demo.demo_collect_seed, demo.demo_episodes))


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


def test_random_policy_baseline_and_folders_that_never_overwrite_another_evaluation(tiny_run):
    everything = evaluate(str(tiny_run), "random", episodes=2, max_steps=6, workers=0)
    assert (everything["method"], everything["method_id"], everything["checkpoint"]) == ("random policy", "random", None)
    assert list(everything["tasks"]) == SMALL_TASKS
    # two of the run's tasks: a folder of its own, named after them (it overwrote the evaluation of all tasks)
    results = evaluate(str(tiny_run), "random", tasks="reach-v2,cheetah-vel-8", episodes=2, max_steps=6, workers=0)
    subset = f"random_tasks2-{hashlib.sha256(b'reach-v2 cheetah-vel-8').hexdigest()[:6]}_episodes2_steps6"
    assert list(json.loads((tiny_run / "eval" / subset / "results.json").read_text())["tasks"]) == ["reach-v2", "cheetah-vel-8"]
    kept = json.loads((tiny_run / "eval" / "random_episodes2_steps6" / "results.json").read_text())
    assert list(kept["tasks"]) == SMALL_TASKS
    # another --seed than the run's (0) goes to a folder of its own: both results are kept
    other = evaluate(str(tiny_run), "random", tasks="reach-v2,cheetah-vel-8", episodes=2, max_steps=6, workers=0, seed=1)
    kept = json.loads((tiny_run / "eval" / subset / "results.json").read_text())
    assert kept["seed"] == 0 and kept["tasks"] == json.loads(json.dumps(results["tasks"]))
    assert other["seed"] == 1 and other["tasks"] != results["tasks"]
    assert json.loads((tiny_run / "eval" / f"{subset}_seed1" / "results.json").read_text())["seed"] == 1


def test_a_task_the_run_does_not_know_is_named_with_the_runs_tasks(tiny_run, capsys):
    """A typo in --tasks used to point at MT160's table and the training stages' --task_table."""
    with pytest.raises(SystemExit) as stop:
        main(["--run_dir", str(tiny_run), "--stage", "1", "--tasks", "reach-v9", "--device", "cpu"])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        f"error: unknown task 'reach-v9': {tiny_run / 'stage1' / 'backbone.safetensors'} was trained on 6 tasks: "
        f"{', '.join(SMALL_TASKS)}\n")


def test_unknown_stage_artifact_is_a_clear_error(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--run_dir", str(tiny_run), "--stage", "3", "--expert_num", "7"])
    assert exit_info.value.code == 2
    assert "moe.safetensors: stage-3 model does not exist; this run has none yet" in capsys.readouterr().err
    # --expert_num defaults to the paper's 48: the message names the stage-3 models the run does have
    shutil.copytree(tiny_run / "stage1", tmp_path / "stage1")
    for name in ("gradient_2", "random_4"):
        (tmp_path / "stage3" / name).mkdir(parents=True)
        (tmp_path / "stage3" / name / "moe.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--run_dir", str(tmp_path), "--stage", "3"])
    assert capsys.readouterr().err.endswith("gradient_48/moe.safetensors: stage-3 model does not exist; this run has "
                                            "--grouping gradient --expert_num 2, --grouping random --expert_num 4\n")


def test_a_run_is_evaluated_with_its_own_training_seed_by_default(small_data, tmp_path):
    """A run trained with --seed 1, evaluated without --seed: seed 1 (its Meta-World goals, its suite lists),
    in the plain folder; --seed 0 then goes to a folder of its own."""
    train_backbone(Config(tasks="reach-v2,cheetah-vel-8", data_path=str(small_data), run_dir=str(tmp_path),
                          embed_dim=16, n_layer=1, n_head=2, max_iters=2, device="cpu", seed=1))
    main(["--run_dir", str(tmp_path), "--stage", "random", "--episodes", "1", "--max_steps", "3", "--workers", "0"])
    own = json.loads((tmp_path / "eval" / "random_episodes1_steps3" / "results.json").read_text())
    assert own["seed"] == own["training_seed"] == 1
    main(["--run_dir", str(tmp_path), "--stage", "random", "--episodes", "1", "--max_steps", "3", "--workers", "0",
          "--seed", "0"])
    other = json.loads((tmp_path / "eval" / "random_episodes1_steps3_seed0" / "results.json").read_text())
    assert other["seed"] == 0 and other["training_seed"] == 1


def test_an_evaluation_cut_while_writing_its_outputs_is_not_done(tiny_run, monkeypatch):
    """results.json was written first: an evaluation stopped before its plots counted as done, and a grid never
    drew them. It comes last now."""
    import m3dt.evaluate

    def interrupted(out_dir, results):
        raise KeyboardInterrupt

    monkeypatch.setattr(m3dt.evaluate, "plot_families", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(tiny_run), "random", tasks="reach-v2", episodes=1, max_steps=2, workers=0, seed=5)
    names = hashlib.sha256(b"reach-v2").hexdigest()[:6]
    out_dir = tiny_run / "eval" / f"random_tasks1-{names}_episodes1_steps2_seed5"
    assert (out_dir / "table.md").is_file() and not (out_dir / "results.json").exists()

"""Data collection: the MT160 layout the loader accepts, resume without loss or duplication, determinism,
expert training and resume, the scripted Meta-World experts, scores, and one-line CLI errors."""

import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.logger import configure as configure_logger

from m3dt.collect import (
    EXPERTS_DIR,
    SHIPPED_EXPERTS,
    SUMMARY_FILE,
    EpisodeJob,
    ExpertTrainingEnv,
    collect,
    collect_episode,
    collection_tasks,
    episode_env,
    is_termination,
    main,
    mt1_goal_blocks,
    print_table,
    refill_replay_buffer,
    train_expert,
)
from m3dt.data import TaskDataset, load_episode
from m3dt.envs import make_env
from m3dt.scores import episode_score
from m3dt.tasks import get_task, resolve_tasks, task_table

TASKS = ["reach-v2", "cheetah-vel-3"]
STEPS = 20


def copy_expert(source, name, target):
    """An expert's model and state file, without its replay buffer (as `experts/` ships one)."""
    target.mkdir(exist_ok=True)
    for suffix in (".zip", ".json"):
        shutil.copy(source / f"{name}{suffix}", target)


def file_fingerprints(folder):
    return {path.name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.glob("*.npz"))}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny cheetah-vel expert (training stops just past its random-action phase), then 3 short episodes
    of one Meta-World and one locomotion task collected by two worker processes."""
    root = tmp_path_factory.mktemp("collected")
    train_expert("cheetah_vel", steps=60, out=root, seed=0, save_every=40, learning_starts=50, buffer_size=100,
                 device="cpu")
    collect(TASKS, episodes=3, out=root, seed=7, noise=0.1, workers=2, max_steps=STEPS)
    return root


def test_loader_accepts_the_collected_root(data_root):
    dataset = TaskDataset(data_root, TASKS)  # `_experts/` and collect.json sit beside the task folders
    assert dataset.task_names == TASKS
    assert dataset.observations.shape == (2 * STEPS, 39)  # one training episode per task, two prompts
    for name in TASKS:
        task = get_task(name)
        episode = load_episode(data_root / name / "0.npz")
        assert episode.observations.shape == (STEPS, 39) and episode.actions.shape == (STEPS, 8)
        assert not episode.observations[:, task.obs_dim :].any() and not episode.actions[:, task.act_dim :].any()
        assert np.abs(episode.actions).max() <= 1.0


def test_summary_reports_returns_success_and_score(data_root):
    summary = json.loads((data_root / SUMMARY_FILE).read_text())
    for name in TASKS:
        entry = summary[name]
        returns = [float(load_episode(data_root / name / f"{i}.npz").rewards.sum()) for i in range(3)]
        assert entry["episodes"] == 3 and entry["steps"] == 3 * STEPS
        assert entry["mean_return"] == pytest.approx(np.mean(returns), rel=1e-5)
        assert entry["settings"] == {**entry["settings"], "seed": 7, "noise": 0.1, "max_steps": STEPS}
    assert summary["reach-v2"]["settings"]["policy"] == "metaworld scripted"
    assert summary["cheetah-vel-3"]["settings"]["policy"] == "sac cheetah_vel at 60 steps"
    cheetah = summary["cheetah-vel-3"]
    assert cheetah["success_rate"] is None
    # scored on the scale of full episodes (the return per allowed step), as evaluation scores cut episodes
    assert cheetah["score"] == pytest.approx(episode_score("cheetah_vel", [cheetah["mean_return"] * 200 / STEPS], []))
    assert 0.0 <= summary["reach-v2"]["success_rate"] <= 1.0
    # the goals used: 0..2 of MT1 seeded with 7, which evaluation with --seed 7 would meet again
    assert summary["reach-v2"]["mt1_goals"] == [{"seed": 7, "goals": 3}] and "mt1_goals" not in cheetah


def test_resume_recollects_only_the_missing_episode_identically(data_root):
    folder = data_root / "reach-v2"
    before = file_fingerprints(folder)
    other_task_before = file_fingerprints(data_root / "cheetah-vel-3")
    deleted = load_episode(folder / "1.npz")
    (folder / "1.npz").unlink()
    (folder / ".2.npz.crashed.tmp").write_bytes(b"left by a killed worker")
    collect(TASKS, episodes=3, out=data_root, seed=7, noise=0.1, workers=0, max_steps=STEPS)  # in-process now

    after = file_fingerprints(folder)
    assert sorted(after) == ["0.npz", "1.npz", "2.npz"]
    assert {name: after[name] for name in ("0.npz", "2.npz")} == {name: before[name] for name in ("0.npz", "2.npz")}
    assert file_fingerprints(data_root / "cheetah-vel-3") == other_task_before
    recollected = load_episode(folder / "1.npz")  # same seed, other scheduling: the same episode
    np.testing.assert_array_equal(recollected.observations, deleted.observations)
    np.testing.assert_array_equal(recollected.actions, deleted.actions)
    assert not list(data_root.rglob("*.tmp"))


def test_expert_training_resumes_from_its_checkpoint(data_root, capsys):
    state_file = data_root / EXPERTS_DIR / "cheetah_vel.json"
    assert json.loads(state_file.read_text())["steps_done"] == 60
    train_expert("cheetah_vel", steps=70, out=data_root / "more", seed=0, save_every=40, learning_starts=50,
                 buffer_size=100, device="cpu")
    (data_root / "more" / EXPERTS_DIR / "cheetah_vel_log" / "from_step_70").mkdir()  # as left by a run killed
    train_expert("cheetah_vel", steps=90, out=data_root / "more", seed=0, save_every=40, learning_starts=50,
                 buffer_size=50, device="cpu")  # before its first save
    assert ("resuming cheetah_vel from step 70 with its saved replay buffer of capacity 100 (--buffer_size 50 sizes "
            "a new buffer only)") in capsys.readouterr().out
    assert json.loads((data_root / "more" / EXPERTS_DIR / "cheetah_vel.json").read_text())["steps_done"] == 90
    train_expert("cheetah_vel", steps=90, out=data_root / "more", seed=0, save_every=40, learning_starts=50,
                 buffer_size=100, device="cpu")
    assert "expert cheetah_vel: already trained for 90 steps" in capsys.readouterr().out
    # each run kept its own training log (SB3 would truncate one shared progress.csv)
    logs = data_root / "more" / EXPERTS_DIR / "cheetah_vel_log"
    assert sorted(path.relative_to(logs).as_posix() for path in logs.rglob("*.csv")) == [
        "from_step_0/progress.csv", "from_step_70_2/progress.csv"]


def test_a_checkpoint_without_its_replay_buffer_refills_it_with_its_policy_before_updating(data_root, tmp_path,
                                                                                        capsys):
    # the 60-step expert of the fixture, shipped as `experts/` ships one: model and state, no replay buffer
    shipped = tmp_path / EXPERTS_DIR
    copy_expert(data_root / EXPERTS_DIR, "cheetah_vel", shipped)
    model = SAC.load(shipped / "cheetah_vel.zip", env=ExpertTrainingEnv("cheetah_vel", 1), device="cpu")
    model.set_logger(configure_logger(None, []))
    weights = [parameter.detach().clone() for parameter in model.policy.parameters()]
    refill_replay_buffer(model, "cheetah_vel", 25)
    assert model.num_timesteps == 85 and model.replay_buffer.size() == 25
    assert all(torch.equal(before, after) for before, after in zip(weights, model.policy.parameters()))
    assert model.gradient_steps == 1  # and later steps update again
    # through train_expert: the refill (at most --learning_starts steps), then training to the target
    train_expert("cheetah_vel", steps=100, out=tmp_path, seed=0, save_every=1000, learning_starts=30,
                 buffer_size=70, device="cpu")  # its buffer is new: --buffer_size sizes it (it was 100)
    assert "from step 60 without its replay buffer: 30 steps of its policy" in capsys.readouterr().out
    assert json.loads((shipped / "cheetah_vel.json").read_text())["steps_done"] == 100
    trained = SAC.load(shipped / "cheetah_vel.zip", device="cpu")
    trained.load_replay_buffer(shipped / "cheetah_vel.replay_buffer.pkl")
    assert trained.replay_buffer.size() == 40 and trained.replay_buffer.buffer_size == 70
    assert not all(torch.equal(before, after) for before, after in zip(weights, trained.policy.parameters()))


def test_expert_dmc_trains_one_expert_per_dmc_task_in_turn(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr("m3dt.collect.train_expert", lambda name, *arguments: trained.append(name))
    main(["train-expert", "--expert", "dmc", "--steps", "10", "--out", str(tmp_path)])
    assert trained == [task.name for task in task_table().values() if task.family == "dmc"] and len(trained) == 30


def test_expert_training_uses_the_threads_asked_for(tmp_path, monkeypatch):
    threads_seen = []
    monkeypatch.setattr("m3dt.collect.train_expert", lambda *arguments: threads_seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        main(["train-expert", "--expert", "ant_dir", "--threads", "2", "--out", str(tmp_path)])
        main(["train-expert", "--expert", "ant_dir", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [2, 1]


@pytest.mark.parametrize("task_name", ["reach-v2", "button-press-topdown-v2", "drawer-close-v2"])
def test_scripted_policy_succeeds_within_150_steps(tmp_path, task_name):
    _, summary = collect_episode(EpisodeJob(task_name, 0, tmp_path, seed=0, noise=0.0, max_steps=150))
    assert summary.success and summary.steps == 150


def test_metaworld_goals_follow_mt1_then_fresh_blocks_of_50():
    goal = slice(36, 39)
    task = get_task("reach-v2")
    first = episode_env(task, 3, seed=5).reset()
    np.testing.assert_array_equal(first, make_env("reach-v2", 3, seed=5).reset())
    assert not np.allclose(episode_env(task, 53, seed=5).reset()[goal], first[goal])
    # collect.json's record of 120 episodes: two full MT1 blocks and 20 goals of a third
    blocks = mt1_goal_blocks(5, 120)
    assert [block["goals"] for block in blocks] == [50, 50, 20] and blocks[0]["seed"] == 5
    assert episode_env(task, 53, seed=5).seed == blocks[1]["seed"] != blocks[2]["seed"]


def test_only_an_env_ending_before_the_horizon_is_a_terminal():
    task = get_task("ant-dir-0")
    assert is_termination(SimpleNamespace(task=task, steps=37), done=True)
    assert not is_termination(SimpleNamespace(task=task, steps=task.horizon), done=True)
    assert not is_termination(SimpleNamespace(task=task, steps=37), done=False)


def test_scores_per_family():
    assert episode_score("metaworld", [1.0, 2.0, 3.0, 4.0], [True, False, True, True]) == 75.0
    assert episode_score("dmc", [800.0, 600.0], [False, False]) == 70.0
    assert episode_score("ant_dir", [350.0], [False]) == 70.0
    assert episode_score("ant_dir", [-20.0], [False]) == 0.0
    assert episode_score("ant_dir", [900.0], [False]) == 100.0
    assert episode_score("cheetah_vel", [-65.0], [False]) == pytest.approx(50.0)
    assert episode_score("cheetah_vel", [-150.0], [False]) == 0.0
    assert episode_score("cheetah_vel", [-10.0], [False]) == 100.0


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "reach-v2", "--episodes", "2"], "--episodes must be at least 3"),
    (["--tasks", "walker-walk", "--episodes", "3"], "no expert for DMC (walker-walk): train one with"),
    (["--tasks", "ant-dir-0", "--episodes", "3"], "no ant_dir expert (ant-dir-0)"),
    (["--tasks", "reach-v3", "--episodes", "3"], "unknown task 'reach-v3'"),
    (["--tasks", "reach-v2", "--episodes", "3", "--noise", "-1"], "--noise must be at least"),
    (["train-expert", "--expert", "ant_dir", "--threads", "0"], "--threads must be at least 1, got 0"),
    # a negative seed was a numpy traceback after collect.json recorded it (the folder then refused every rerun);
    # NaN noise wrote NaN actions and an exit code 0
    (["--tasks", "reach-v2", "--episodes", "3", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["train-expert", "--expert", "cartpole-balance", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--tasks", "reach-v2", "--episodes", "3", "--noise", "nan"], "--noise must be a finite number, got nan"),
    (["--tasks", "reach-v2", "--episodes", "3", "--noise", "inf"], "--noise must be a finite number, got inf"),
    (["--tasks", "reach-v2", "--episodes", "3", "--format", "minari", "--minari_namespace", ""],
     "--minari_namespace '': not a Minari namespace"),
    (["--tasks", "reach-v2", "--episodes", "3", "--format", "minari", "--minari_namespace", "a b"],
     "--minari_namespace 'a b': not a Minari namespace"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "collect.json").exists()  # refused before anything was recorded


def test_an_empty_out_is_refused_not_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in (["--tasks", "reach-v2", "--episodes", "3"], ["train-expert", "--expert", "cartpole-balance"]):
        with pytest.raises(SystemExit):
            main([*command, "--out", ""])
        assert capsys.readouterr().err == "error: --out is empty: give the data root folder\n"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_expert_points_to_the_one_shipped_in_the_repository(data_root, tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "experts"
    copy_expert(data_root / EXPERTS_DIR, "cheetah_vel", shipped)
    monkeypatch.setattr("m3dt.collect.SHIPPED_EXPERTS", shipped)
    out = tmp_path / "data"
    with pytest.raises(SystemExit):
        main(["--tasks", "cheetah-vel-3", "--episodes", "3", "--out", str(out)])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no cheetah_vel expert (cheetah-vel-3)" in error
    assert f"or copy the repository's ({shipped / 'cheetah_vel.zip'} and cheetah_vel.json) into {out / EXPERTS_DIR}/" in error


def test_the_shipped_ant_dir_expert_collects(tmp_path):
    """experts/ant_dir.zip, copied as the README says, is a finished checkpoint that collection accepts."""
    state = json.loads((SHIPPED_EXPERTS / "ant_dir.json").read_text())
    assert state["steps_done"] == state["steps_target"] > 0
    copy_expert(SHIPPED_EXPERTS, "ant_dir", tmp_path / EXPERTS_DIR)
    summary = collect(["ant-dir-0"], episodes=3, out=tmp_path, seed=0, noise=0.0, workers=0, max_steps=30)
    assert summary["ant-dir-0"]["settings"]["policy"] == f"sac ant_dir at {state['steps_done']} steps"
    # it walks: 63.3 in 30 steps at 700k training steps (34.2 at 500k); random actions got -34.6 to 3.7 in
    # three episodes
    assert summary["ant-dir-0"]["mean_return"] > 20


def test_rerun_with_other_settings_or_fewer_episodes_is_refused(data_root, capsys):
    base = ["--tasks", "reach-v2", "--out", str(data_root), "--seed", "7", "--max_steps", str(STEPS), "--workers", "0"]
    with pytest.raises(SystemExit):
        main([*base, "--episodes", "3", "--noise", "0.2"])
    assert "noise 0.1 -> 0.2" in capsys.readouterr().err
    (data_root / "reach-v2" / "5.npz").write_bytes(b"")
    with pytest.raises(SystemExit):
        main([*base, "--episodes", "3", "--noise", "0.1"])
    assert "beyond --episodes 3" in capsys.readouterr().err
    (data_root / "reach-v2" / "5.npz").unlink()


def test_tasks_by_family_suite_or_list():
    assert len(collection_tasks("metaworld")) == 50 and len(collection_tasks("cheetah_vel")) == 40
    assert all(name.startswith("cheetah-vel-") for name in collection_tasks("cheetah_vel"))
    assert collection_tasks("mt10") == resolve_tasks("mt10", None, seed=0)
    assert collection_tasks("reach-v2,walker-walk") == ["reach-v2", "walker-walk"]
    # families and suites in a list ("unknown task 'metaworld'" before); each task once
    mixed = collection_tasks("metaworld,ant_dir,reach-v2")
    assert len(mixed) == 90 and mixed[:50] == collection_tasks("metaworld") and mixed[50:] == collection_tasks("ant_dir")


def test_the_table_says_what_its_return_and_score_are(capsys):
    """With --max_steps the score is on the full-episode scale and the mean return is not: the table says so."""
    entry = {"episodes": 4, "mean_return": 20.14, "success_rate": None, "score": 33.57,
             "settings": {"max_steps": 30}}
    print_table({"walker-stand": entry, "ant-dir-0": {**entry, "mean_return": 129.0, "score": 100.0}},
                        ["walker-stand", "ant-dir-0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["walker-stand", "4", "20.14", "-", "33.6"]
    assert lines[-1] == ("mean return: per episode, as collected (episodes cut at --max_steps 30); score: the expert's "
                         "per-task score as evaluation computes it (dmc: return / 10; ant_dir: clip(return / 5, 0, "
                         "100)), each cut episode's return scaled to the full horizon first (return x horizon / steps)")


def test_a_bad_minari_namespace_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "new"
    with pytest.raises(SystemExit):
        main(["--tasks", "reach-v2", "--episodes", "3", "--format", "minari", "--minari_namespace", "", "--out", str(out)])
    assert "not a Minari namespace" in capsys.readouterr().err and not out.exists()

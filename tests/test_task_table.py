"""Tasks of one's own (--task_table): two gymnasium MuJoCo tasks outside MT160, one from npz files and one
from a Minari dataset named by the table, train a tiny stage 1 and are evaluated in their real envs from
what the run recorded (the table file is not needed again); bad rows stop with one line."""

import json
from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import torch

from m3dt import envs as envs_module
from m3dt import tasks as task_module
from m3dt.baselines.__main__ import main as baselines_main
from m3dt.data import DataError, task_source
from m3dt.envs import make_env
from m3dt.evaluate import check_video_envs, evaluate
from m3dt.evaluate import main as evaluate_main
from m3dt.import_reference import export_backbone
from m3dt.import_reference import main as import_main
from m3dt.minari_io import write_task_dataset
from m3dt.model import ModelConfig, PromptDecisionTransformer
from m3dt.stages import group_tasks, run_cli, train_backbone
from m3dt.tasks import TaskError, get_task, use_task_table
from tests.test_cli_errors import run_in_process
from tests.test_pipeline import TINY, read_losses

ROWS = [
    {"task": "own-hopper", "env_id": "Hopper-v5", "obs_dim": 11, "act_dim": 3, "horizon": 40, "return_target": 60.0,
     "rtg_scale": 100.0, "score_min_return": -20.3, "score_max_return": 3234.3},
    {"task": "own-pendulum", "env_id": "InvertedPendulum-v5", "env_kwargs": {"reset_noise_scale": 0.05},
     "obs_dim": 4, "act_dim": 1, "horizon": 40, "return_target": 40.0, "rtg_scale": 10.0, "score_min_return": 0.0,
     "score_max_return": 1000.0, "dataset": "minari:own/own-pendulum-v0"},
]
EPISODES = 6


def random_episodes(task_name: str, count: int) -> list[dict[str, np.ndarray]]:
    """Random-action episodes of a task in its real env, in Minari's terms (final observation included); those
    that end before 8 steps (a falling pole) are left out, as a prompt needs 6."""
    task = get_task(task_name)
    rng = np.random.default_rng(0)
    episodes = []
    for index in range(10 * count):
        if len(episodes) == count:
            break
        env = make_env(task, episode=index, seed=123)
        observations, actions, rewards, terminals = [env.reset()], [], [], []
        done = False
        while not done:
            action = rng.uniform(-0.3, 0.3, task.act_dim)
            observation, reward, done, _ = env.step(action)
            observations.append(observation)
            actions.append(np.pad(action, (0, 8 - task.act_dim)))
            rewards.append(reward)
            terminals.append(done and env.steps < task.horizon)
        env.close()
        if len(rewards) < 8:
            continue
        episodes.append({"observations": np.array(observations, np.float32), "actions": np.array(actions, np.float32),
                         "rewards": np.array(rewards), "terminations": np.array(terminals),
                         "truncations": ~np.array(terminals) & (np.arange(len(rewards)) == len(rewards) - 1)})
    return episodes


def write_npz_episodes(folder, episodes) -> None:
    """Episodes in Minari's terms (final observation included) as the MT160 layout's files 0..n-1 in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, episode in enumerate(episodes):
        np.savez(folder / f"{index}.npz", observations=episode["observations"][:-1], actions=episode["actions"],
                 rewards=episode["rewards"], terminals=episode["terminations"])


@pytest.fixture
def one_thread():
    """A tiny model trains fastest on one thread; two contend badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_own_gymnasium_tasks_train_and_evaluate(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    table = tmp_path / "my_tasks.json"
    table.write_text(json.dumps({"tasks": ROWS}))
    use_task_table(table)
    data_root = tmp_path / "data"
    write_npz_episodes(data_root / "own-hopper", random_episodes("own-hopper", EPISODES))
    pendulum = get_task("own-pendulum")
    folder = write_task_dataset(pendulum, random_episodes("own-pendulum", EPISODES), "own/own-pendulum-v0",
                                {"note": "random actions"}, "a test dataset", "uniform random")
    assert json.loads((folder / "data" / "metadata.json").read_text())["env_spec"].count("InvertedPendulum-v5")

    run_dir = tmp_path / "run"
    run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(table), "--tasks", "own-hopper,own-pendulum",
                                        "--data_path", str(data_root), "--run_dir", str(run_dir), "--max_iters", "60"])
    losses = read_losses(run_dir / "stage1" / "metrics.jsonl")
    assert len(losses) == 3 and losses[-1] < losses[0]
    # a later stage given the same table again takes its tasks from stage 1 (it used to say "no tasks")
    run_cli(partial(group_tasks, method="random"), "stage 2",
            [*TINY, "--task_table", str(table), "--data_path", str(data_root), "--run_dir", str(run_dir),
             "--group_num", "2"])
    groups = json.loads((run_dir / "stage2" / "groups_random_2.json").read_text())
    assert sorted(sum(groups.values(), [])) == ["own-hopper", "own-pendulum"]

    # The evaluator knows the tasks from the stage-1 manifest alone, and its env workers from the Task objects.
    for name in ("own-hopper", "own-pendulum"):
        task_module._user_tasks.pop(name)
    monkeypatch.setenv("MUJOCO_GL", "disable")  # the evaluator picks a GL backend for the video itself
    results = evaluate(str(run_dir), "1", episodes=2, max_steps=6, workers=1, device="cpu", video=1)
    assert set(results["families"]) == {"gymnasium"} and results["families"]["gymnasium"]["reference_score"] is None
    assert results["user_tasks"] == [task_module.task_row(get_task(row["task"])) for row in ROWS]  # for the report
    for row in ROWS:
        outcome = results["tasks"][row["task"]]
        low, high = row["score_min_return"], row["score_max_return"]
        # an episode cut at 6 steps scaled by horizon / 6; one the env ended (a fallen pole) counts as it is
        full = [value if ended else value * row["horizon"] / 6 for value, ended in
                zip(outcome["episode_returns"], outcome["episode_ended"])]
        assert outcome["score"] == pytest.approx(100 * (np.mean(full) - low) / (high - low))
        assert outcome["episodes"] == 2 and 1 <= outcome["steps_mean"] <= 6
        assert all(ended or steps == 6 for ended, steps in zip(outcome["episode_ended"], outcome["episode_steps"]))
    (folder,) = (run_dir / "eval").iterdir()  # stage1, labelled with the shortened protocol
    assert (folder / "table.md").read_text().count("| gymnasium | 2 |")
    assert "| single-task score (your task table's) |" in (folder / "table.md").read_text()  # not the paper's
    assert results["videos"]["own-hopper"] == ["videos/own-hopper_episode0.mp4"]
    assert (folder / "videos" / "own-hopper_episode0.mp4").stat().st_size > 1000

    # a pole that falls within 30 steps: the same score with --max_steps 30 as over the whole horizon of 40
    # (it scored 40/30 of it, as if its episodes had been cut)
    short, whole = (evaluate(str(run_dir), "random", tasks="own-pendulum", episodes=3, max_steps=steps, workers=0)
                    ["tasks"]["own-pendulum"] for steps in (30, None))
    assert all(short["episode_ended"]) and max(short["episode_steps"]) < 30
    assert short["episode_returns"] == whole["episode_returns"] and short["score"] == whole["score"]
    assert whole["score"] == pytest.approx(100 * np.mean(whole["episode_returns"]) / 1000.0)


def test_a_comparison_method_without_stage_1_evaluates_its_own_tasks(tmp_path, one_thread):
    """MTDT trained on a table's task in a run without stage 1 records the task in its own manifest, and
    m3dt.evaluate (which has no --task_table) evaluates it from there."""
    table = write_table(tmp_path, ROWS[:1])
    use_task_table(table)
    data_root = tmp_path / "data"
    write_npz_episodes(data_root / "own-hopper", random_episodes("own-hopper", EPISODES))
    run_dir = tmp_path / "run"
    baselines_main(["--method", "mtdt", *TINY, "--task_table", str(table), "--tasks", "own-hopper",
                    "--data_path", str(data_root), "--run_dir", str(run_dir), "--max_iters", "20"])
    assert not (run_dir / "stage1").exists()
    manifest = json.loads((run_dir / "baselines" / "mtdt" / "model.manifest.json").read_text())
    assert manifest["user_tasks"] == [{**ROWS[0], "env_kwargs": {}}]

    task_module._user_tasks.clear()  # as a new process: the table is not given again
    task_module._user_table_files.clear()
    evaluate_main(["--run_dir", str(run_dir), "--method", "mtdt", "--tasks", "own-hopper", "--episodes", "2",
                   "--max_steps", "4", "--workers", "0", "--device", "cpu"])
    results = json.loads((run_dir / "eval" / "mtdt_episodes2_steps4" / "results.json").read_text())
    assert results["method_id"] == "mtdt" and list(results["tasks"]) == ["own-hopper"]
    outcome = results["tasks"]["own-hopper"]
    assert outcome["family"] == "gymnasium" and outcome["episodes"] == 2 and 1 <= outcome["steps_mean"] <= 4
    low, high = ROWS[0]["score_min_return"], ROWS[0]["score_max_return"]
    per_full_episode = outcome["return_mean"] * ROWS[0]["horizon"] / 4
    assert outcome["score"] == pytest.approx(100 * (per_full_episode - low) / (high - low))


def test_an_imported_backbone_of_own_tasks_evaluates_without_the_table(tmp_path, one_thread):
    """m3dt.import_reference records the table's rows in the stage-1 manifest, as stage 1 does, so that
    m3dt.evaluate (which has no --task_table) knows the task."""
    table = write_table(tmp_path, ROWS[:1])
    use_task_table(table)
    data_root = tmp_path / "data"
    write_npz_episodes(data_root / "own-hopper", random_episodes("own-hopper", EPISODES))
    authors_file = tmp_path / "prompt_model_own_iter_400_seed0"
    model = PromptDecisionTransformer(ModelConfig(embed_dim=32, n_layer=2, n_head=2))
    torch.save(OrderedDict(export_backbone(model.state_dict())), authors_file)
    run_dir = tmp_path / "imported"
    import_main(["--backbone", str(authors_file), "--task_table", str(table), "--tasks", "own-hopper", *TINY,
                 "--data_path", str(data_root), "--run_dir", str(run_dir)])
    manifest = json.loads((run_dir / "stage1" / "backbone.manifest.json").read_text())
    assert manifest["user_tasks"] == [{**ROWS[0], "env_kwargs": {}}]

    task_module._user_tasks.clear()  # as a new process: the table is not given again
    task_module._user_table_files.clear()
    evaluate_main(["--run_dir", str(run_dir), "--stage", "1", "--episodes", "1", "--max_steps", "3", "--workers", "0",
                   "--device", "cpu"])
    results = json.loads((run_dir / "eval" / "stage1_episodes1_steps3" / "results.json").read_text())
    assert list(results["tasks"]) == ["own-hopper"] and results["tasks"]["own-hopper"]["episodes"] == 1


def test_actions_are_rescaled_to_the_env_bounds(tmp_path):
    use_task_table(write_table(tmp_path, ROWS))
    env = make_env("own-pendulum", episode=0, seed=0)  # InvertedPendulum acts in [-3, 3]
    env.reset()
    env.step(np.array([0.5]))
    assert env.env.unwrapped.data.ctrl[0] == pytest.approx(1.5)


def write_table(folder, rows):
    path = folder / "table.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("change, message", [
    ({"obs_dim": 50}, "obs_dim must be an integer at least 1 and at most 39"),
    ({"task": "walker-walk"}, "is an MT160 task"),
    ({"family": "dmc"}, "give exactly one of 'family'"),
    ({"score_max_return": None}, "needs score_min_return < score_max_return"),
    ({"colour": "red"}, "unknown column(s) colour"),
])
def test_bad_rows_are_one_line(tmp_path, capsys, change, message):
    row = {**ROWS[0], "task": "bad-row", **change}
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        use_task_table(write_table(tmp_path, [row]))
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(tmp_path / "table.json"), "--tasks", "x"])
    assert exited.value.code == 2 and message in capsys.readouterr().err


ANT = {"task": "bad-row", "family": "ant_dir", "obs_dim": 27, "act_dim": 8, "horizon": 200, "return_target": 500.0,
       "rtg_scale": 500.0, "goal_angle_rad": 1.0}
BAD_TABLES = {  # what the table file holds -> the message after "{file}: "
    "score not a number": ([{**ROWS[0], "task": "bad-row", "single_task_score": "high"}],
                           "task 'bad-row': single_task_score must be a finite number, got 'high'"),
    "return target NaN": ([{**ROWS[0], "task": "bad-row", "return_target": float("nan")}],
                          "task 'bad-row': return_target must be a finite number, got nan"),
    "score bound infinite": ([{**ROWS[0], "task": "bad-row", "score_max_return": float("inf")}],
                             "task 'bad-row': a gymnasium task needs score_min_return < score_max_return (finite "
                             "numbers), got -20.3 and inf"),
    "a name twice": ([{**ROWS[0], "task": "bad-row"}, {**ROWS[0], "task": "bad-row"}],
                     "task name(s) bad-row appear more than once"),
    "trajectories not a number": ([{**ROWS[0], "task": "bad-row", "train_trajectories": "1998"}],
                                  "task 'bad-row': train_trajectories must be an integer at least 1, got '1998'"),
    "trajectories true": ([{**ROWS[0], "task": "bad-row", "train_trajectories": True}],
                          "task 'bad-row': train_trajectories must be an integer at least 1, got True"),
    "ant_dir without goal": ([{key: value for key, value in ANT.items() if key != "goal_angle_rad"}],
                             "task 'bad-row': ant_dir rows need the goal column goal_angle_rad (a number)"),
    "cheetah_vel with ant's goal": ([{**ANT, "family": "cheetah_vel", "obs_dim": 20, "act_dim": 6}],
                                    "task 'bad-row': cheetah_vel rows need the goal column goal_velocity (a number)"),
    "goal not a number": ([{**ANT, "goal_angle_rad": "north"}],
                          "task 'bad-row': goal_angle_rad must be a finite number, got 'north'"),
    "goal on a gymnasium row": ([{**ROWS[0], "task": "bad-row", "goal_velocity": 1.5}],
                                "task 'bad-row': goal_velocity is the goal column of cheetah_vel rows only"),
    "metaworld family": ([{"task": "reach-v9", "family": "metaworld", "obs_dim": 39, "act_dim": 4, "horizon": 500,
                           "return_target": 4500.0, "rtg_scale": 1000.0}],
                         "task 'reach-v9': family metaworld cannot hold a task of your own: every Meta-World v2 "
                         "task is already an MT160 task"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "task table is not valid JSON: not UTF-8 text (byte 0)"),
    "no rows": ({"tasks": []}, "task table must hold a non-empty list of tasks"),
    "a folder": (None, "is a folder; the task table is a JSON file"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_tables_stop_when_read_in_one_line(case, tmp_path, monkeypatch, capsys):
    content, message = BAD_TABLES[case]
    table = tmp_path / "table.json"
    if content is None:
        table.mkdir()
    else:
        table.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    expected = f"{table}: {message}"
    with pytest.raises(TaskError) as error:
        use_task_table(table)
    assert str(error.value).startswith(expected), str(error.value)
    code = run_in_process("stage1_backbone_train.py", ["--task_table", str(table), "--tasks", "x"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and err.startswith(f"error: {expected}"), err


def test_null_columns_count_as_absent(tmp_path):
    """A table exported from a data frame has every column in every row, null where a row has no value."""
    every_column = {"goal_angle_rad": None, "goal_velocity": None, "single_task_score": None, "dataset": None,
                    "train_trajectories": None}
    use_task_table(write_table(tmp_path, [{**every_column, **ROWS[0]}, {**every_column, **ANT, "task": "own-ant"}]))
    assert get_task("own-hopper").goal is None and get_task("own-hopper").single_task_score is None
    assert get_task("own-ant").family == "ant_dir" and get_task("own-ant").goal == 1.0


def test_a_family_row_builds_that_familys_env(tmp_path):
    row = {"task": "acrobot-swingup-sparse", "family": "dmc", "obs_dim": 6, "act_dim": 1, "horizon": 500,
           "return_target": 1000.0, "rtg_scale": 200.0}
    (task,) = task_module.register_task_rows([row], "test")
    env = make_env(task, episode=0)
    assert env.reset().shape == (39,) and env.step(np.zeros(1))[1] >= 0.0  # a DMC reward, action repeat 2
    wrong = task_module.task_from_row({**row, "obs_dim": 7}, "test", 0)
    with pytest.raises(TaskError, match="its env observes 6 dims, the task table says obs_dim 7"):
        make_env(wrong, episode=0).reset()


BAD_ENV_ROWS = {  # a row whose env disagrees with it -> the message after "{file}: task '{task}': "
    "no such gymnasium env": ({**ROWS[0], "env_id": "NoSuchEnv-v0"}, "gymnasium cannot make NoSuchEnv-v0"),
    "gymnasium obs_dim": ({**ROWS[1], "obs_dim": 5}, "InvertedPendulum-v5 observes shape (4,), the task table says "
                                                     "obs_dim 5"),
    "gymnasium act_dim": ({**ROWS[1], "act_dim": 2}, "InvertedPendulum-v5 acts with 1 dims, the task table says "
                                                     "act_dim 2"),
    "no such DMC task": ({"task": "acrobot-swingup-wide", "family": "dmc", "obs_dim": 6, "act_dim": 1, "horizon": 500,
                          "return_target": 1000.0, "rtg_scale": 200.0},
                         "its env cannot be built: Level 'swingup_wide' does not exist in domain 'acrobot'."),
    "DMC act_dim": ({"task": "swimmer-swimmer6", "family": "dmc", "obs_dim": 25, "act_dim": 2, "horizon": 500,
                     "return_target": 1000.0, "rtg_scale": 200.0},
                    "its env acts with 5 dims, the task table says act_dim 2"),
}


@pytest.mark.parametrize("case", list(BAD_ENV_ROWS))
def test_a_row_its_env_disagrees_with_stops_the_stage_before_training(case, tmp_path, capsys):
    """A typo in env_id or a wrong width used to be found by the evaluation, after every stage had trained: each
    stage builds the envs of the table's tasks it trains on first."""
    row, message = BAD_ENV_ROWS[case]
    table = write_table(tmp_path, [{key: value for key, value in row.items() if key != "dataset"}])
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(table), "--tasks", row["task"],
                                            "--data_path", str(tmp_path / "data"), "--run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {table}: task '{row['task']}': {message}"), err
    assert not (tmp_path / "run").exists()
    task_module._user_tasks.pop(row["task"])


def test_a_table_width_below_the_datas_is_refused_when_loading(tmp_path, capsys, monkeypatch):
    """obs_dim 5 for Hopper's 11-dim observations, on a machine without the simulator (where the stage cannot
    build the env to check the row): the data holds non-zero values beyond the table's width, and stage 1 stops
    with one line naming the folder."""
    monkeypatch.setattr(envs_module, "make_env", missing_simulator)
    use_task_table(write_table(tmp_path, ROWS[:1]))  # the right widths, to make the data
    data_root = tmp_path / "data"
    write_npz_episodes(data_root / "own-hopper", random_episodes("own-hopper", 4))
    task_module._user_tasks.clear()  # as a new process, given the table with the wrong width
    task_module._user_table_files.clear()
    table = write_table(tmp_path, [{**ROWS[0], "obs_dim": 5}])
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(table), "--tasks", "own-hopper",
                                            "--data_path", str(data_root), "--run_dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert (f"{data_root / 'own-hopper'}: observations hold non-zero values in dim 5, beyond the task table's "
            "obs_dim 5 of own-hopper") in err
    assert ("task table: the envs of own-hopper are not checked here (their simulator is not installed); the "
            "evaluation builds them") in out


def test_actions_outside_the_models_range_are_refused_when_loading(tmp_path, capsys):
    """Raw actions of an env acting in [-3, 3] used to train silently: the model acts in [-1, 1]."""
    use_task_table(write_table(tmp_path, ROWS[:1]))
    folder = tmp_path / "data" / "own-hopper"
    episodes = random_episodes("own-hopper", 4)
    episodes[1]["actions"] = episodes[1]["actions"] * 10.0
    write_npz_episodes(folder, episodes)
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(tmp_path / "table.json"), "--tasks",
                                            "own-hopper", "--data_path", str(tmp_path / "data"),
                                            "--run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    largest = float(np.abs(np.load(folder / "1.npz")["actions"]).max())
    assert largest > 1.0 and exited.value.code == 2
    assert err == (f"error: {folder}: actions reach {largest:.4g} in absolute value, outside [-1, 1], the range the "
                   "model acts in: map own-hopper's actions from the env's bounds onto [-1, 1] (README \"Your own "
                   "tasks\")\n")


def test_episodes_longer_than_the_horizon_are_refused_when_loading(tmp_path, capsys):
    """A horizon below the data's used to train silently, every later step on the last timestep."""
    use_task_table(write_table(tmp_path, ROWS[:1]))
    folder = tmp_path / "data" / "own-hopper"
    write_npz_episodes(folder, random_episodes("own-hopper", 4))
    longest = max(len(np.load(folder / f"{index}.npz")["rewards"]) for index in range(2))
    task_module._user_tasks.clear()  # as a new process, given the table with a shorter horizon
    table = write_table(tmp_path, [{**ROWS[0], "horizon": longest - 1}])
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", [*TINY, "--task_table", str(table), "--tasks", "own-hopper",
                                            "--data_path", str(tmp_path / "data"), "--run_dir", str(tmp_path / "run")])
    assert exited.value.code == 2 and capsys.readouterr().err == (
        f"error: {folder}: an episode of {longest} steps, longer than the task table's horizon {longest - 1} of "
        "own-hopper: give the horizon its episodes have\n")


def test_a_dataset_folder_is_read_from_the_tables_folder(tmp_path, monkeypatch):
    """The dataset column may name a folder of npz episodes, relative to the table; a missing one is named."""
    tables = tmp_path / "tables"
    tables.mkdir()
    use_task_table(write_table(tmp_path, ROWS[:1]))
    write_npz_episodes(tables / "data" / "hopper", random_episodes("own-hopper", 4))
    task_module._user_tasks.clear()
    monkeypatch.chdir(tmp_path)  # not the table's folder
    (task,) = use_task_table(write_table(tables, [{**ROWS[0], "dataset": "data/hopper"}]))
    assert task.dataset == str(tables / "data" / "hopper")
    source = task_source("./nowhere", task, 10)
    assert [path.name for path in source.stored_files()] == ["0.npz", "1.npz", "2.npz", "3.npz"]
    task_module._user_tasks.clear()
    (task,) = use_task_table(write_table(tables, [{**ROWS[0], "dataset": "data/hoper"}]))
    with pytest.raises(DataError, match=f"^{tables / 'data' / 'hoper'}: not a folder \\(the dataset column of "
                                        "task 'own-hopper' in its task table\\)$"):
        task_source("./nowhere", task, 10)


def test_a_video_of_an_env_mujoco_does_not_render_is_refused_before_the_evaluation(tmp_path):
    """Pendulum-v1 is gymnasium's classic-control pendulum: --video used to fail once the rollouts started."""
    (pendulum,) = use_task_table(write_table(tmp_path, [
        {"task": "classic-pendulum", "env_id": "Pendulum-v1", "obs_dim": 3, "act_dim": 1, "horizon": 200,
         "return_target": -150.0, "rtg_scale": 100.0, "score_min_return": -1200.0, "score_max_return": -150.0}]))
    with pytest.raises(TaskError, match="task 'classic-pendulum': Pendulum-v1 is not a MuJoCo env; videos need one"):
        check_video_envs([pendulum])
    check_video_envs([get_task("reach-v2")])  # MT160's envs are built by their own modules: nothing to check


def missing_simulator(*arguments, **options):
    raise ModuleNotFoundError("No module named 'gymnasium'")

"""Minari datasets in and out: a dataset written with Minari's own API reads back through the data layer
transition by transition (minari:NAMESPACE and a local folder), actions outside [-1, 1] are mapped onto it,
and m3dt.collect --format minari writes datasets that read back as the npz files they came from."""

import json
import shutil

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from m3dt.collect import main as collect_main
from m3dt.data import PROMPT_EPISODES, DataError, TaskDataset, load_episode, returns_to_go
from m3dt.minari_io import minari_episodes
from m3dt.tasks import get_task, register_task_rows

# Two tasks of one's own, read from Minari data: one with actions in [-1, 1], one in [-3, 3].
ROWS = [
    {"task": "minari-test-swimmer", "env_id": "Swimmer-v5", "obs_dim": 8, "act_dim": 2, "horizon": 30,
     "return_target": 40.0, "rtg_scale": 100.0, "score_min_return": 0.0, "score_max_return": 100.0},
    {"task": "minari-test-pendulum", "env_id": "InvertedPendulum-v5", "obs_dim": 4, "act_dim": 1, "horizon": 30,
     "return_target": 30.0, "rtg_scale": 10.0, "score_min_return": 0.0, "score_max_return": 1000.0},
]
BOUNDS = {"minari-test-swimmer": 1.0, "minari-test-pendulum": 3.0}


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari_datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def made_up_episodes(task, bound: float, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        steps = int(rng.integers(8, 20))
        terminated = bool(rng.integers(2))
        episodes.append({
            "observations": rng.standard_normal((steps + 1, task.obs_dim)).astype(np.float32),
            "actions": rng.uniform(-bound, bound, (steps, task.act_dim)).astype(np.float32),
            "rewards": rng.standard_normal(steps),
            "terminations": np.arange(steps) == steps - 1 if terminated else np.zeros(steps, bool),
            "truncations": np.zeros(steps, bool) if terminated else np.arange(steps) == steps - 1,
        })
    return episodes


def write_with_minari(name: str, episodes: list[dict], bound: float) -> None:
    """The dataset as any Minari user writes one: buffers, spaces, an id."""
    task = get_task(name)
    buffers = [EpisodeBuffer(observations=episode["observations"], actions=episode["actions"],
                             rewards=episode["rewards"], terminations=episode["terminations"],
                             truncations=episode["truncations"]) for episode in episodes]
    with pytest.warns(UserWarning):  # Minari asks for an author, a code link...
        minari.create_dataset_from_buffers(
            f"tests/{name}-v0", buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (task.obs_dim,), np.float32),
            action_space=gym.spaces.Box(-bound, bound, (task.act_dim,), np.float32))


def check_transitions(dataset: TaskDataset, slot: int, episodes: list[dict], bound: float) -> None:
    """Every training transition and both prompts of task `slot` against the episodes written."""
    task = dataset.tasks[slot]
    training = episodes[:-PROMPT_EPISODES]
    start = dataset.task_offsets[slot]
    steps = sum(len(episode["rewards"]) for episode in training)
    assert dataset.task_sizes[slot] == steps
    observations = np.concatenate([episode["observations"][:-1] for episode in training])
    actions = np.concatenate([episode["actions"] for episode in training]) / bound
    rtg = np.concatenate([returns_to_go(episode["rewards"].astype(np.float32)) for episode in training])
    rows = slice(start, start + steps)
    np.testing.assert_array_equal(dataset.observations[rows, : task.obs_dim], observations)
    assert not dataset.observations[rows, task.obs_dim :].any()
    np.testing.assert_allclose(dataset.actions[rows, : task.act_dim], actions, rtol=1e-6, atol=1e-6)
    assert not dataset.actions[rows, task.act_dim :].any()
    np.testing.assert_allclose(dataset.returns_to_go[rows], rtg / task.rtg_scale, rtol=1e-6)
    starts = dataset.episode_starts[(dataset.episode_starts >= start) & (dataset.episode_starts < start + steps)]
    assert list(np.diff([*starts, start + steps])) == [len(episode["rewards"]) for episode in training]
    # the higher-return prompt's last window: the same actions as the episode's steps T-6 .. T-2
    prompts = episodes[-PROMPT_EPISODES:]
    best = prompts[int(np.argmax([episode["rewards"].sum() for episode in prompts]))]
    length = dataset.prompt_length
    window = best["actions"][-length - 1 : -1] / bound
    np.testing.assert_allclose(dataset.prompts["actions"][slot, 1, :, : task.act_dim], window, rtol=1e-6, atol=1e-6)


def test_minari_datasets_read_back_transition_by_transition(minari_root, tmp_path):
    register_task_rows(ROWS, "test rows")
    written = {}
    for seed, (name, bound) in enumerate(BOUNDS.items()):
        written[name] = made_up_episodes(get_task(name), bound, count=5, seed=seed)
        write_with_minari(name, written[name], bound)
    names = list(BOUNDS)
    by_namespace = TaskDataset("minari:tests", names)
    # the same datasets as local folders {data_path}/{task}
    for name in names:
        shutil.copytree(minari_root / "tests" / f"{name}-v0", tmp_path / "local" / name)
    by_folder = TaskDataset(tmp_path / "local", names)
    for dataset in (by_namespace, by_folder):
        for slot, name in enumerate(names):
            check_transitions(dataset, slot, written[name], BOUNDS[name])
    assert np.abs(by_namespace.actions).max() <= 1.0


def test_minari_errors_name_the_dataset(minari_root, tmp_path):
    register_task_rows(ROWS, "test rows")
    with pytest.raises(DataError, match="Minari dataset nowhere/minari-test-swimmer not found .*minari download"):
        TaskDataset("minari:nowhere", ["minari-test-swimmer"])
    name = "minari-test-pendulum"
    write_with_minari(name, made_up_episodes(get_task(name), 3.0, count=4, seed=0), 3.0)
    # a dataset whose widths are not the task's
    with pytest.raises(DataError, match="observations of 4 and actions of 1 dims; task 'minari-test-swimmer' has 8"):
        minari_episodes(f"minari:tests/{name}-v0", get_task("minari-test-swimmer"), 10).load()
    with pytest.raises(DataError, match="not a Minari dataset folder"):
        minari_episodes(str(tmp_path), get_task(name), 10)
    # actions recorded beyond the dataset's own action space: named as such, before they are mapped
    outside = made_up_episodes(get_task(name), 3.0, count=4, seed=1)
    outside[1]["actions"][2, 0] = 4.5
    name = "minari-test-swimmer"
    write_with_minari(name, [{**episode, "observations": np.zeros((len(episode["rewards"]) + 1, 8), np.float32),
                              "actions": np.repeat(episode["actions"], 2, axis=1)} for episode in outside], 3.0)
    with pytest.raises(DataError, match=r"episode 1: action dim 0 is 4\.5 at step 2, outside the dataset's action "
                                        r"space \[-3, 3\]: record the actions the env was given"):
        minari_episodes(f"minari:tests/{name}-v0", get_task(name), 10).load()


def test_collect_format_minari_round_trip(minari_root, tmp_path, capsys):
    out = tmp_path / "collected"
    arguments = ["--tasks", "reach-v2", "--episodes", "3", "--max_steps", "12", "--workers", "0", "--out", str(out),
                 "--format", "minari", "--minari_namespace", "ours"]
    collect_main(arguments)
    folder = minari_root / "ours" / "reach-v2-v0"
    dataset = minari.load_dataset("ours/reach-v2-v0")
    metadata = json.loads((folder / "data" / "metadata.json").read_text())
    entry = json.loads((out / "collect.json").read_text())["reach-v2"]
    assert metadata["m3dt"]["collection"] == entry and metadata["m3dt"]["family"] == "metaworld"
    assert dataset.total_episodes == 3
    assert dataset.observation_space.shape == (39,) and dataset.action_space.shape == (4,)
    for index, episode in enumerate(dataset.iterate_episodes()):
        path = out / "reach-v2" / f"{index}.npz"
        original = load_episode(path)
        with np.load(path) as archive:
            final = archive["final_observation"]
        np.testing.assert_array_equal(episode.observations, np.concatenate([original.observations, final[None]]))
        np.testing.assert_array_equal(episode.actions, original.actions[:, :4])
        np.testing.assert_array_equal(episode.rewards, original.rewards)
        assert episode.truncations[-1] and not episode.terminations.any()
    # it trains as the npz files do
    from_minari, from_npz = TaskDataset("minari:ours", ["reach-v2"]), TaskDataset(out, ["reach-v2"])
    for key in ("observations", "actions", "returns_to_go", "episode_starts", "state_mean"):
        np.testing.assert_array_equal(getattr(from_minari, key), getattr(from_npz, key))
    # a rerun keeps the dataset; another collection under the same id (more episodes; another seed into another
    # folder) is refused in one line before anything is collected, not after
    collect_main(arguments)
    for other in ([*arguments[:3], "4", *arguments[4:]], [*arguments[:9], str(tmp_path / "other"), *arguments[10:],
                                                           "--seed", "1"]):
        with pytest.raises(SystemExit):
            collect_main(other)
        assert "holds another collection of reach-v2" in capsys.readouterr().err
    assert not (out / "reach-v2" / "3.npz").exists() and not (tmp_path / "other" / "reach-v2").exists()
    # a damaged file (a truncated HDF5) was a traceback where a stage read it, and a rerun kept it: one line each
    hdf5 = folder / "data" / "main_data.hdf5"
    whole = hdf5.read_bytes()
    hdf5.write_bytes(whole[:3000])
    with pytest.raises(DataError, match=r"reach-v2-v0: a file of this Minari dataset cannot be read \(OSError: .*"
                                        r"truncated file.*; write or download the dataset again$"):
        TaskDataset("minari:ours", ["reach-v2"])
    with pytest.raises(SystemExit):
        collect_main(arguments)
    error = capsys.readouterr().err
    assert "cannot be read (OSError: " in error and "delete it (minari delete ours/reach-v2-v0) and collect again" in error
    hdf5.write_bytes(whole)
    # an export cut between Minari's episodes and m3dt's metadata: named as such, not as another collection
    metadata.pop("m3dt")
    (folder / "data" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit):
        collect_main([*arguments[:3], "4", *arguments[4:]])
    assert "has no m3dt metadata (not written by m3dt, or its writing was cut short)" in capsys.readouterr().err

"""Made-up datasets in the MT160 layout, for tests and benchmarks (no download, no simulator): each task's
real native obs/action dims zero-padded to 39/8, actions a fixed function of the state so that a model can
learn them and a falling loss means something."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM, get_task


def write_episode(path: Path, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
    """Write one episode file at `path` (np.savez) with terminals (T,) True at the last step only."""
    terminals = np.zeros(len(rewards), dtype=bool)
    terminals[-1] = True
    np.savez(path, observations=observations, actions=actions, rewards=rewards, terminals=terminals)


def make_task_data(root: Path, task_name: str, episodes: int, steps: int | None, seed: int) -> None:
    """`episodes` files for one task: states a random walk in the task's native dims, actions tanh of a
    fixed linear map of the state (different per task), rewards in [0, 1]. `steps` None: the task's
    horizon. ant-dir episodes end early at random, as its data does."""
    task = get_task(task_name)
    steps = steps or task.horizon
    rng = np.random.default_rng(seed)
    task_rng = np.random.default_rng(task.index)
    mixing = task_rng.normal(size=(task.obs_dim, task.act_dim)) / np.sqrt(task.obs_dim)
    folder = root / task_name
    folder.mkdir(parents=True, exist_ok=True)
    for episode in range(episodes):
        # ant-dir episodes end early (the ant falls) at random, after at least one step
        length = steps if task.family != "ant_dir" else int(rng.integers(max(1, steps // 2), steps + 1))
        native = np.cumsum(rng.normal(scale=0.3, size=(length, task.obs_dim)), axis=0)
        observations = np.zeros((length, MAX_OBS_DIM), dtype=np.float32)
        observations[:, : task.obs_dim] = native
        actions = np.zeros((length, MAX_ACT_DIM), dtype=np.float32)
        actions[:, : task.act_dim] = np.tanh(native @ mixing)
        rewards = rng.uniform(size=length).astype(np.float32)
        write_episode(folder / f"{episode}.npz", observations, actions, rewards)


def make_dataset(root: Path, tasks: list[str], episodes: int = 6, steps: int | None = 40) -> Path:
    """Write `episodes` made-up episode files for each of `tasks` under `root` (the data root, returned); a task's
    seed is its position in `tasks`. Raises TaskError for an unknown task name."""
    for offset, task in enumerate(tasks):
        make_task_data(root, task, episodes, steps, seed=offset)
    return root

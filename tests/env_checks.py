"""Checks shared by the environment tests: does an env's padded observation follow the MT160 dataset layout?

The official per-task state statistics say which of the 39 dims never vary in the dataset (padding, fixed
goal coordinates, unused object slots) and what value they hold. An env that builds its observation in
the dataset's layout must hold the same dims constant, at the same value.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from m3dt.envs import make_env
from m3dt.tasks import MAX_OBS_DIM, STATE_STATS_FILE, Task

CONSTANT_STD = 1e-5  # a constant dim reads 0, or 1e-6 where the stats store std + 1e-6 (Meta-World)


@lru_cache(maxsize=1)
def state_stats() -> dict[str, dict[str, list[float]]]:
    return json.loads(STATE_STATS_FILE.read_text())


def random_rollout_observations(
    task: Task, episodes: tuple[int, ...] = (0, 1), steps: int = 10
) -> np.ndarray:
    """Padded observations (reset + up to `steps` random actions) of a few evaluation episodes, stacked."""
    rng = np.random.default_rng(0)
    observations = []
    for episode in episodes:
        env = make_env(task.name, episode=episode, seed=0)
        observations.append(env.reset())
        for _ in range(steps):
            observation, reward, done, info = env.step(rng.uniform(-1.0, 1.0, task.act_dim))
            assert isinstance(reward, float) and isinstance(info["success"], bool)
            observations.append(observation)
            if done:
                break
        env.close()
    return np.stack(observations)


def assert_dataset_layout(task: Task, observations: np.ndarray) -> None:
    """Padded, finite float32 obs whose dataset-constant dims are constant here too, at the dataset value."""
    assert observations.dtype == np.float32 and observations.shape[1] == MAX_OBS_DIM
    assert np.isfinite(observations).all()
    assert not observations[:, task.obs_dim :].any(), "dims beyond the native obs_dim must be zero padding"

    mean = np.array(state_stats()[task.name]["state_mean"])
    constant_dims = np.flatnonzero(np.array(state_stats()[task.name]["state_std"]) < CONSTANT_STD)
    varying_here = [int(d) for d in constant_dims if np.ptp(observations[:, d]) > 1e-6]
    assert not varying_here, f"dims constant in the dataset vary in the env: {varying_here}"
    wrong_value = [int(d) for d in constant_dims if abs(observations[0, d] - mean[d]) > 1e-4]
    assert not wrong_value, f"dims constant in the dataset hold another value in the env: {wrong_value}"

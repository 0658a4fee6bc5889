"""The wrapper contract shared by every environment family."""

from __future__ import annotations

from typing import Union

import numpy as np

from m3dt.tasks import MAX_OBS_DIM, Task, TaskError

# What m3dt.video renders (names only: mujoco is imported by the families that need it).
Physics = tuple["mujoco.MjModel", "mujoco.MjData"]
Camera = Union[int, str, "mujoco.MjvCamera", None]  # a camera id or name of the model, or a free camera


def pad_observation(observation: np.ndarray) -> np.ndarray:
    """Zero-pad a native observation to the dataset's 39 dims (float32)."""
    observation = np.asarray(observation, dtype=np.float32).reshape(-1)
    padded = np.zeros(MAX_OBS_DIM, dtype=np.float32)
    padded[: observation.shape[0]] = observation
    return padded


class TaskEnv:
    """One task's environment for one evaluation episode. Subclasses implement `_reset` and `_step`
    on native observations; this class pads them, counts steps and ends the episode at the horizon."""

    def __init__(self, task: Task, episode: int, seed: int):
        self.task = task
        self.episode = episode
        self.seed = seed
        self.steps = 0

    def reset(self) -> np.ndarray:
        """Start the episode; the first observation, zero-padded to 39 dims (float32). Raises TaskError when
        the env observes another width than the task table says."""
        self.steps = 0
        observation = np.asarray(self._reset()).reshape(-1)
        if observation.shape[0] != self.task.obs_dim:  # a task of one's own whose table row is wrong
            raise TaskError(f"task '{self.task.name}': its env observes {observation.shape[0]} dims, the task "
                            f"table says obs_dim {self.task.obs_dim}")
        return pad_observation(observation)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        """Apply `action` (act_dim values): the padded next observation, the reward, whether the episode
        ended (the env terminated or the task's horizon was reached) and the env's info (with "success")."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.task.act_dim:
            raise ValueError(f"{self.task.name}: action has {action.shape[0]} dims, expected {self.task.act_dim}")
        observation, reward, terminated, info = self._step(action)
        self.steps += 1
        info.setdefault("success", False)
        done = bool(terminated) or self.steps >= self.task.horizon
        return pad_observation(observation), float(reward), done, info

    def close(self) -> None:
        """Release the simulator (nothing by default)."""

    def physics(self) -> Physics:
        """The MuJoCo model and data of the current state, for m3dt.video."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rendered")

    def camera(self) -> Camera:
        """The camera m3dt.video renders from (None: a free camera following the agent)."""
        return None

    # Family modules implement these two on native (unpadded) observations.
    def _reset(self) -> np.ndarray:
        raise NotImplementedError

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        raise NotImplementedError

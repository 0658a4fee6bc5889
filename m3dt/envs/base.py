"""The wrapper contract shared by every environment family."""

from __future__ import annotations

import numpy as np

from m3dt.tasks import MAX_OBS_DIM, Task, TaskError


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
        self.steps = 0
        observation = np.asarray(self._reset()).reshape(-1)
        if observation.shape[0] != self.task.obs_dim:  # a task of one's own whose table row is wrong
            raise TaskError(f"task '{self.task.name}': its env observes {observation.shape[0]} dims, the task "
                            f"table says obs_dim {self.task.obs_dim}")
        return pad_observation(observation)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.task.act_dim:
            raise ValueError(f"{self.task.name}: action has {action.shape[0]} dims, expected {self.task.act_dim}")
        observation, reward, terminated, info = self._step(action)
        self.steps += 1
        info.setdefault("success", False)
        done = bool(terminated) or self.steps >= self.task.horizon
        return pad_observation(observation), float(reward), done, info

    def close(self) -> None:
        pass

    # What m3dt.video renders: the MuJoCo model and data of the current state, and the camera to use (an id
    # or name of a camera of the model, or a mujoco.MjvCamera; None: the default tracking camera).
    def physics(self):
        raise NotImplementedError(f"{type(self).__name__} cannot be rendered")

    def camera(self):
        return None

    # Family modules implement these two on native (unpadded) observations.
    def _reset(self) -> np.ndarray:
        raise NotImplementedError

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        raise NotImplementedError

"""A user's task given by a gymnasium env id (README "Your own tasks"), behind the TaskEnv contract.

- built with `gymnasium.make(env_id, **env_kwargs)`; episode e of run seed s resets with the seed derived
  from (s, e), so an evaluation is repeatable and its episodes differ;
- actions: the model acts in [-1, 1] on every task; a Box action space with other finite bounds receives
  them rescaled linearly to its bounds (the Minari reader maps such a dataset's actions the other way);
- the episode ends when the env terminates or truncates it, or at the task's horizon;
- observations must be flat Boxes of the table's obs_dim (checked at construction: one line naming the task).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from m3dt.envs.base import Physics, TaskEnv
from m3dt.tasks import Task, TaskError


def action_bounds(space: gym.Space, task_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite (low, high) bounds of a flat Box action space."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise TaskError(f"task '{task_name}': the env's action space must be a flat Box, got {space}")
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise TaskError(f"task '{task_name}': the env's action space must have finite bounds, got {space}")
    return space.low.astype(np.float64), space.high.astype(np.float64)


def from_unit_range(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [low, high], linearly."""
    return low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (high - low)


def to_unit_range(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[low, high] -> [-1, 1], linearly (the inverse of from_unit_range)."""
    return 2.0 * (action - low) / (high - low) - 1.0


class GymnasiumEnv(TaskEnv):
    """A user's task given by a gymnasium env id and kwargs (README "Your own tasks"); actions in [-1, 1] are
    mapped onto the env's bounds. Raises TaskError when the env's widths differ from the task table's."""

    def __init__(self, task: Task, episode: int, seed: int):
        super().__init__(task, episode, seed)
        try:
            self.env = gym.make(task.env_id, **task.env_kwargs)
        except gym.error.Error as error:
            raise TaskError(f"task '{task.name}': gymnasium cannot make {task.env_id}: {error}") from None
        observation_shape = self.env.observation_space.shape
        if observation_shape != (task.obs_dim,):
            raise TaskError(f"task '{task.name}': {task.env_id} observes shape {observation_shape}, the task "
                            f"table says obs_dim {task.obs_dim}")
        self.low, self.high = action_bounds(self.env.action_space, task.name)
        if self.low.shape != (task.act_dim,):
            raise TaskError(f"task '{task.name}': {task.env_id} acts with {self.low.shape[0]} dims, the task "
                            f"table says act_dim {task.act_dim}")
        self.reset_seed = int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])

    def _reset(self) -> np.ndarray:
        observation, _ = self.env.reset(seed=self.reset_seed)
        return observation

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(from_unit_range(action, self.low, self.high))
        return observation, reward, terminated or truncated, {"success": bool(info.get("success", False))}

    def physics(self) -> Physics:
        unwrapped = self.env.unwrapped
        if not hasattr(unwrapped, "model") or not hasattr(unwrapped, "data"):
            raise TaskError(f"task '{self.task.name}': {self.task.env_id} is not a MuJoCo env; videos need one")
        return unwrapped.model, unwrapped.data

    def close(self) -> None:
        """Close the gymnasium env."""
        self.env.close()

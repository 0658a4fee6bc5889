"""The 30 DeepMind Control tasks of MT160 under M3DT's evaluation protocol.

19 tasks come straight from the dm_control suite, 11 from `dmc_extra_tasks`. The protocol is that of the
reference evaluator, which wraps the suite as TD-MPC2 does:
- each env step applies the action twice (action repeat 2) and returns the sum of the two rewards, so the
  500-step horizon covers the suite's 1000 control steps;
- actions are clipped to [-1, 1], which is every task's actuator range;
- the observation is the observation dict flattened and concatenated in the order the task returns it;
- the task's random state is seeded with the evaluation episode (0..9), whatever the run seed.
Episodes never end early and there is no success signal.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from dm_control import suite
from dm_control.rl import control

from m3dt.envs.base import Camera, Physics, TaskEnv
from m3dt.envs.dmc_extra_tasks import EXTRA_TASKS, load_extra_task
from m3dt.tasks import Task, TaskError

ACTION_REPEAT = 2
SUITE_DOMAIN_NAMES = {"cup": "ball_in_cup"}  # task-name prefix -> dm_control domain, where they differ


def load_environment(task_name: str, random: int) -> control.Environment:
    """The dm_control environment of an MT160 task name (e.g. 'cartpole-balance-sparse' is the suite's
    cartpole/balance_sparse); `random` seeds the task's initial states."""
    if task_name in EXTRA_TASKS:
        return load_extra_task(task_name, random)
    domain, task = task_name.replace("-", "_").split("_", 1)
    return suite.load(SUITE_DOMAIN_NAMES.get(domain, domain), task, task_kwargs={"random": random})


def flatten_observation(observation: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate the observation dict in its own order (scalars such as walker's height become 1 dim):
    the layout of the MT160 data."""
    return np.concatenate([np.asarray(value, dtype=np.float64).reshape(-1) for value in observation.values()])


class DMCEnv(TaskEnv):
    """One DMC task for one evaluation episode; `episode` is the suite seed, the run seed is unused."""

    def __init__(self, task: Task, episode: int, seed: int):
        super().__init__(task, episode, seed)
        self.environment = load_environment(task.name, random=episode)
        action_dims = self.environment.action_spec().shape[0]
        if action_dims != task.act_dim:  # a task of one's own whose table row is wrong
            raise TaskError(f"task '{task.name}': its env acts with {action_dims} dims, the task table says act_dim "
                            f"{task.act_dim}")

    def _reset(self) -> np.ndarray:
        # Re-seed so that every reset of this episode starts from the same state: the episode is the seed.
        self.environment.task.random.seed(self.episode)
        return flatten_observation(self.environment.reset().observation)

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        action = np.clip(action, -1.0, 1.0)
        reward = 0.0
        for _ in range(ACTION_REPEAT):
            time_step = self.environment.step(action)
            reward += time_step.reward
        return flatten_observation(time_step.observation), reward, False, {}

    def physics(self) -> Physics:
        physics = self.environment.physics
        return physics.model.ptr, physics.data.ptr

    def camera(self) -> Camera:
        return 0  # every suite domain's first camera: the one dm_control renders by default

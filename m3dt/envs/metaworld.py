"""Meta-World tasks (50) on the installed metaworld 3.1.1.

The MT160 dataset names its tasks 'X-v2' (Meta-World v2). metaworld 3.1.1 ships only the v3 versions of the
same 50 tasks, with the same 39-d observation layout (hand xyz, gripper opening, two object pose slots,
the previous frame of those 18 dims, goal xyz) and 4-d action. Every dataset name maps to its v3 env by
replacing the suffix: 'X-v2' -> 'X-v3'. All 50 exist under that name in the package (tested); none needs a
special case.

Evaluation follows the protocol's "MT1 goal-observable env, 10 different goals", made repeatable: the goals
are those of `metaworld.MT1(name, seed=seed)`, which samples 50 of them from numpy's global RNG seeded with
`seed`, and episode e uses the e-th. The reset state of a goal is deterministic (metaworld freezes the
random vector that places goal and objects once a task is set).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache

import metaworld
import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from m3dt.envs.base import Camera, Physics, TaskEnv
from m3dt.tasks import Task


def v3_name(task_name: str) -> str:
    """The installed metaworld's name of a dataset task: 'reach-v2' -> 'reach-v3'."""
    if not task_name.endswith("-v2"):
        raise ValueError(f"'{task_name}' is not a Meta-World dataset task name (expected a '-v2' suffix)")
    return task_name.removesuffix("-v2") + "-v3"


@lru_cache(maxsize=256)
def mt1_benchmark(env_name: str, seed: int) -> metaworld.MT1:
    """The seeded MT1 benchmark of one v3 env. Building it resets a fresh env 50 times (~0.6 s), so it is
    built once per (env, seed) and shared by every episode; it only holds the pickled goals."""
    return metaworld.MT1(env_name, seed=seed)


class MetaWorldEnv(TaskEnv):
    """A Meta-World task with the `episode`-th goal of the MT1 benchmark seeded with `seed`."""

    def __init__(self, task: Task, episode: int, seed: int):
        super().__init__(task, episode, seed)
        env_name = v3_name(task.name)
        benchmark = mt1_benchmark(env_name, seed)
        goals = benchmark.train_tasks
        if not 0 <= episode < len(goals):
            raise ValueError(
                f"{task.name}: episode {episode} has no goal; MT1 samples {len(goals)} goals per seed "
                "(use another seed for more)"
            )
        self._env = benchmark.train_classes[env_name]()
        self._env.set_task(goals[episode])
        # metaworld raises on the step after its own 500-step limit; the base class owns the horizon, so
        # lift the env's limit to keep an extra step (e.g. from a batched evaluator) harmless.
        self._env.max_path_length = sys.maxsize

    def _reset(self) -> np.ndarray:
        observation, _ = self._env.reset()
        return observation

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        observation, reward, terminated, _, info = self._env.step(action)
        # metaworld reports success as a float 0/1; the evaluator counts "success at any step".
        return observation, reward, terminated, dict(info, success=bool(info["success"]))

    def physics(self) -> Physics:
        return self._env.model, self._env.data

    def camera(self) -> Camera:
        """A view of the table from its front right corner (metaworld's own corner cameras are mounted upside
        down: its renderer flips their images)."""
        import mujoco

        camera = mujoco.MjvCamera()
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        camera.lookat[:] = (0.0, 0.65, 0.15)
        camera.distance, camera.azimuth, camera.elevation = 1.6, 135.0, -25.0
        return camera

    def close(self) -> None:
        """Close the Meta-World env."""
        self._env.close()


def scripted_policy(task_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """metaworld's scripted expert for a dataset task, as a function from the 39-d observation to the
    4-d action, clipped to the action space [-1, 1] that the env applies."""
    expert = ENV_POLICY_MAP[v3_name(task_name)]()

    def act(observation: np.ndarray) -> np.ndarray:
        action = expert.get_action(np.asarray(observation, dtype=np.float64))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    return act

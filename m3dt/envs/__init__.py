"""One factory for the environments of all 160 tasks (and of a user's own tasks, README "Your own tasks").

Contract every family module follows (see `base.TaskEnv`):
- `reset() -> obs`: float32 array of shape (39,), the native observation zero-padded to 39 dims in the
  layout of the MT160 dataset;
- `step(action) -> (obs, reward, done, info)`: `action` has the task's true `act_dim` dims; `done` is True
  on termination (ant-dir) or when the task's horizon is reached; `info["success"]` is a bool for
  Meta-World (False elsewhere).
- `episode` selects the evaluation episode: Meta-World's goal (the episode-th goal of a seeded MT1),
  DMC's seed (episode 0..9 whatever the run seed, as the protocol says), the locomotion reset noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "disable")  # nothing renders; avoids GLFW display errors

from m3dt.envs.base import TaskEnv  # noqa: E402
from m3dt.tasks import Task, get_task  # noqa: E402


def make_env(task: str | Task, episode: int = 0, seed: int = 0) -> TaskEnv:
    """Build the environment of `task` (a name, or the Task itself: worker processes receive Task objects, so
    that a user's tasks need no registration there) for evaluation episode `episode` under run seed `seed`."""
    task = get_task(task) if isinstance(task, str) else task
    if task.env_id is not None:
        from m3dt.envs.gymnasium_env import GymnasiumEnv

        return GymnasiumEnv(task, episode, seed)
    if task.family == "metaworld":
        from m3dt.envs.metaworld import MetaWorldEnv

        return MetaWorldEnv(task, episode, seed)
    if task.family == "dmc":
        from m3dt.envs.dmc import DMCEnv

        return DMCEnv(task, episode, seed)
    from m3dt.envs.locomotion import LocomotionEnv

    return LocomotionEnv(task, episode, seed)


__all__ = ["TaskEnv", "make_env"]

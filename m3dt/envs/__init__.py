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

import numpy as np  # noqa: E402

from m3dt.envs.base import TaskEnv  # noqa: E402
from m3dt.tasks import Task, TaskError, get_task  # noqa: E402


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


def check_env(task: Task) -> bool:
    """Build a user's task's env, reset it, take one zero-action step and close it, so that a wrong env id,
    task name or width in a task table stops a stage before it trains, not the evaluation after it.
    Returns False, checking nothing, when the family's simulator package is not installed (a training
    machine may lack it; the evaluation builds the env again). Raises TaskError in one line naming the task."""
    try:
        env = make_env(task)
    except ImportError:
        return False
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 (gymnasium and dm_control raise many types for a bad name)
        raise TaskError(f"task '{task.name}': its env cannot be built: {' '.join(str(error).split())}") from None
    try:
        env.reset()
        env.step(np.zeros(task.act_dim))
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 (a simulator refusing an action of act_dim dims)
        raise TaskError(f"task '{task.name}': its env does not run with the task table's act_dim {task.act_dim}: "
                        f"{' '.join(str(error).split())}") from None
    finally:
        env.close()
    return True


__all__ = ["TaskEnv", "check_env", "make_env"]

"""The MT160 task table and the official task suites.

Everything the pipeline needs to know about a task (family, true action dim, horizon, return target,
RTG scale, goal parameter) comes from `configs/reference/mt160_tasks.json`, the official table; the suites
mt10..mt160 for seeds 0-2 come from `configs/reference/mt160_suites.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "configs" / "reference"
TASK_TABLE_FILE = REFERENCE_DIR / "mt160_tasks.json"
SUITES_FILE = REFERENCE_DIR / "mt160_suites.json"
STATE_STATS_FILE = REFERENCE_DIR / "mt160_state_stats.json"

FAMILIES = ("metaworld", "dmc", "ant_dir", "cheetah_vel")
MAX_OBS_DIM = 39  # every observation is zero-padded to this width
MAX_ACT_DIM = 8  # every action is zero-padded to this width
MT1_GOALS = 50  # goals that one seeded metaworld.MT1 samples per task: Meta-World episodes per seed


class TaskError(ValueError):
    """A task name or task list that the task table does not know."""


@dataclass(frozen=True)
class Task:
    name: str
    index: int  # position in the official MT160 order
    family: str
    act_dim: int  # true action dims; the loss and the env use only these
    obs_dim: int  # native observation dims before zero-padding to 39
    horizon: int
    return_target: float  # evaluation start return (RTG before scaling)
    rtg_scale: float
    single_task_score: float  # the paper's single-task DT reference score
    train_trajectories: int
    goal: float | None  # ant-dir goal angle (rad) or cheetah-vel target velocity


@lru_cache(maxsize=1)
def task_table() -> dict[str, Task]:
    rows = json.loads(TASK_TABLE_FILE.read_text())["tasks"]
    table = {}
    for row in rows:
        table[row["task"]] = Task(
            name=row["task"],
            index=row["index"],
            family=row["family"],
            act_dim=row["act_dim"],
            obs_dim=row["obs_dim"],
            horizon=row["horizon"],
            return_target=row["return_target"],
            rtg_scale=row["rtg_scale"],
            single_task_score=row["single_task_score"],
            train_trajectories=row["train_trajectories"],
            goal=row.get("goal_angle_rad", row.get("goal_velocity")),
        )
    return table


def get_task(name: str) -> Task:
    table = task_table()
    if name not in table:
        raise TaskError(f"unknown task '{name}': not in the task table {TASK_TABLE_FILE.name}")
    return table[name]


@lru_cache(maxsize=1)
def suites() -> dict[str, dict[str, list[str]]]:
    return json.loads(SUITES_FILE.read_text())


def suite_names() -> list[str]:
    return list(suites()["seed0"])


def resolve_tasks(prefix_name: str | None, tasks: str | None, seed: int) -> list[str]:
    """The task list of a run: `--tasks a,b,c`, `--tasks @file.json`, or an official suite by name.

    Official suites exist for seeds 0, 1, 2; other seeds use seed 0's lists (the reference does the same:
    its lists are keyed by seed and the paper reports seeds 0-2).
    """
    if tasks:
        if tasks.startswith("@"):
            path = Path(tasks[1:])
            if not path.is_file():
                raise TaskError(f"task list file {path} does not exist")
            try:
                names = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise TaskError(f"task list file {path} is not valid JSON: {error}") from None
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise TaskError(f"task list file {path} must hold a JSON list of task names")
        else:
            names = [name.strip() for name in tasks.split(",") if name.strip()]
    elif prefix_name:
        seed_key = f"seed{seed}" if f"seed{seed}" in suites() else "seed0"
        if prefix_name not in suites()[seed_key]:
            raise TaskError(f"unknown suite '{prefix_name}': choose one of {', '.join(suite_names())}")
        names = list(suites()[seed_key][prefix_name])
    else:
        raise TaskError("no tasks: give --prefix_name (e.g. mt160) or --tasks")
    if not names:
        raise TaskError("the task list is empty")
    if len(set(names)) != len(names):
        raise TaskError("the task list repeats a task")
    for name in names:
        get_task(name)
    return names


def check_timesteps(max_timestep: int, task_names: list[str]) -> None:
    """Timesteps run from 0 to horizon - 1 in training (the data's are capped there, as the reference caps
    them), in the prompts and in evaluation; the timestep embedding of `max_timestep` entries must hold each.
    Raises TaskError naming the task with the longest horizon."""
    longest = max((get_task(name) for name in task_names), key=lambda task: task.horizon)
    if max_timestep < longest.horizon:
        raise TaskError(f"--max_timestep {max_timestep} is below the horizon of {longest.name} ({longest.horizon} "
                        f"steps): training, prompts and evaluation use timesteps up to {longest.horizon - 1}; "
                        f"use --max_timestep {longest.horizon} or more (the reference uses 1000)")

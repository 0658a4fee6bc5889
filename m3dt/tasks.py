"""The MT160 task table, the official task suites, and the user's own task tables.

Everything the pipeline needs to know about a task (family, true action dim, horizon, return target,
RTG scale, goal parameter) comes from `configs/reference/mt160_tasks.json`, the official table; the suites
mt10..mt160 for seeds 0-2 come from `configs/reference/mt160_suites.json`.

A task table of your own (`--task_table FILE`, README "Your own tasks") adds tasks outside MT160 with the
same columns: either a task of the dmc, ant_dir or cheetah_vel family, built and scored by that family's rules
(not metaworld: every Meta-World v2 task is already in MT160), or a gymnasium environment (`env_id` +
`env_kwargs`) scored linearly between two returns.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from m3dt.run import read_json

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "configs" / "reference"
TASK_TABLE_FILE = REFERENCE_DIR / "mt160_tasks.json"
SUITES_FILE = REFERENCE_DIR / "mt160_suites.json"
STATE_STATS_FILE = REFERENCE_DIR / "mt160_state_stats.json"

FAMILIES = ("metaworld", "dmc", "ant_dir", "cheetah_vel")
GYMNASIUM = "gymnasium"  # the family of a user's task given by a gymnasium env id
MAX_OBS_DIM = 39  # every observation is zero-padded to this width
MAX_ACT_DIM = 8  # every action is zero-padded to this width
MINARI_PREFIX = "minari:"  # a data path or task-table dataset naming a local Minari dataset: minari:ID
MT1_GOALS = 50  # goals that one seeded metaworld.MT1 samples per task: Meta-World episodes per seed
# evaluation episodes per task, the protocol's (README "Evaluation"); a gymnasium task of one's own (README
# "Your own tasks") gets 10, as D4RL-style evaluations do
EPISODES_PER_FAMILY = {"metaworld": 10, "dmc": 10, "ant_dir": 1, "cheetah_vel": 1, GYMNASIUM: 10}


class TaskError(ValueError):
    """A task name or task list that the task table does not know."""


class UnknownTask(TaskError):
    """A task name that neither MT160's table nor a registered table of the user's holds (`name`)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Task:
    """One row of the task table: what the data layer, the model and the evaluator need to know of a task."""

    name: str
    index: int  # position in the official MT160 order
    family: str
    act_dim: int  # true action dims; the loss and the env use only these
    obs_dim: int  # native observation dims before zero-padding to 39
    horizon: int
    return_target: float  # evaluation start return (RTG before scaling)
    rtg_scale: float
    single_task_score: float | None  # the paper's single-task DT reference score (None for a user's task)
    train_trajectories: int | None
    goal: float | None  # ant-dir goal angle (rad) or cheetah-vel target velocity
    # A user's task (README "Your own tasks"); the MT160 tasks leave these empty.
    env_id: str | None = None  # gymnasium env id, built with gymnasium.make(env_id, **env_kwargs)
    env_kwargs: dict = field(default_factory=dict, hash=False)
    score_returns: tuple[float, float] | None = None  # score 0 and 100 at these mean returns (gymnasium tasks)
    dataset: str | None = None  # where its data is, instead of {data_path}/{task}: minari:ID or a folder


@lru_cache(maxsize=1)
def task_table() -> dict[str, Task]:
    """The official MT160 task table (configs/reference/mt160_tasks.json) by task name, in its order; read once."""
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
    """The task `name` of the MT160 table or of a registered table of the user's; TaskError for an unknown name."""
    if name in task_table():
        return task_table()[name]
    if name in _user_tasks:
        return _user_tasks[name]
    tables = ", ".join([TASK_TABLE_FILE.name, *_user_table_files]) if _user_table_files else TASK_TABLE_FILE.name
    hint = "" if _user_table_files else (" (tasks of your own: a task table, given to the training stages with "
                                            "--task_table FILE; README \"Your own tasks\")")
    raise UnknownTask(name, f"unknown task '{name}': not in the task table {tables}{hint}")


# ---------------------------------------------------------------------------------------------------------
# The user's own tasks

_user_tasks: dict[str, Task] = {}  # registered by use_task_table / register_task_rows, after the MT160 table
_user_table_files: list[str] = []
REQUIRED_COLUMNS = ("task", "obs_dim", "act_dim", "horizon", "return_target", "rtg_scale")
OPTIONAL_COLUMNS = ("family", "env_id", "env_kwargs", "score_min_return", "score_max_return", "single_task_score",
                    "dataset", "goal_angle_rad", "goal_velocity", "index", "train_trajectories",
                    "obs_dims_nonconstant")
USER_FAMILIES = ("dmc", "ant_dir", "cheetah_vel")  # not metaworld: every Meta-World v2 task is an MT160 task
GOAL_COLUMNS = {"ant_dir": "goal_angle_rad", "cheetah_vel": "goal_velocity"}
INTEGER_COLUMNS = {"obs_dim": MAX_OBS_DIM, "act_dim": MAX_ACT_DIM, "horizon": None, "train_trajectories": None}
NUMBER_COLUMNS = ("return_target", "rtg_scale", "single_task_score", *GOAL_COLUMNS.values())


def task_from_row(row: dict, where: str, index: int) -> Task:
    """A user's task from one row of a task table (the shipped table's columns; README "Your own tasks").

    A row has either `family` (one of USER_FAMILIES: the env is built from the task name by that family's
    module and scored by its rule; ant_dir and cheetah_vel rows give their goal column) or `env_id`
    (+ `env_kwargs`): a gymnasium env whose score is
    100 * (mean return - score_min_return) / (score_max_return - score_min_return), not clipped, as D4RL
    and Minari normalise. Every column is checked here; TaskError names `where`, the task and the column.
    """
    label = check_columns(row, where)
    family, env_id = check_source(row, label)
    check_numbers(row, label)
    score_returns = gymnasium_scores(row, label) if env_id is not None else None
    dataset = row.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise TaskError(f"{label}: dataset must be '{MINARI_PREFIX}DATASET_ID' or a folder, got {dataset!r}")
    return Task(
        name=row["task"], index=index, family=family or GYMNASIUM, act_dim=row["act_dim"], obs_dim=row["obs_dim"],
        horizon=row["horizon"], return_target=float(row["return_target"]), rtg_scale=float(row["rtg_scale"]),
        single_task_score=row.get("single_task_score"), train_trajectories=row.get("train_trajectories"),
        goal=row[GOAL_COLUMNS[family]] if family in GOAL_COLUMNS else None, env_id=env_id,
        env_kwargs=dict(row.get("env_kwargs", {})), score_returns=score_returns, dataset=dataset,
    )


def check_columns(row: object, where: str) -> str:
    """Check that a row is an object with the known columns and a name of one's own; return how messages
    name it ("FILE: task 'NAME'")."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: each task must be an object of columns, got {type(row).__name__}")
    name = row.get("task")
    label = f"{where}: task '{name}'" if isinstance(name, str) else where
    missing = [column for column in REQUIRED_COLUMNS if column not in row]
    unknown = sorted(set(row) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    if missing or unknown:
        raise TaskError(f"{label}: " + "; ".join(
            ([f"missing column(s) {', '.join(missing)}"] if missing else []) +
            ([f"unknown column(s) {', '.join(unknown)}"] if unknown else [])))
    if not isinstance(name, str) or not name or "/" in name:
        raise TaskError(f"{where}: 'task' must be a name without '/', got {name!r}")
    if name in task_table():
        raise TaskError(f"{label}: is an MT160 task; give your own tasks other names")
    return label


def check_source(row: dict, label: str) -> tuple[str | None, str | None]:
    """(family, env_id) of a row: exactly one of them, a family a task of one's own can have, the goal column
    of an ant_dir or cheetah_vel row and no goal column elsewhere."""
    family, env_id = row.get("family"), row.get("env_id")
    if (family is None) == (env_id is None):
        raise TaskError(f"{label}: give exactly one of 'family' ({', '.join(USER_FAMILIES)}) and 'env_id' (gymnasium)")
    if family == "metaworld":
        raise TaskError(f"{label}: family metaworld cannot hold a task of your own: every Meta-World v2 task is "
                        "already an MT160 task (name it in --tasks without a task table)")
    if family is not None and family not in USER_FAMILIES:
        raise TaskError(f"{label}: family must be one of {', '.join(USER_FAMILIES)}, got {family!r}")
    goal = GOAL_COLUMNS.get(family)
    if goal is not None and row.get(goal) is None:
        raise TaskError(f"{label}: {family} rows need the goal column {goal} (a number)")
    for other_family, column in GOAL_COLUMNS.items():
        if column != goal and row.get(column) is not None:  # null: absent, as a table from pandas writes it
            raise TaskError(f"{label}: {column} is the goal column of {other_family} rows only")
    return family, env_id


def check_numbers(row: dict, label: str) -> None:
    """The numeric columns: widths, horizon and trajectory count are positive integers, the others numbers
    (an optional column may be absent or null)."""
    for column, limit in INTEGER_COLUMNS.items():
        value = row.get(column)
        if value is None and column not in REQUIRED_COLUMNS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (limit is not None and value > limit):
            bound = f" and at most {limit} (the model's padded width)" if limit else ""
            raise TaskError(f"{label}: {column} must be an integer at least 1{bound}, got {value!r}")
    for column in NUMBER_COLUMNS:
        value = row.get(column)
        if not is_number(value) and (value is not None or column in REQUIRED_COLUMNS):
            raise TaskError(f"{label}: {column} must be a finite number, got {value!r}")
    if row["rtg_scale"] <= 0:
        raise TaskError(f"{label}: rtg_scale must be positive, got {row['rtg_scale']}")


def gymnasium_scores(row: dict, label: str) -> tuple[float, float]:
    """The returns a gymnasium task scores 0 and 100 at, after checking its env id and keyword arguments."""
    if not isinstance(row["env_id"], str):
        raise TaskError(f"{label}: env_id must be a gymnasium env id string, got {row['env_id']!r}")
    if not isinstance(row.get("env_kwargs", {}), dict):
        raise TaskError(f"{label}: env_kwargs must be an object of keyword arguments")
    low, high = row.get("score_min_return"), row.get("score_max_return")
    if not (is_number(low) and is_number(high) and high > low):
        raise TaskError(f"{label}: a gymnasium task needs score_min_return < score_max_return (finite numbers), "
                        f"got {low!r} and {high!r}")
    return float(low), float(high)


def is_number(value: object) -> bool:
    """A finite int or float of JSON (true and false are not numbers here; Python's JSON reads NaN and Infinity,
    which a return target or score bound cannot be)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def names_hash(names: list[str]) -> str:
    """Six hex digits of the sha256 of task names in the given order: how folders and reports name a task list
    that is not an official suite."""
    return hashlib.sha256(" ".join(names).encode()).hexdigest()[:6]


def read_task_table(path: str | Path) -> list[dict]:
    """The rows of a task table file: {"tasks": [row, ...]} as the shipped one, or a plain list of rows."""
    file = Path(path)
    content = read_json(file, "task table", TaskError)
    rows = content.get("tasks") if isinstance(content, dict) else content
    if not isinstance(rows, list) or not rows:
        raise TaskError(f"{file}: task table must hold a non-empty list of tasks (or {{\"tasks\": [...]}})")
    return rows


def register_task_rows(rows: list[dict], where: str) -> list[Task]:
    """Make a user's tasks known to get_task (in this process; env and loading workers receive Task objects).
    Registering the same row again is allowed; another row under a registered name is an error."""
    tasks = [task_from_row(row, where, len(task_table()) + len(_user_tasks) + position)
             for position, row in enumerate(rows)]
    names = [task.name for task in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TaskError(f"{where}: task name(s) {', '.join(twice)} appear more than once")
    for task in tasks:
        known = _user_tasks.get(task.name)
        if known is not None and task_row(known) != task_row(task):
            raise TaskError(f"{where}: task '{task.name}' differs from the one of the same name already in use")
    for task in tasks:
        _user_tasks.setdefault(task.name, task)
    return [_user_tasks[name] for name in names]


def use_task_table(path: str | Path) -> list[Task]:
    """--task_table FILE: register every task of the file; returns them."""
    rows = [dataset_beside_table(row, Path(path).parent) for row in read_task_table(path)]
    tasks = register_task_rows(rows, str(path))
    if str(path) not in _user_table_files:
        _user_table_files.append(str(path))
    return tasks


def dataset_beside_table(row: object, folder: Path) -> object:
    """A row whose `dataset` is a relative folder, with that folder made absolute from the task table's `folder`
    (so a table and its data move together, and a stage-1 manifest records where the data was)."""
    dataset = row.get("dataset") if isinstance(row, dict) else None
    if not isinstance(dataset, str) or dataset.startswith(MINARI_PREFIX) or Path(dataset).is_absolute():
        return row
    return {**row, "dataset": str((folder / dataset).resolve())}


def task_row(task: Task) -> dict:
    """A user's task as a task-table row (what a stage-1 manifest records, so that later stages and the
    evaluator know the run's tasks without the file)."""
    row = {"task": task.name, "obs_dim": task.obs_dim, "act_dim": task.act_dim, "horizon": task.horizon,
           "return_target": task.return_target, "rtg_scale": task.rtg_scale}
    if task.env_id is None:
        row["family"] = task.family
    else:
        row.update(env_id=task.env_id, env_kwargs=task.env_kwargs, score_min_return=task.score_returns[0],
                   score_max_return=task.score_returns[1])
    optional = {"single_task_score": task.single_task_score, "dataset": task.dataset,
                "train_trajectories": task.train_trajectories}
    if task.family in GOAL_COLUMNS:
        optional[GOAL_COLUMNS[task.family]] = task.goal
    row.update({key: value for key, value in optional.items() if value is not None})
    return row


def user_task_rows(names: list[str]) -> list[dict]:
    """The rows of the user's tasks among `names` (MT160 tasks need none)."""
    return [task_row(get_task(name)) for name in names if name not in task_table()]


@lru_cache(maxsize=1)
def suites() -> dict[str, dict[str, list[str]]]:
    """The official suites' task lists by seed key and suite: {"seed0": {"mt160": [task, ...], ...}, ...}; read once."""
    return json.loads(SUITES_FILE.read_text())


def suite_names() -> list[str]:
    """The official suite names (mt160, mt120, ..., mt10), as listed for seed 0."""
    return list(suites()["seed0"])


def resolve_tasks(prefix_name: str | None, tasks: str | None, seed: int) -> list[str]:
    """The task list of a run: `--tasks a,b,c`, `--tasks @file.json`, or an official suite by name.

    Official suites exist for seeds 0, 1, 2; other seeds use seed 0's lists (the reference does the same:
    its lists are keyed by seed and the paper reports seeds 0-2).
    """
    if tasks:
        if tasks.startswith("@"):
            path = Path(tasks[1:])
            names = read_json(path, "task list file", TaskError)
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise TaskError(f"{path}: task list file must hold a JSON list of task names")
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

"""Grids of runs from one YAML file: methods x suites x expert counts x seeds, trained and evaluated.

    python -m m3dt.experiment configs/experiments/paper_table1.yaml --dry_run        # the plan and its cost
    python -m m3dt.experiment configs/experiments/paper_table1.yaml --data_path ./mt160_used
    python -m m3dt.experiment GRID.yaml --shard 0/4                                  # runs 0, 4, 8, ... only
    python -m m3dt.experiment GRID.yaml --launcher slurm                             # a SLURM job per job

A grid file (configs/experiments/*.yaml):

    description: one line shown by --dry_run
    run_root: runs/paper                 # optional: where the run directories go (--run_root wins)
    options: {data_path: ./mt160_used}   # options of m3dt/config.py for every run (the stage scripts' flags)
    suites: [mt10, mt160]                # official suites, or names defined under task_sets
    task_sets: {mw5: "reach-v2,..."}     # optional: suites of your own, as --tasks takes them
    seeds: [0, 1, 2]
    evaluation: {episodes: null}         # m3dt.evaluate options: episodes, max_steps, workers, max_rollouts,
                                         #   device, context_actions
    slurm: {timeout_min: 4320, gpus_per_node: 1, slurm_partition: gpu}   # submitit parameters
    runs:                                # one entry per method; each may narrow suites/seeds and set options
      - method: prompt-dt
      - method: m3dt
        experts: {mt10: [8], mt160: [40]}     # or one list for every suite
        groupings: [gradient, random]
        options: {router_hidden: "256,256,256,128"}
      - method: prompt-dt
        config: configs/dense/prompt_dt_e8.yaml   # options from a stage config file (`options` win)
        variant: dense_e8                         # its run directories' suffix (default: from its options)

Layout: every (suite, seed) shares one run directory `{run_root}/{suite}_seed{seed}`, so Prompt-DT's
evaluation, every M3DT grouping and expert count and the ablations that start from stage 1 use one stage-1
backbone; the baselines train into its `baselines/` folder. An entry whose `options` change what stage 1
trains (model size, optimisation, schedule, data) gets a run directory of its own, `..._seed{seed}_{variant}`.
Files trained with other options are never reused or overwritten: two entries that would train the same files
two ways are refused when the grid is read, and files another grid trained otherwise stop the grid before it
starts (`differences`), as does data its training jobs would not find (`check_data`); a lock per job keeps a
second process off a job that is running.

Reruns skip what is done and resume what was cut: the stages resume from their checkpoints and say "already
finished", and an evaluation is skipped when the run holds a results.json of the same method, seed and
evaluation settings whose recorded checkpoint sha256 is the file's current one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from m3dt.baselines import METHODS as BASELINES, method_module
from m3dt.cli import INTERRUPTED_EXIT_CODES, USER_ERRORS, command, exit_with_message
from m3dt.config import (ArgumentParser, Config, ConfigError, check_values, load_yaml, option_value,
                         read_yaml_mapping)
from m3dt.data import DataError, files_fingerprint, task_source
from m3dt.evaluate import METHODS as EVALUATED_METHODS, check_episodes, method_name
from m3dt.evaluate import check_options as check_evaluation_options
from m3dt.model import build_model, set_up_stage
from m3dt.report import checkpoint_of, staleness
from m3dt.run import LockError, RunDir, exclusive_locks, manifest_path, read_json
from m3dt.tasks import EPISODES_PER_FAMILY, get_task, resolve_tasks, suite_names, use_task_table
from m3dt.train import named_device, resolve_device


@dataclass(frozen=True)
class Method:
    """How a grid runs one m3dt.evaluate --method: what trains it, and whether it has expert counts and groupings."""

    trains: str  # what trains it: "stages" (the three stages), "stage1", "baseline" (m3dt.baselines), "" (nothing)
    experts: bool  # has an expert count
    groupings: bool  # has a task grouping


def method_spec(method: str) -> Method:
    """How a grid runs an m3dt.evaluate --method: a comparison method has an expert count when --expert_num
    is one of its hyperparameters (m3dt/baselines)."""
    if method in BASELINES:
        return Method("baseline", "expert_num" in getattr(method_module(method), "HYPERPARAMETERS", ()), False)
    return {"prompt-dt": Method("stage1", False, False), "m3dt": Method("stages", True, True),
            "random": Method("", False, False)}[method]


METHODS = {method: method_spec(method) for method in EVALUATED_METHODS}
# Set by the grid for each run, not by a file's options.
GRID_CONTROLLED = {"prefix_name", "tasks", "seed", "run_dir", "grouping", "group_num", "expert_num", "expert_id",
                   "all", "shard", "max_iters", "restart", "config", "debug"}
EVALUATION_OPTIONS = {"episodes": int, "max_steps": int, "workers": int, "max_rollouts": int, "device": str,
                      "context_actions": str}
# What stage 1 depends on: an entry that changes one of these gets a run directory (and a backbone) of its own.
STAGE1_OPTIONS = (*Config().model_fields(), "batch_size", "learning_rate", "weight_decay", "warmup_steps",
                  "grad_clip", "dropout", "precision", "top_k", "backbone_steps", "data_path", "max_episodes")
# What the other training jobs read besides stage 1's options and their steps (compared through planned_steps).
GROUPING_OPTIONS = ("grouping_gradients", "kmeans_restarts", "kmeans_repeats", "kmeans_iterations", "kmeans_stop",
                    "kmeans_tolerance")
GRID_KEYS = {"description", "run_root", "options", "suites", "task_sets", "seeds", "evaluation", "slurm", "runs"}
ENTRY_KEYS = {"method", "experts", "groupings", "suites", "seeds", "config", "options", "variant"}


# ------------------------------------------------------------------------------------------ the grid file
@dataclass
class Entry:
    """One checked `runs:` entry of a grid file (load_entry), its suites, seeds and options resolved."""

    method: str
    experts: dict[str, list[int]]  # suite -> expert counts ([0] for methods without experts)
    groupings: list[str]
    suites: list[str]
    seeds: list[int]
    options: dict[str, Any]
    variant: str  # "" or the suffix of this entry's own run directories


@dataclass
class Grid:
    """A checked grid file (load_grid): its keys, each `runs:` entry an Entry."""

    path: Path
    description: str
    run_root: Path | None
    options: dict[str, Any]
    task_sets: dict[str, str]
    evaluation: dict[str, Any]
    slurm: dict[str, Any]
    entries: list[Entry]


def grid_error(path: Path, where: str, message: str) -> ConfigError:
    """A ConfigError (returned, for the caller to raise) naming the grid file and the place in it: a key or
    `runs[i]...`, or "" for the file itself."""
    return ConfigError(f"{path}: {where}{': ' if where else ''}{message}")


def check_options(path: Path, where: str, options: Any) -> dict[str, Any]:
    """Options of m3dt/config.py, minus those the grid sets itself, each converted to its type as a stage's
    --config file's are (option_value), so that a wrong one is one line naming the grid file, the place and the
    option."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise grid_error(path, where, "options must be a mapping of option: value")
    names = {option.name for option in dataclasses.fields(Config)}
    for name in options:
        if name not in names:
            raise grid_error(path, where, f"unknown option '{name}' (see --help of the stage scripts)")
        if name in GRID_CONTROLLED:
            raise grid_error(path, where, f"'{name}' is set by the grid (suites, seeds, experts, groupings)")
    try:
        return {name: option_value(name, value) for name, value in options.items()}
    except ConfigError as error:
        raise grid_error(path, where, str(error)) from None


def check_evaluation(path: Path, evaluation: Any) -> dict[str, Any]:
    """The grid's m3dt.evaluate options, typed and in range as m3dt.evaluate checks its own flags
    (check_evaluation_options, named_device), so that a bad one stops the grid when it is read rather than
    after its training; CUDA itself is looked for only when the jobs run here (main)."""
    if not isinstance(evaluation, dict):
        raise grid_error(path, "evaluation", "must be a mapping of m3dt.evaluate options")
    for name, value in evaluation.items():
        if name not in EVALUATION_OPTIONS:
            raise grid_error(path, "evaluation", f"unknown option '{name}' (known: {', '.join(EVALUATION_OPTIONS)})")
        kind = EVALUATION_OPTIONS[name]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise grid_error(path, "evaluation", f"{name} must be {kind.__name__}, got {value!r}")
    try:
        check_evaluation_options(evaluation.get("episodes"), evaluation.get("max_steps"), evaluation.get("workers"),
                                 evaluation.get("max_rollouts"), None, evaluation.get("context_actions") or "full")
        named_device(evaluation.get("device") or "auto")
    except ConfigError as error:
        raise grid_error(path, "evaluation", str(error)) from None
    return evaluation


def as_list(path: Path, where: str, value: Any, kind: type) -> list:
    """`value` as a list (one value: a list of it) of `kind`, a bool never counting as an int; ConfigError when
    it is empty or holds anything else."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(item, kind) and not isinstance(item, bool) for item in values):
        what = {int: "an integer", str: "a string"}.get(kind, f"a {kind.__name__}")
        raise grid_error(path, where, f"expected {what} or a non-empty list of them, got {value!r}")
    return values


def load_grid(path: Path) -> Grid:
    """Read and check a grid file; every problem is one ConfigError naming the file and the entry."""
    raw = read_yaml_mapping(path, "grid file")
    if not raw:
        raise grid_error(path, "", "the grid file is empty: it needs suites and runs (configs/experiments/*.yaml)")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise grid_error(path, "", f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(GRID_KEYS))})")
    task_sets = raw.get("task_sets") or {}
    if not isinstance(task_sets, dict) or not all(isinstance(value, str) for value in task_sets.values()):
        raise grid_error(path, "task_sets", "must map a suite name to a task list ('a,b,c' or '@file.json')")
    suites = as_list(path, "suites", raw.get("suites"), str)
    for suite in suites:
        if suite not in task_sets and suite not in suite_names():
            raise grid_error(path, "suites", f"'{suite}' is neither an official suite ({', '.join(suite_names())}) "
                                             "nor defined under task_sets")
    seeds = as_list(path, "seeds", raw.get("seeds", [0]), int)
    evaluation = check_evaluation(path, raw.get("evaluation") or {})
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise grid_error(path, "slurm", "must be a mapping of submitit parameters")
    options = check_options(path, "options", raw.get("options"))
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise grid_error(path, "runs", "must be a non-empty list of {method: ...} entries")
    entries = [load_entry(path, index, run, suites, seeds, options) for index, run in enumerate(runs)]
    run_root = raw.get("run_root")
    if run_root is not None and not isinstance(run_root, str):
        raise grid_error(path, "run_root", f"must be a folder, got {run_root!r}")
    return Grid(path, str(raw.get("description", "")), run_root and Path(run_root), options, task_sets, evaluation,
                slurm, entries)


def load_entry(path: Path, index: int, run: Any, suites: list[str], seeds: list[int],
               grid_options: dict[str, Any]) -> Entry:
    """Check `runs[index]` of the grid file and resolve it: suites and seeds (the grid's, which it may only
    narrow), options (its `config` file's, then its `options`), expert counts per suite, groupings (default
    gradient) and the variant (default: named by the stage-1 options that differ from the grid's). Every problem
    is one ConfigError naming the entry."""
    where = f"runs[{index}]"
    if not isinstance(run, dict) or "method" not in run:
        raise grid_error(path, where, "each entry needs a method")
    unknown = sorted(set(run) - ENTRY_KEYS)
    if unknown:
        raise grid_error(path, where, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(ENTRY_KEYS))})")
    method = run["method"]
    if method not in METHODS:
        raise grid_error(path, where, f"unknown method '{method}' (known: {', '.join(METHODS)})")
    entry_suites = as_list(path, f"{where}.suites", run.get("suites", suites), str)
    if not set(entry_suites) <= set(suites):
        raise grid_error(path, f"{where}.suites", "may only narrow the grid's suites")
    entry_seeds = as_list(path, f"{where}.seeds", run.get("seeds", seeds), int)
    from_file = {}
    if run.get("config") is not None:  # a stage config file (e.g. configs/dense/*.yaml); `options` win
        try:
            from_file = load_yaml(str(run["config"]))
        except ConfigError as error:
            raise grid_error(path, f"{where}.config", str(error)) from None
    options = check_options(path, f"{where}.options", {**from_file, **(run.get("options") or {})})
    spec = METHODS[method]
    experts = run.get("experts")
    if spec.experts:
        if experts is None:
            raise grid_error(path, where, f"method {method} needs experts: a list of counts, or one per suite")
        per_suite = experts if isinstance(experts, dict) else {suite: experts for suite in entry_suites}
        missing = [suite for suite in entry_suites if suite not in per_suite]
        strangers = [str(suite) for suite in per_suite if suite not in suites]
        if strangers:
            raise grid_error(path, f"{where}.experts", f"'{strangers[0]}' is not one of the grid's suites")
        if missing:
            raise grid_error(path, f"{where}.experts", f"no expert count for suite {missing[0]}")
        experts = {suite: as_list(path, f"{where}.experts", per_suite[suite], int) for suite in entry_suites}
        if any(count < 1 for counts in experts.values() for count in counts):
            raise grid_error(path, f"{where}.experts", "expert counts must be at least 1")
    elif experts is not None:
        raise grid_error(path, where, f"method {method} has no experts")
    else:
        experts = {suite: [0] for suite in entry_suites}
    groupings = run.get("groupings")
    if spec.groupings:
        groupings = as_list(path, f"{where}.groupings", groupings or "gradient", str)
        if not set(groupings) <= {"gradient", "random"}:
            raise grid_error(path, f"{where}.groupings", "must be gradient and/or random")
    elif groupings is not None:
        raise grid_error(path, where, f"method {method} has no task grouping")
    else:
        groupings = [""]
    variant = run.get("variant")
    if variant is None:  # stage-1 options that differ from the grid's name the variant
        changed = {name: value for name, value in options.items()
                   if name in STAGE1_OPTIONS and grid_options.get(name, getattr(Config(), name)) != value}
        variant = re.sub(r"[^\w.-]+", "-", "_".join(f"{name}{value}" for name, value in sorted(changed.items())))
    if not isinstance(variant, str) or not all(character.isalnum() or character in "-_." for character in variant):
        raise grid_error(path, f"{where}.variant", "must be letters, digits, '-', '_' or '.'")
    return Entry(method, experts, groupings, entry_suites, entry_seeds, options, variant)


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Job:
    """One command of the plan: a stage, a baseline or an evaluation in one run directory."""

    kind: str  # stage1 | grouping | experts | router | baseline | evaluate
    run_dir: Path
    config: Config  # the run's resolved options (evaluation: the run's training options)
    method: str = ""  # m3dt.evaluate / m3dt.baselines --method; for grouping: gradient | random
    grouping: str = ""
    experts: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # keys of the jobs whose outputs it reads

    @property
    def key(self) -> str:
        """The job's identity in the plan: run directory, kind, method, grouping and expert count, joined by '|'."""
        parts = [str(self.run_dir), self.kind, self.method, self.grouping, str(self.experts)]
        return "|".join(parts)

    @property
    def run(self) -> RunDir:
        """The job's run directory."""
        return RunDir(self.run_dir)

    def describe(self) -> str:
        """The job in words, e.g. "stage 3 routers (gradient, E=8)", for the plan, the output and the names of
        its log and lock files."""
        label = {"stage1": "stage 1 backbone", "grouping": f"stage 2 {self.method} grouping",
                 "experts": "stage 2 experts (--all)", "router": "stage 3 routers",
                 "baseline": f"train {self.method}", "evaluate": f"evaluate {self.method}"}[self.kind]
        detail = ", ".join(part for part in (self.grouping if self.kind != "grouping" else "",
                                             f"E={self.experts}" if self.experts else "") if part)
        return f"{label} ({detail})" if detail else label


def config_flags(values: dict[str, Any]) -> list[str]:
    """Options as the stage scripts' flags (booleans as --name / --no-name; None stays the default). A value
    starting with "-" is joined to its flag by "=", so that the parser does not read it as a flag of its own."""
    flags = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif str(value).startswith("-"):
            flags.append(f"--{name}={value}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def run_options(grid: Grid, entry: Entry, suite: str, seed: int, run_dir: Path,
                overrides: dict[str, Any]) -> dict[str, Any]:
    """The option values of one run: its suite (`tasks` for one of the grid's task_sets, else `prefix_name`),
    seed and run directory, then the grid's options, the entry's and `overrides` (the command line's), later
    ones winning."""
    suite_option = {"tasks": grid.task_sets[suite]} if suite in grid.task_sets else {"prefix_name": suite}
    return {**suite_option, "seed": seed, "run_dir": str(run_dir), **grid.options, **entry.options, **overrides}


def build_config(grid: Grid, values: dict[str, Any], where: str) -> Config:
    """The Config of one grid run from its option values (of their types since the grid was read), checked as
    the stage scripts check theirs; a bad value is reported as an error in the grid file at `where`."""
    config = Config(**values)
    try:
        check_values(config)
    except ConfigError as error:
        raise grid_error(grid.path, where, str(error)) from None
    return config


def plan_jobs(grid: Grid, run_root: Path, overrides: dict[str, Any]) -> list[Job]:
    """Every job of the grid, each after the jobs it needs, without duplicates (runs share stage 1)."""
    jobs: dict[str, Job] = {}
    writers: dict[Path, tuple[Job, str]] = {}  # the files a training job writes -> that job and its entry

    def add(job: Job) -> str:
        if job.kind != "evaluate":  # two entries must not train the same files two ways
            first, first_where = writers.setdefault(output_path(job), (job, where))
            different = differences(first, job.config)
            if different:
                raise grid_error(grid.path, where, f"would train {output_path(job)} with {'; '.join(different)} "
                                 f"({first_where} trains it too): give one of them its own variant: (a comparison "
                                 "method: one expert count per run directory)")
        jobs.setdefault(job.key, job)
        return job.key

    for entry_index, entry in enumerate(grid.entries):
        spec = METHODS[entry.method]
        for suite in entry.suites:
            for seed in entry.seeds:
                name = f"{suite}_seed{seed}" + (f"_{entry.variant}" if entry.variant else "")
                run_dir = run_root / name
                values = run_options(grid, entry, suite, seed, run_dir, overrides)
                where = f"runs[{entry_index}] ({entry.method}, {name})"
                config = build_config(grid, values, where)
                if config.task_table:  # tasks of one's own: known to this process as to the stages
                    use_task_table(config.task_table)
                tasks = resolve_tasks(config.prefix_name, config.tasks, config.seed)  # a bad task list fails here
                try:  # more episodes than Meta-World has goals would fail only after the training
                    check_episodes(tasks, grid.evaluation.get("episodes"))
                except ConfigError as error:
                    raise grid_error(grid.path, "evaluation", str(error)) from None
                beyond = [count for count in entry.experts[suite] if count > len(tasks)]
                if spec.trains == "stages" and beyond:  # stage 2 groups the tasks, a group per expert
                    raise grid_error(grid.path, f"runs[{entry_index}].experts",
                                     f"{beyond[0]} experts for the {len(tasks)} tasks of {suite}: the task grouping "
                                     f"makes one group per expert, of one task at least (give the counts per suite, "
                                     f"e.g. {{{suite}: [{min(8, len(tasks))}]}})")
                stage1 = Job("stage1", run_dir, config)
                common = {"run_dir": run_dir}
                for experts in entry.experts[suite]:
                    for grouping in entry.groupings:
                        stage_config = dataclasses.replace(
                            config, expert_num=experts or config.expert_num, group_num=experts or config.group_num,
                            grouping=grouping or config.grouping)
                        needs: list[str] = []
                        if spec.trains == "stages":
                            needs = [add(stage1)]
                            needs = [add(Job("grouping", config=stage_config, method=grouping, grouping=grouping,
                                             experts=experts, needs=needs, **common))]
                            needs = [add(Job("experts", config=stage_config, grouping=grouping, experts=experts,
                                             needs=needs, **common))]
                            needs = [add(Job("router", config=stage_config, grouping=grouping, experts=experts,
                                             needs=needs, **common))]
                        elif spec.trains == "stage1" or not spec.trains:  # random: stage 1's data statistics
                            needs = [add(stage1)]
                        else:
                            uses_backbone = getattr(method_module(entry.method), "USES_BACKBONE", False)
                            before = [add(stage1)] if uses_backbone else []
                            needs = [add(Job("baseline", config=stage_config, method=entry.method, experts=experts,
                                             needs=before, **common))]
                        add(Job("evaluate", config=stage_config, method=entry.method, grouping=grouping,
                                experts=experts, evaluation=grid.evaluation, needs=needs, **common))
    # A run directory's jobs together, in the order they were added (a job after the jobs it needs).
    run_order = {run_dir: index for index, run_dir in enumerate(dict.fromkeys(job.run_dir for job in jobs.values()))}
    return sorted(jobs.values(), key=lambda job: run_order[job.run_dir])


def shard_jobs(jobs: list[Job], shard: str | None) -> list[Job]:
    """`g/N`: the jobs of run directories g, g+N, ... in plan order (a run's jobs stay together)."""
    if shard is None:
        return jobs
    index, count = (int(part) for part in shard.split("/"))
    run_dirs = list(dict.fromkeys(job.run_dir for job in jobs))
    mine = set(run_dirs[index::count])
    return [job for job in jobs if job.run_dir in mine]


# ------------------------------------------------------------------------------------------ commands
def artifact(job: Job) -> Path | None:
    """The file a training job writes (experts: see training_status), or the model an evaluation reads (None:
    the random policy)."""
    run, grouping, experts = job.run, job.grouping, job.experts
    method = job.method if job.kind in ("baseline", "evaluate") else ""
    if job.kind == "stage1" or method == "prompt-dt":
        return run.backbone
    if job.kind == "grouping":
        return run.groups(grouping, experts)
    if job.kind == "router" or method == "m3dt":
        return run.moe(grouping, experts)
    if method == "random":
        return None
    return run.baseline_model(method)


def output_path(job: Job) -> Path:
    """What a training job writes: its artifact (experts: the --all job folder of its grouping and count)."""
    if job.kind == "experts":
        return job.run.expert_job(job.grouping, job.experts, "all")
    path = artifact(job)
    assert path is not None, f"{job.kind} writes no artifact"
    return path


def trained_value(config: Config, name: str) -> Any:
    """An option as it shapes training (the router widths resolved from the width when left to the default)."""
    return config.model_fields().get(name, getattr(config, name))


def differences(job: Job, config: Config) -> list[str]:
    """How training `job` with `config` instead of its own would differ ("name theirs, not ours"): the stage-1
    options (the data aside: the stages compare its fingerprint themselves), the grouping's, a comparison
    method's own hyperparameters, and the number of steps."""
    names = [name for name in STAGE1_OPTIONS if name != "data_path"]
    names += GROUPING_OPTIONS if job.kind == "grouping" else ()
    names += getattr(method_module(job.method), "HYPERPARAMETERS", ()) if job.kind == "baseline" else ()
    found = [f"{name} {trained_value(config, name)!r}, not {trained_value(job.config, name)!r}" for name in names
             if trained_value(config, name) != trained_value(job.config, name)]
    if job.kind != "grouping":
        theirs, ours = planned_steps(dataclasses.replace(job, config=config)), planned_steps(job)
        found += [f"{theirs:,} steps, not {ours:,}"] if theirs != ours else []
    return found


def job_dir(job: Job) -> Path:
    """Where a training job keeps metrics.jsonl and train_state.pt."""
    run = job.run
    return {"stage1": run.stage1, "experts": run.expert_job(job.grouping, job.experts, "all"),
            "router": run.stage3(job.grouping, job.experts)}.get(job.kind, run.baseline(job.method))


def evaluation_flags(job: Job) -> list[str]:
    """The m3dt.evaluate flags of an evaluation job: run directory, method, grouping and expert count (where
    set), the run's seed, and the grid's evaluation options."""
    flags = ["--run_dir", str(job.run_dir), "--method", job.method]
    if job.grouping:
        flags += ["--grouping", job.grouping]
    if job.experts:
        flags += ["--expert_num", str(job.experts)]
    flags += ["--seed", str(job.config.seed)]
    return flags + config_flags(job.evaluation)


def training_values(job: Job) -> dict[str, Any]:
    """The job's options as flags: only those that differ from the defaults (short, readable commands)."""
    defaults = Config()
    values = {option.name: getattr(job.config, option.name) for option in dataclasses.fields(Config)
              if getattr(job.config, option.name) != getattr(defaults, option.name)}
    if job.kind == "experts":
        values["all"] = True
    return values


def shell_command(job: Job) -> tuple[str, list[str]]:
    """(program, flags): the shell command `python {program} {flags}` that does this job."""
    if job.kind == "evaluate":
        return "-m m3dt.evaluate", evaluation_flags(job)
    flags = config_flags(training_values(job))
    program = {"stage1": "stage1_backbone_train.py", "grouping": f"stage2_task_grouping_{job.method}.py",
               "experts": "stage2_expert_train.py", "router": "stage3_router_train.py"}.get(job.kind)
    if program is None:
        return "-m m3dt.baselines", ["--method", job.method, *flags]
    return program, flags


def entry_point(job: Job) -> Callable[[list[str]], None]:
    """The in-process function that `shell_command(job)` runs."""
    from m3dt import stages

    if job.kind == "evaluate":
        from m3dt.evaluate import main as evaluate_main

        return evaluate_main
    if job.kind == "baseline":
        from m3dt.baselines.__main__ import main as baselines_main

        return baselines_main
    stage = {"stage1": stages.train_backbone, "grouping": partial(stages.group_tasks, method=job.method),
             "experts": stages.train_experts, "router": stages.train_router}[job.kind]
    return partial(stages.run_cli, stage, job.describe())


# ------------------------------------------------------------------------------------------ status
@dataclass
class Status:
    """Where a job stands (job_status): done or not, in words, the training steps left and any conflict."""

    done: bool
    detail: str  # "done", "to do", "cut at step N of M", ...
    steps_left: int | None = None  # training steps still to run (None: the whole schedule or not training)
    conflict: str = ""  # an artifact already there was trained differently from what the grid asks


def planned_steps(job: Job) -> int:
    """The steps a training job runs: its stage's schedule, or its comparison method's (m3dt/baselines)."""
    config = job.config
    if job.kind == "baseline":
        return method_module(job.method).steps(config)
    return {"stage1": config.backbone_steps, "experts": config.expert_steps, "router": config.router_steps}[job.kind]


def identity_matches(recorded: dict[str, Any], config: Config, tasks: list[str]) -> bool:
    """The options a stage recorded as its identity agree with the planned ones (inputs and other
    non-option entries are the stage's own check)."""
    for name, value in recorded.items():
        if name == "model":
            same = value == config.model_fields()
        elif name == "tasks":
            same = value == tasks
        elif hasattr(config, name):
            same = value == getattr(config, name)
        else:
            continue
        if not same:
            return False
    return True


def last_logged_step(directory: Path) -> int:
    """The largest step in `directory`/metrics.jsonl (lines without a readable step skipped); 0 without one."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            steps.append(int(json.loads(line)["step"]))
    return max(steps)


def training_status(job: Job) -> Status:
    """Done when every artifact's manifest records the planned steps and the planned options (the stage itself
    checks the rest when it runs); cut when its metrics.jsonl stops short of them."""
    outputs = ([job.run.expert(job.grouping, job.experts, expert) for expert in range(job.experts)]
               if job.kind == "experts" else [artifact(job)])
    manifests = [read_json(manifest_path(path), "manifest") for path in outputs
                 if path.exists() and manifest_path(path).exists()]
    names = {option.name for option in dataclasses.fields(Config)}
    for manifest in manifests[:1]:  # another grid (or command) that trained these files with other options
        recorded = Config(**{name: value for name, value in manifest.get("config", {}).items() if name in names})
        different = differences(job, recorded)
        if different:
            conflict = (f"{outputs[0]} was trained with {'; '.join(different)} (this grid's): give the entry its "
                        "own variant: or use another --run_root")
            return Status(False, "conflict: trained with other options", conflict=conflict)
    if job.kind == "stage1" and manifests:
        changed = changed_data(str(manifest_path(outputs[0])), job.config.data_path, job.config.max_episodes)
        if changed:
            conflict = (f"{outputs[0]}: the data under {job.config.data_path} changed since it trained ({changed}), "
                        f"and every stage of {job.run_dir} would stop on it: restore the data, or train the run "
                        "again in another --run_root (or after deleting its folder)")
            return Status(False, "data changed since it trained", conflict=conflict)
    if job.kind == "grouping":
        done = len(manifests) == 1 and manifests[0].get("group_num") == job.experts
        return Status(done, "done" if done else "to do")
    steps = planned_steps(job)
    if len(manifests) == len(outputs) and all(manifest.get("steps_done", 0) >= steps and
                                              identity_matches(manifest.get("identity", {}), job.config,
                                                               planned_tasks(job))
                                              for manifest in manifests):
        return Status(True, "done", 0)
    logged = last_logged_step(job_dir(job))
    if 0 < logged < steps:
        return Status(False, f"cut at step {logged:,} of {steps:,}", steps - logged)
    return Status(False, "to do", steps)


def changed_data(stage1_manifest: str, data_path: str, max_episodes: int) -> str:
    """The tasks whose episode files (names and sizes, as the stages compare them) under `data_path` differ from
    those stage 1 recorded, in words; "" when none do, or when the data cannot be read (check_data says why)."""
    recorded = (read_json(Path(stage1_manifest), "manifest").get("data") or {}).get("files") or {}
    found = {task: task_files_fingerprint(data_path, task, max_episodes) for task in recorded}
    if None in found.values():
        return ""
    changed = [task for task, digest in recorded.items() if found[task] != digest]
    return f"{len(changed)} task(s): {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}" if changed else ""


@lru_cache(maxsize=None)
def task_files_fingerprint(data_path: str, task: str, max_episodes: int) -> str | None:
    """One task's files_fingerprint, None when its data cannot be read. Computed once per task, however many of a
    grid's run directories trained on it: it stats every episode file (MT160: up to 2,000 a task)."""
    try:
        return files_fingerprint(data_path, [task], max_episodes)[task]
    except DataError:
        return None


def planned_tasks(job: Job) -> list[str]:
    """The task names of the job's run (its suite or task list, for its seed); TaskError for a bad list."""
    return resolve_tasks(job.config.prefix_name, job.config.tasks, job.config.seed)


def evaluation_status(job: Job) -> Status:
    """Done when eval/*/results.json holds this method, grouping, expert count, seed, task list and evaluation
    settings, and the sha256 of the checkpoint it recorded is the file's current one."""
    found = "to do"
    for path in sorted(job.run_dir.glob("eval/*/results.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError, KeyError, TypeError):
            result = json.loads(path.read_text())
            if (result.get("method_id") != job.method or result.get("seed") != job.config.seed
                    or (job.experts and result.get("num_experts") != job.experts)
                    or (job.grouping and result.get("grouping") != job.grouping)):
                continue
            if list(result["tasks"]) != planned_tasks(job):
                found = "to do (evaluated on other tasks)"
                continue
            if not same_settings(result, job.evaluation):
                found = "to do (evaluated with other settings)"
                continue
            out_of_date = staleness(job.run_dir, result)
            checkpoint = checkpoint_of(job.run_dir, result)
            if not out_of_date and (checkpoint is None or checkpoint.is_file()):
                return Status(True, "done")
            found = f"to do ({out_of_date or 'its checkpoint is gone'})"
    return Status(False, found)


def same_settings(result: dict[str, Any], evaluation: dict[str, Any]) -> bool:
    """Every task was evaluated with the planned episodes (None: the protocol's), episode cut and context."""
    episodes = evaluation.get("episodes")
    if any(row["episodes"] != (episodes or EPISODES_PER_FAMILY[row["family"]]) for row in result["tasks"].values()):
        return False
    return (result["protocol"]["max_steps"] == evaluation.get("max_steps")
            and result.get("context_actions", "full") == (evaluation.get("context_actions") or "full"))


def job_status(job: Job) -> Status:
    """evaluation_status of an evaluation job, training_status of a training job."""
    return evaluation_status(job) if job.kind == "evaluate" else training_status(job)


# ------------------------------------------------------------------------------------------ cost
BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass
class Bench:
    """Per-step figures of one `python -m m3dt.bench` file: ms per training step of each stage, rows per
    second of evaluation forwards, env steps per second; each measured at the bench's own model config."""

    path: Path
    device: str
    description: str
    config: Config
    training: dict[str, float]  # stage name -> ms per step of the project's (fast) path
    expert_steps: dict[str, int]
    evaluation: dict[str, tuple[float, float]]  # model -> (rows per second, FLOPs per row)
    env_steps_per_second: float | None

    @property
    def is_gpu(self) -> bool:
        """Whether the bench ran on a GPU (its device name is not cpu-{N}core)."""
        return not self.device.startswith("cpu")


def load_benches(folder: Path = BENCH_DIR) -> list[Bench]:
    """Every bench file of `folder`, GPUs first; a file that cannot be read is named on stderr and left out."""
    benches = []
    for path in sorted(folder.glob("*.json")):
        try:
            report = json.loads(path.read_text())
            if isinstance(report, list):  # a page of several runs (bench combine): the plain fp32 one
                report = next((run for run in report if run["settings"]["precision"] == "fp32"
                               and run["settings"].get("compile") in (None, "none")), report[0])
            options = {name: value for name, value in report["settings"]["config"].items()
                       if name in {option.name for option in dataclasses.fields(Config)}}
            fast = [row for row in report["training"] if row["path"] == "fast" and row["ms_per_step"]]
            benches.append(Bench(
                path=path, device=report["device"], description=report["description"], config=Config(**options),
                training={row["stage"]: row["ms_per_step"] for row in fast},
                expert_steps={row["stage"]: row["expert_steps"] for row in fast},
                evaluation={row["model"]: (row["rows_per_second"], row["forward_flops"] / row["rows"])
                            for row in report["evaluation"] if row["path"] == "fast"},
                env_steps_per_second=max((row["env_steps_per_second"] for row in report.get("env_stepping", [])),
                                         default=None)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError) as error:
            print(f"note: {path}: not a bench file of python -m m3dt.bench ({type(error).__name__}: {error}); "
                  "left out of the estimates", file=sys.stderr)
    return sorted(benches, key=lambda bench: not bench.is_gpu)


def training_flops(config: Config, kind: str, experts: int) -> float:
    """FLOPs of one training step of `kind` at `config`, counted as the bench counts them (m3dt/bench.py)."""
    shape = (*config.model_fields().items(), ("batch_size", config.batch_size))
    return counted_flops(shape, kind, experts)


@lru_cache(maxsize=None)
def counted_flops(shape: tuple, kind: str, experts: int) -> float:
    """training_flops for a model shape (the options that set the step's work), counted once per shape."""
    from m3dt.bench import model_matmuls

    config = Config(**dict(shape))
    stage = {"dense": 1, "expert": 2, "router": 3, "joint": 3, "mixture": 3}[kind]
    with torch.device("meta"):
        model = build_model(config, config.dropout)
        set_up_stage(model, stage, experts if stage > 1 else 0)
    for name, parameter in model.named_parameters():
        if kind == "joint":  # every parameter trains (the end-to-end ablation)
            parameter.requires_grad_(True)
        elif kind == "mixture":  # experts and routers over the frozen backbone (the no-grouping ablation)
            parameter.requires_grad_(".expert_mixture." in name)
    parts = model_matmuls(model, config.batch_size, config.context_length, config.prompt_length,
                          config.context_length)
    return sum(part.flops() * part.passes() for part in parts)


@lru_cache(maxsize=None)
def row_flops(shape: tuple, experts: int) -> float:
    """FLOPs of one evaluation row (the forward of one rollout step) for a model shape."""
    from m3dt.bench import Case, case_work

    return case_work(Case("", 3 if experts else 1, [[0]], experts), Config(**dict(shape)), 1, "fast",
                     last_step_only=True).forward_flops


def nearest_router(bench: Bench, experts: int) -> tuple[str, int] | None:
    """(stage name, E) of the bench's stage-3 router step with the expert count nearest `experts`; None when
    the bench timed no stage 3."""
    measured = {int(stage.rsplit("=", 1)[1]): stage for stage in bench.training if stage.startswith("stage 3")}
    if not measured:
        return None
    closest = min(measured, key=lambda count: abs(count - experts))
    return measured[closest], closest


def scaled_ms(bench: Bench, stage: str, bench_kind: str, bench_experts: int, config: Config, kind: str,
              experts: int) -> float | None:
    """The bench's ms/step of `stage`, scaled by FLOPs from the bench's config to this job's."""
    if stage not in bench.training:
        return None
    per_step = bench.training[stage] / bench.expert_steps.get(stage, 1)
    return per_step * training_flops(config, kind, experts) / training_flops(bench.config, bench_kind, bench_experts)


def step_ms(bench: Bench, job: Job) -> float | None:
    """Estimated ms per training step of `job` on the bench's device."""
    config, method = job.config, job.method
    if job.kind in ("stage1", "grouping") or method in ("mtdt", "harmodt"):
        return scaled_ms(bench, "stage 1: backbone", "dense", 0, config, "dense", 0)
    if job.kind == "experts":  # --all: per expert-step, from the --all measurement when there is one
        stage = next((name for name in bench.training if name.startswith("stage 2: all")), "stage 2: one expert")
        one = scaled_ms(bench, stage, "expert", 1, config, "expert", 1)
        return one and one * job.experts
    router = nearest_router(bench, job.experts)
    if router is None:
        return None
    kind = {"router": "router", "m3dt-end2end": "joint", "m3dt-no-grouping": "mixture"}[method or job.kind]
    return scaled_ms(bench, router[0], "router", router[1], config, kind, job.experts)


def evaluation_hours(bench: Bench, job: Job) -> float | None:
    """Model forwards (the bench's rows/s, scaled by FLOPs per row) plus env steps (the bench's env steps/s with
    every worker), over every (task, episode, step) of the evaluation; the lockstep rollouts do them in turn."""
    rows = 0
    for name in planned_tasks(job):
        task = get_task(name)
        episodes = job.evaluation.get("episodes") or EPISODES_PER_FAMILY[task.family]
        rows += episodes * min(task.horizon, job.evaluation.get("max_steps") or task.horizon)
    seconds = rows / bench.env_steps_per_second if bench.env_steps_per_second else 0.0
    if job.method == "random":
        return seconds / 3600
    experts = job.experts if job.method in ("m3dt", "m3dt-end2end", "m3dt-no-grouping") else 0
    measured = {0 if "backbone" in model else int(model.split("E=")[1].split()[0]): model for model in bench.evaluation}
    if not measured:
        return None
    rows_per_second, bench_row_flops = bench.evaluation[measured[min(measured, key=lambda n: abs(n - experts))]]
    flops = row_flops(tuple(job.config.model_fields().items()), experts)
    return (seconds + rows / rows_per_second * flops / bench_row_flops) / 3600


def estimate_hours(bench: Bench, job: Job, status: Status) -> float | None:
    """Hours of what is left of `job` on the bench's device (None: the bench has no figure for it)."""
    if status.done:
        return 0.0
    if job.kind == "evaluate":
        return evaluation_hours(bench, job)
    milliseconds = step_ms(bench, job)
    if milliseconds is None:
        return None
    if job.kind == "grouping":  # one forward-backward per gradient sample of each task; K-means is seconds
        if job.method == "random":
            return 0.0
        tasks = len(planned_tasks(job))
        return tasks * job.config.grouping_gradients * milliseconds / 3.6e6
    steps = status.steps_left if status.steps_left is not None else planned_steps(job)
    return steps * milliseconds / 3.6e6


KIND_NAMES = {"stage1": "stage 1", "grouping": "grouping", "experts": "experts", "router": "routers",
              "evaluate": "evaluation"}
ESTIMATE_NOTE = ("Estimates, not measurements: each training step takes the bench's measured ms/step of the "
                 "same stage at the paper configuration (the project's path), scaled by the ratio of this job's "
                 "FLOPs to the measured step's (m3dt/bench.py counts them; stage 3 from the nearest measured "
                 "expert count; the end-to-end and no-grouping ablations as a stage-3 step with more trainable "
                 "parts; MTDT and HarmoDT as a stage-1 step); an evaluation takes its policy rows at the bench's "
                 "rows/s (scaled by FLOPs per row) plus its env steps at the bench's env steps/s with every "
                 "worker. Small models run further below a device's peak than the paper-size ones the bench "
                 "measured, so their estimates are low (on the CPU about 1.7x for a 96-wide model).")


# ------------------------------------------------------------------------------------------ dry run
def bench_name(bench: Bench) -> str:
    """The bench file as the user knows it (the shipped folder by its place in the repository)."""
    return f"benchmarks/{bench.path.name}" if bench.path.parent == BENCH_DIR else str(bench.path)


def format_hours(hours: float | None) -> str:
    """Hours for the dry run's tables: "?" for no estimate, "0", "<0.01", 2 decimals below 10, else whole."""
    if hours is None:
        return "?"
    if hours == 0:
        return "0"
    if hours < 0.01:
        return "<0.01"
    return f"{hours:,.2f}" if hours < 10 else f"{hours:,.0f}"


def dry_run(grid: Grid, jobs: list[Job], run_root: Path, benches: list[Bench], show_commands: bool) -> str:
    """The --dry_run page: every job with its status and estimated hours left on each bench's device, how many
    jobs are left, the conflicts, each bench's total by kind of job and, with `show_commands`, every job's shell
    command."""
    runs = list(dict.fromkeys(job.run_dir for job in jobs))
    lines = [f"Grid {grid.path}: {grid.description}".rstrip(": "),
             f"{len(runs)} run directories under {run_root}, {len(jobs)} jobs", ""]
    heads = [f"h left, {bench.device}" for bench in benches]
    lines += ["| run | job | status | " + " | ".join(heads) + " |", "|---|---|---|" + "---:|" * len(heads)]
    totals: list[dict[str, float]] = [defaultdict(float) for _ in benches]  # per bench: hours by kind of job
    unknown = [False] * len(benches)
    left, conflicts = 0, []
    for job in jobs:
        status = job_status(job)
        left += not status.done
        conflicts += [status.conflict] if status.conflict else []
        hours = [estimate_hours(bench, job, status) for bench in benches]
        for index, value in enumerate(hours):
            if value is None:
                unknown[index] = True
            else:
                totals[index][method_name(job.method) if job.kind == "baseline" else KIND_NAMES[job.kind]] += value
        lines.append(f"| {job.run_dir.name} | {job.describe()} | {status.detail} | "
                     + " | ".join(format_hours(value) for value in hours) + " |")
    lines += ["", f"Left: {left} of {len(jobs)} jobs."]
    if conflicts:
        lines += ["", f"Conflicts: the grid refuses to run until these {len(conflicts)} are resolved:"]
        lines += [f"- {conflict}" for conflict in conflicts]
    problems = missing_data(jobs)
    if problems:
        lines += ["", f"Data: the grid refuses to run until these {len(problems)} problem(s) with the data its "
                      "training jobs read are fixed (finished stages read it too: they compare it with what they "
                      "trained on):"]
        lines += [f"- {problem} ({count} job(s))" for problem, count in problems.items()]
    lines += ["", f"Estimated cost of the jobs left (compute only; not counted: the start of each of the {left} "
                  "jobs, seconds of imports, data reading and env building, which is most of a grid of tiny jobs):"]
    for bench, by_kind, partial_total in zip(benches, totals, unknown):
        kind = "GPU-hours" if bench.is_gpu else "hours on this CPU bench (no GPU figure)"
        missing = " (some jobs have no figure in it: more)" if partial_total else ""
        parts = ", ".join(f"{name} {format_hours(value)}" for name, value in by_kind.items() if value)
        parts = parts or ("no job with a figure is left" if partial_total else "nothing is left")
        lines.append(f"- {format_hours(sum(by_kind.values()))} {kind}{missing}: {parts}; {bench.description}, "
                     f"figures from {bench_name(bench)}")
    if not any(bench.is_gpu for bench in benches):
        lines.append("- No GPU bench file in benchmarks/ yet: run `python -m m3dt.bench --device cuda` on the GPU "
                     "and rerun --dry_run for GPU-hours.")
    lines += ["", ESTIMATE_NOTE]
    if show_commands:
        lines += ["", "Commands, in order (what the local launcher runs in one process):", "", "```bash"]
        lines += [f"python {program} {' '.join(flags)}" for program, flags in map(shell_command, jobs)]
        lines.append("```")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ launchers
class JobFailed(RuntimeError):
    """A job of the grid stopped with an error (its message was printed)."""


def reads_data(job: Job) -> bool:
    """Whether the job reads --data_path when it runs: every training job does, a finished one too (a stage
    compares the episode files with those it trained on before it says "already finished"), except the random
    grouping; an evaluation reads the run's own statistics (stage 1's), not the data."""
    return job.kind != "evaluate" and not (job.kind == "grouping" and job.method == "random")


@lru_cache(maxsize=None)
def data_problem(data_path: str, task: str, max_episodes: int) -> str:
    """What the stages' own data check (task_source) finds wrong with a task's episodes; "" when nothing."""
    try:
        task_source(data_path, get_task(task), max_episodes)
    except DataError as error:
        return str(error)
    return ""


def missing_data(jobs: list[Job]) -> dict[str, int]:
    """Each problem of the data the jobs will read (a data root or task folder that is not there, too few
    episodes, ...) -> how many of the jobs it stops; empty when the data is all there."""
    problems: dict[str, int] = defaultdict(int)
    for job in filter(reads_data, jobs):
        found = {data_problem(job.config.data_path, task, job.config.max_episodes) for task in planned_tasks(job)}
        for problem in sorted(found - {""}):
            problems[problem] += 1
    return dict(problems)


def check_data(jobs: list[Job], here: bool) -> None:
    """Refuse a grid whose jobs would each stop on the same missing data, before the first one starts; when the
    jobs run elsewhere (`here` False: SLURM's nodes may mount other file systems), say it in one warning line."""
    problems = missing_data(jobs)
    if problems:
        (first, count), more = next(iter(problems.items())), len(problems) - 1
        message = (f"{first} (read by {count} of the grid's training jobs, finished ones too: a stage compares the "
                   "data with what it trained on)"
                   + (f"; {more} more problem(s) with the data: --dry_run lists them" if more else ""))
        if here:
            raise DataError(message)
        print(f"warning: on this machine, {message}; submitting anyway, as the cluster's nodes may see other files",
              flush=True)


def check_evaluation_device(grid: Grid, jobs: list[Job]) -> None:
    """The evaluations left to do run here, after the training: refuse now a device this machine lacks (the
    name itself was checked when the grid was read; a plan may go to other machines)."""
    if any(job.kind == "evaluate" and not evaluation_status(job).done for job in jobs):
        try:
            resolve_device(grid.evaluation.get("device") or "auto")
        except ConfigError as error:
            raise grid_error(grid.path, "evaluation", str(error)) from None


def check_conflicts(jobs: list[Job]) -> None:
    """Refuse a grid that would reuse or overwrite files trained with other options (another grid's, say)."""
    conflicts = [status.conflict for job in jobs if job.kind != "evaluate"
                 for status in [training_status(job)] if status.conflict]
    if conflicts:
        more = f" ({len(conflicts) - 1} more: --dry_run lists them)" if len(conflicts) > 1 else ""
        raise ConfigError(conflicts[0] + more)


@contextlib.contextmanager
def job_lock(job: Job) -> Iterator[None]:
    """One process per job at a time (two grids sharing a run root, a resubmitted array): a lock file in the
    run's logs/ folder, released when the process ends however it ends."""
    path = job.run_dir / "logs" / (log_name(job) + ".lock")
    try:
        with exclusive_locks([path], f"{job.describe()} in {job.run_dir}"):
            yield
    except LockError as error:  # this lock, or one the job's stage takes (someone training it by hand)
        raise JobFailed(str(error)) from None


def log_name(job: Job) -> str:
    """The job's description as a file name (its log and lock files in {run_dir}/logs/): each run of characters
    other than letters, digits, '_', '.' and '-' as one '_', none at the ends."""
    return re.sub(r"[^\w.-]+", "_", job.describe()).strip("_")


def execute(job: Job) -> None:
    """Run one job in this process, as `shell_command(job)` would from the shell."""
    program, flags = shell_command(job)
    try:
        with job_lock(job):
            entry_point(job)(flags)
    except SystemExit as error:
        if error.code in INTERRUPTED_EXIT_CODES:  # Ctrl-C, SIGTERM: the job said where it stopped; so does the grid
            raise
        if error.code not in (0, None):
            raise JobFailed(f"{job.describe()} in {job.run_dir} failed (exit code {error.code})") from None
    except USER_ERRORS as error:
        raise JobFailed(f"{job.describe()} in {job.run_dir} failed: {error}") from None


def run_local(jobs: list[Job], debug: bool) -> int:
    """Every job in plan order in this process; evaluations already done are skipped, training jobs are
    called (a finished stage says so and returns at once; a cut one resumes). A failed job skips the jobs
    that need it, the others go on. Returns the number of failed jobs."""
    failed: set[str] = set()
    started = time.perf_counter()
    for number, job in enumerate(jobs, 1):
        header = f"== [{number}/{len(jobs)}] {job.run_dir.name}: {job.describe()}"
        if blocked(job, failed):
            print(f"{header}: skipped, a job it needs failed", flush=True)
            failed.add(job.key)
            continue
        if job.kind == "evaluate" and evaluation_status(job).done:
            print(f"{header}: already evaluated (same checkpoint and settings)", flush=True)
            continue
        program, flags = shell_command(job)
        print(f"{header}\n   python {program} {' '.join(flags)}", flush=True)
        try:
            execute(job)
        except JobFailed as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            failed.add(job.key)
        except Exception:  # a bug rather than bad input: show it, go on with the other runs
            if debug:
                raise
            traceback.print_exc()
            failed.add(job.key)
    minutes = (time.perf_counter() - started) / 60
    print(f"grid finished in {minutes:.1f} min: {len(jobs) - len(failed)} of {len(jobs)} jobs done"
          + (f", {len(failed)} failed or skipped" if failed else ""), flush=True)
    return len(failed)


def blocked(job: Job, failed: set[str]) -> bool:
    """Whether a job it needs failed (or was skipped): it would stop on the missing input, so it is skipped."""
    return any(need in failed for need in job.needs)


def run_logged(job: Job) -> None:
    """A job as a cluster runs it: its output appended to `{run_dir}/logs/{job}.log`."""
    log = job.run_dir / "logs" / (log_name(job) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as file, contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
        program, flags = shell_command(job)
        print(f"python {program} {' '.join(flags)}", flush=True)
        if job.kind == "evaluate" and evaluation_status(job).done:
            print("already evaluated (same checkpoint and settings)")
            return
        execute(job)


def levels(jobs: list[Job]) -> list[list[Job]]:
    """Jobs by dependency depth: level 0 needs nothing of this plan, level n needs jobs of lower levels."""
    depth: dict[str, int] = {}
    for job in jobs:  # plan order puts every job after the jobs it needs
        depth[job.key] = 1 + max((depth[need] for need in job.needs if need in depth), default=-1)
    grouped: list[list[Job]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for job in jobs:
        grouped[depth[job.key]].append(job)
    return grouped


def slurm_dependency(job: Job, submitted: dict[str, str]) -> dict[str, Any]:
    """SLURM's dependency of one job on the submitted jobs whose outputs it reads (`submitted`: job key -> SLURM
    id). afterany: a failed job stops only its own run's later jobs, which exit at once with a one-line message
    naming the missing input (afterok would leave them pending for ever)."""
    ids = [submitted[need] for need in job.needs if need in submitted]
    return {"dependency": "afterany:" + ":".join(ids)} if ids else {}


def run_submitit(jobs: list[Job], run_root: Path, parameters: dict[str, Any], cluster: str) -> int:
    """On SLURM: every job submitted on its own, waiting only for the jobs it reads from (`dependency`), so a
    small run's jobs need not wait for a large run's stage 1; this returns once all are queued. submitit's
    other executors (local: tests, a workstation) have no dependencies: one job array per dependency level,
    each waited for before the next is submitted."""
    import submitit

    executor = submitit.AutoExecutor(folder=run_root / "slurm" / "%j", cluster=cluster)
    try:
        executor.update_parameters(**{"name": "m3dt", **parameters})
    except (NameError, AssertionError, TypeError) as error:
        raise ConfigError(f"slurm parameters: {' '.join(str(error).split())}") from None
    if cluster == "slurm":
        submitted: dict[str, str] = {}
        for job in jobs:  # plan order puts every job after the jobs it needs
            extra = {**parameters.get("slurm_additional_parameters", {}), **slurm_dependency(job, submitted)}
            executor.update_parameters(slurm_additional_parameters=extra)
            submitted[job.key] = executor.submit(run_logged, job).job_id
            after = extra.get("dependency", "").removeprefix("afterany:")
            print(f"submitted {submitted[job.key]} {job.run_dir.name} {job.describe()}"
                  + (f" (after {after.replace(':', ', ')})" if after else ""), flush=True)
        return 0
    failed: set[str] = set()
    for level in levels(jobs):
        for job in level:  # as run_local: a job whose input failed is not submitted to fail in its turn
            if blocked(job, failed):
                print(f"skipped {job.run_dir.name} {job.describe()}: a job it needs failed", flush=True)
                failed.add(job.key)
        ready = [job for job in level if job.key not in failed]
        if not ready:
            continue
        with executor.batch():
            handles = [executor.submit(run_logged, job) for job in ready]
        print(f"submitted {len(ready)} job(s): " + ", ".join(f"{handle.job_id} {job.run_dir.name} {job.describe()}"
                                                            for handle, job in zip(handles, ready)), flush=True)
        for handle, job in zip(handles, ready):
            try:
                handle.result()
            except Exception:  # noqa: BLE001 - submitit wraps the job's error; its log has the details
                failed.add(job.key)
                print(f"error: {job.describe()} in {job.run_dir} failed; see {job.run_dir}/logs/",
                      file=sys.stderr, flush=True)
    return len(failed)


# ------------------------------------------------------------------------------------------ CLI
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line, --shard checked to be g/N with 0 <= g < N; SystemExit for bad arguments."""
    parser = ArgumentParser(prog="python -m m3dt.experiment", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid file (configs/experiments/*.yaml)")
    parser.add_argument("--data_path", help="data root for every run (overrides the grid's options)")
    parser.add_argument("--run_root", type=Path,
                        help="folder of the run directories (default: the grid's run_root, else runs/{grid name})")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every job, whether it is done, and the estimated hours of what is left")
    parser.add_argument("--show_commands", action="store_true", help="with --dry_run: each job's shell command")
    parser.add_argument("--shard", help="g/N: only run directories g, g+N, g+2N, ... (for N machines)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: every job here, in order; slurm: SLURM jobs through submitit, each waiting "
                             "for the jobs it reads from")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                        help="submitit executor of --launcher slurm (local: processes on this machine, for tests)")
    parser.add_argument("--bench_dir", type=Path, default=BENCH_DIR, help="folder of the bench files for --dry_run")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    arguments = parser.parse_args(argv)
    if arguments.shard is not None:
        index, _, count = arguments.shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            parser.error(f"--shard must be g/N with 0 <= g < N, got {arguments.shard!r}")
    return arguments


@command
def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    task_files_fingerprint.cache_clear()  # the data as it is now, not as an earlier call saw it
    try:
        grid = load_grid(arguments.grid)
        run_root = arguments.run_root or grid.run_root or Path("runs") / arguments.grid.stem
        overrides = {"data_path": arguments.data_path} if arguments.data_path else {}
        jobs = shard_jobs(plan_jobs(grid, run_root, overrides), arguments.shard)
        if arguments.dry_run:
            print(dry_run(grid, jobs, run_root, load_benches(arguments.bench_dir), arguments.show_commands))
            if arguments.launcher == "slurm":
                pending = [job for job in jobs if job.kind != "evaluate" or not evaluation_status(job).done]
                print(f"--launcher slurm would submit {len(pending)} SLURM job(s) (every training job: a finished "
                      "stage returns at once; the evaluations not done), each waiting only for the jobs it reads "
                      f"from; submitit parameters: {grid.slurm or 'submitit defaults (the grid has no slurm: mapping)'}")
            return
        check_conflicts(jobs)
        check_data(jobs, here=arguments.launcher == "local" or arguments.cluster in ("local", "debug"))
        if arguments.launcher == "local":
            check_evaluation_device(grid, jobs)
        if arguments.launcher == "slurm":  # every training job: a finished stage returns at once
            pending = [job for job in jobs if job.kind != "evaluate" or not evaluation_status(job).done]
            failures = run_submitit(pending, run_root, grid.slurm, arguments.cluster)
        else:
            failures = run_local(jobs, arguments.debug)
    except USER_ERRORS as error:
        exit_with_message(error, arguments.debug)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

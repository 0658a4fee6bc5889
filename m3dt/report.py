"""The paper's tables from evaluated runs, beside the paper's published numbers, with honest statistics.

    python -m m3dt.report runs/paper [more run roots or run directories] [--out report]   # --out: default report
    python -m m3dt.report --config configs/demo.yaml      # the run directory of a stage config file

Reads every `eval/*/results.json` under the given folders (written by m3dt.evaluate) and writes to --out:
  report.md    score per family and total by task count and method, by expert count, the ablations and the
               dense size sweep, each row with its seeds and evaluation settings, beside the paper's numbers;
  report.csv   the same rows with every statistic; results.csv: one row per results.json;
  *.png        total score against task count and against expert count, per-family scores, and
               performance profiles; plots.json lists them, and a rerun deletes the PNGs of that list it no
               longer writes (rows that are gone), no other file.

Rows group results by task count, method, grouping, expert count, model size and evaluation settings; the
seeds of a row are its results. Beside mean +- sample std over seeds, every row gives the interquartile mean
(IQM) over all seed x task scores with a 95% stratified-bootstrap confidence interval, and the plots give
performance profiles (fraction of seed x task scores above each threshold), both computed with `rliable`
(Agarwal et al., 2021, "Deep RL at the edge of the statistical precipice"). A result whose checkpoint
changed after it was evaluated (the file's sha256 is not the one results.json recorded) is left out of the
tables and listed, and so is a results.json that cannot be read (not valid JSON, or not one of
m3dt.evaluate), with the reason: the report is written from the rest. Evaluations that are not the full
protocol are marked wherever their numbers appear.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from m3dt.cli import command, exit_with_message
from m3dt.config import ArgumentParser, Config, ConfigError, load_yaml, read_yaml_mapping
from m3dt.baselines.dense_sizes import parameter_count
from m3dt.evaluate import own_task_names, reference_label, reference_text
from m3dt.run import (ArtifactError, atomic_path, check_folder, file_hash, make_folder, manifest_path, read_json,
                      write_json)
from m3dt.scores import SCORE_AXIS, score_axis_limits
from m3dt.tasks import FAMILIES, GYMNASIUM, names_hash, suites

# The paper's published numbers (Kong et al., ICML 2025): normalised score, mean over tasks, by task count.
PAPER_TOTALS = {"M3DT": {10: 89.23, 80: 80.66, 160: 78.21},
                "best baseline": {10: 88.92, 80: 75.70, 160: 71.65}}
PAPER_ABLATIONS = {"M3DT w/o three-stage": {160: 71.90}, "M3DT w/o grouping": {160: 67.34}}
PAPER_BEST_EXPERTS = {10: 8, 80: 40, 160: 40}  # the expert count that scored best at each task count
DEFAULT_MODEL = "d256 L6"  # the paper's width and depth
MAIN_METHODS = ("random policy", "MTDT", "Prompt-DT", "HarmoDT", "M3DT")  # the method comparison, in this order
ABLATIONS = ("M3DT w/o three-stage", "M3DT w/o grouping")
REPORTED_FAMILIES = (*FAMILIES, GYMNASIUM)  # what results.json's "families" can hold (GYMNASIUM: one's own tasks)
PLOT_LIST = "plots.json"  # in --out: the PNGs the last report wrote there, the only ones a rerun deletes
RUN_NAME = re.compile(r"(.+)_seed\d+(?:_(.+))?")  # a run directory of m3dt.experiment or the stages' default


# ------------------------------------------------------------------------------------------ results
@dataclass
class Result:
    """One results.json with what the report groups it by."""

    path: Path
    run_dir: Path
    data: dict[str, Any]
    method: str
    grouping: str
    experts: int
    model: str  # "d{embed_dim} L{n_layer}" of the evaluated checkpoint
    parameters: int | None
    evaluation: str  # "full protocol" or what differs from it
    full: bool
    seed: int
    flag: str = ""  # why it is left out of the tables

    @property
    def tasks(self) -> int:
        """The number of tasks evaluated (results.json's total.tasks)."""
        return int(self.data["total"]["tasks"])

    @property
    def key(self) -> tuple:
        """What a row groups results by: task count, suite, method, grouping, expert count, model, evaluation
        settings and variant; results with one key are seeds of one row."""
        return (self.tasks, self.suite, self.method, self.grouping, self.experts, self.model, self.evaluation,
                self.variant)

    @property
    def variant(self) -> str:
        """The suffix of a grid's run directory `{suite}_seed{seed}_{variant}` (other options than the grid's,
        m3dt.experiment): runs of different variants are different rows, never seeds of one."""
        match = RUN_NAME.fullmatch(self.run_dir.name)
        return match.group(2) or "" if match else ""

    def task_scores(self) -> dict[str, float]:
        """Each task's normalised score (0-100), by task name."""
        return {name: float(row["score"]) for name, row in self.data["tasks"].items()}

    @property
    def suite(self) -> str:
        """"mt{N}" when its tasks are the paper's official suite of that size for its seed (the lists differ by
        seed), else "list {hash}" of its task names and the definitions of its tasks of one's own (two task
        tables may define one name two ways): the paper's numbers are of the official suites only."""
        seed = self.data.get("training_seed", self.seed)  # the lists are drawn per training seed
        official = suites()[f"seed{seed}" if f"seed{seed}" in suites() else "seed0"].get(f"mt{self.tasks}")
        if official is not None and sorted(official) == sorted(self.data["tasks"]):
            return f"mt{self.tasks}"
        definitions = [json.dumps(row, sort_keys=True) for row in self.data.get("user_tasks", [])]
        listed = "list " + names_hash(sorted(self.data["tasks"]) + definitions)
        match = RUN_NAME.fullmatch(self.run_dir.name)  # a grid names its suites: {suite}_seed{seed}[_{variant}]
        return f"{match.group(1)}, {listed}" if match else listed


def find_results(folders: list[Path]) -> list[Path]:
    """Every eval/*/results.json below `folders`, once each however it was reached; ArtifactError for a folder
    that does not exist, is a file or holds none."""
    paths: list[Path] = []
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder}: is a file, not a folder (give run roots or run directories, the folders "
                                "that hold eval/*/results.json)")
        found = sorted(folder.glob("**/eval/*/results.json")) if folder.is_dir() else []
        if not found:
            why = "run python -m m3dt.evaluate first" if folder.is_dir() else "no such folder"
            if folder.is_dir() and (any(folder.glob("*/results.json")) or (folder / "results.json").is_file()):
                why = "give the run directory, the folder above eval/"
            raise ArtifactError(f"{folder}: no eval/*/results.json below it ({why})")
        paths += found
    # one entry per file however it was reached; paths stay as given (relative ones stay relative in the outputs)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def evaluation_settings(data: dict[str, Any]) -> tuple[str, bool]:
    """("full protocol", True) or ("NOT full protocol (...)", False), from the protocol the evaluator recorded;
    a context with masked predicted actions (--context_actions masked, a deviation), an evaluation seed
    other than the run's training seed and Meta-World goals the training data was collected on (not the
    protocol) are named too."""
    protocol = data["protocol"]
    settings = "full protocol"
    if not protocol["full"]:
        episodes = protocol.get("episodes")
        parts = [f"{episodes} episode{'s' if episodes != 1 else ''}/task" if episodes else "",
                 f"<= {protocol['max_steps']} steps" if protocol.get("max_steps") else ""]
        settings = "NOT full protocol (" + ", ".join(part for part in parts if part) + ")"
    context = data.get("context_actions", "full")
    settings += "" if context == "full" else f", context actions {context}"
    # an evaluation with another seed than its run's training seed is a row of its own, never a seed of one
    training_seed = data.get("training_seed", data.get("seed"))
    if data.get("seed") != training_seed:
        settings += f", evaluation seed {data.get('seed')} of a seed-{training_seed} run"
    shared = data.get("shared_goals") or {}
    if shared.get("shared"):  # not the protocol, whatever its episodes: the paper evaluates on goals it did not train on
        settings += f", MEMORISED goals ({shared['shared']} of {shared['evaluation_goals']} Meta-World goals trained on)"
    return settings, bool(protocol["full"]) and not shared.get("shared")


def checkpoint_of(run_dir: Path, data: dict[str, Any]) -> Path | None:
    """The evaluated artifact results.json records (None: the random policy)."""
    checkpoint = data.get("checkpoint")
    return run_dir / checkpoint["path"] if checkpoint else None


@lru_cache(maxsize=None)
def cached_hash(path: Path, size: int, modified_ns: int) -> str:
    """file_hash of `path`, cached: `size` and `modified_ns` are only part of the cache key (current_hash)."""
    return file_hash(path)


def current_hash(path: Path) -> str:
    """sha256 of a file, computed once per size and modification time (many results share a backbone)."""
    stat = path.stat()
    return cached_hash(path, stat.st_size, stat.st_mtime_ns)


def staleness(run_dir: Path, data: dict[str, Any]) -> str:
    """Why a result no longer describes its checkpoint ("" when it does): the checkpoint's sha256 is no longer
    the one results.json recorded. Results.json from before the evaluator recorded its protocol and checkpoint
    cannot say, and are left out too."""
    if "protocol" not in data or "method_id" not in data:
        return "written by an older m3dt.evaluate (no protocol or checkpoint recorded)"
    checkpoint = checkpoint_of(run_dir, data)
    if checkpoint is None or not checkpoint.is_file():  # deleted to save space, or never copied here
        return ""
    if data["checkpoint"]["sha256"] != current_hash(checkpoint):
        return f"evaluated an older {checkpoint.relative_to(run_dir)} (sha256 differs)"
    return ""


def model_size(run_dir: Path, data: dict[str, Any]) -> tuple[str, int | None]:
    """("d{embed_dim} L{n_layer}", parameter count) of the evaluated checkpoint, from its manifest."""
    checkpoint = checkpoint_of(run_dir, data)
    if checkpoint is None or not manifest_path(checkpoint).is_file():
        return "-", None
    recorded = read_json(manifest_path(checkpoint), "manifest").get("config", {})
    if "embed_dim" not in recorded:
        return "-", None
    names = {option.name for option in dataclasses.fields(Config)}
    config = Config(**{name: value for name, value in recorded.items() if name in names})
    prompt = data.get("method_id") != "mtdt"  # MTDT is Prompt-DT without its prompt embeddings
    return (f"d{config.embed_dim} L{config.n_layer}",
            parameter_count(config, int(data.get("num_experts") or 0), prompt=prompt))


@dataclass
class Unusable:
    """A results.json the report cannot read, and why in plain words (`flag`, as a stale Result's): listed under
    "Left out" and in results.csv, never in the tables."""

    path: Path
    flag: str


JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "true or false", type(None): "null"}


def is_number(value: Any) -> bool:
    """Whether a JSON value is a number (true and false are not, though Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def results_problem(data: Any) -> str:
    """What keeps `data` from being a results.json of m3dt.evaluate that the tables can read, in words ("" when
    nothing does): the score and task count in "total", a score per task in "tasks", per family in "families"."""
    if not isinstance(data, dict):
        return f"holds a JSON {JSON_TYPES.get(type(data), type(data).__name__)}, not an object"
    total, tasks, families = data.get("total"), data.get("tasks"), data.get("families", {})
    if total is None or tasks is None:
        return f"no '{'total' if total is None else 'tasks'}'"
    if not (isinstance(total, dict) and is_number(total.get("score")) and is_number(total.get("tasks"))):
        return "'total' has no score and task count"
    if not (isinstance(tasks, dict) and tasks and all(isinstance(row, dict) and is_number(row.get("score"))
                                                      for row in tasks.values())):
        return "'tasks' is not a score per task"
    if not (isinstance(families, dict) and all(isinstance(entry, dict) and is_number(entry.get("score"))
                                               for entry in families.values())):
        return "'families' is not a score per family"
    return ""


def load_result(path: Path) -> Result | Unusable:
    """A results.json as a Result, with its run directory, staleness flag, evaluation settings and model size;
    Unusable, saying why, when it is not valid JSON, not a results.json of m3dt.evaluate, or its checkpoint's
    manifest cannot be read: one broken file costs its own row, not the report."""
    try:
        data = read_json(path, "results.json")
    except ArtifactError as error:  # its message is "{path}: results.json is not valid JSON ..."
        return Unusable(path, str(error).removeprefix(f"{path}: results.json is "))
    problem = results_problem(data)
    if problem:
        return Unusable(path, f"not a results file of m3dt.evaluate: {problem}")
    run_dir = path.parent.parent.parent  # {run_dir}/eval/{label}/results.json
    try:
        flag = staleness(run_dir, data)
        evaluation, full = evaluation_settings(data) if "protocol" in data else ("?", False)
        model, parameters = model_size(run_dir, data)
        result = Result(path, run_dir, data, data.get("method", "?"), data.get("grouping") or "",
                        int(data.get("num_experts") or 0), model, parameters, evaluation, full,
                        int(data.get("seed", 0)), flag)
        result.suite  # reads the training seed and task names, as the tables will
    except ArtifactError as error:  # the checkpoint's manifest: the message names it
        return Unusable(path, str(error))
    except KeyError as error:  # a field the checks above do not cover (the protocol's, the checkpoint's)
        return Unusable(path, f"not a results file of m3dt.evaluate: no {error}")
    except (TypeError, ValueError, AttributeError):
        return Unusable(path, "not a results file of m3dt.evaluate: a field holds a value of the wrong kind")
    return result


def load_results(paths: list[Path]) -> tuple[list[Result], list[Unusable]]:
    """The results.json files at `paths` as Results, and those that cannot be read as Unusable (load_result)."""
    loaded = [load_result(path) for path in paths]
    return ([entry for entry in loaded if isinstance(entry, Result)],
            [entry for entry in loaded if isinstance(entry, Unusable)])


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class Row:
    """The results of one (task count, method, grouping, experts, model, evaluation) and their statistics."""

    results: list[Result]
    families: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # mean, std, seeds
    total: tuple[float, float, int] = (0.0, 0.0, 0)
    iqm: float = 0.0
    interval: tuple[float, float] | None = None  # 95% CI of the IQM; None with one seed
    task_bootstrap: bool = False  # its task lists differ by seed: CIs resample task positions too

    @property
    def bootstrap(self) -> str:
        """How its CI and profile band were computed."""
        return "task positions and seeds (task lists differ by seed)" if self.task_bootstrap else "seeds within tasks"

    reference: dict[str, float | None] = field(default_factory=dict)  # single-task DT: per family, "total"
    # (None: tasks of one's own, which have no paper reference)

    @property
    def first(self) -> Result:
        """The row's first result (lowest seed), which has every field the row groups by."""
        return self.results[0]

    @property
    def seeds(self) -> list[int]:
        """The seeds of the row's results, sorted."""
        return sorted(result.seed for result in self.results)

    @property
    def official(self) -> bool:
        """Whether its tasks are an official suite (mt{N}), the only rows the paper's numbers stand beside."""
        return self.first.suite.startswith("mt")

    @property
    def task_cell(self) -> str:
        """The tasks column: task count and suite, e.g. "160 (mt160)"."""
        return f"{self.first.tasks} ({self.first.suite})"


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n - 1) over seeds; std 0 for one seed."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0, len(array)


def score_matrix(results: list[Result]) -> tuple[np.ndarray, bool]:
    """(seeds, tasks) per-task scores and whether every seed has the same tasks. When the task lists differ
    (the official mt10..mt120 lists differ by seed) the columns are task positions, sorted by name."""
    task_lists = [sorted(result.task_scores()) for result in results]
    same_tasks = all(names == task_lists[0] for names in task_lists)
    rows = [[result.task_scores()[name] for name in names] for result, names in zip(results, task_lists)]
    return np.asarray(rows, dtype=np.float64), same_tasks


@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """rliable draws its bootstrap indices from numpy's global generator: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def iqm_interval(scores: np.ndarray, reps: int, seed: int, task_bootstrap: bool = False
                 ) -> tuple[float, tuple[float, float] | None]:
    """IQM of a (seeds, tasks) score matrix and its 95% stratified-bootstrap CI (rliable: seeds resampled
    with replacement within each task; with `task_bootstrap` the task columns too). No CI for one seed."""
    from rliable import library, metrics

    def aggregate(matrix: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(matrix)])

    with numpy_seed(seed):
        points, intervals = library.get_interval_estimates({"row": scores}, aggregate, reps=reps,
                                                           task_bootstrap=task_bootstrap)
    if scores.shape[0] < 2:
        return float(points["row"][0]), None
    return float(points["row"][0]), (float(intervals["row"][0, 0]), float(intervals["row"][1, 0]))


def performance_profiles(matrices: dict[str, np.ndarray], thresholds: np.ndarray, reps: int, seed: int,
                         task_bootstrap: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fraction of seed x task scores above each threshold, with 95% stratified-bootstrap bands (rliable:
    seeds resampled within each task; with `task_bootstrap` the task columns too)."""
    from rliable import library

    with numpy_seed(seed):
        return library.create_performance_profile(matrices, thresholds, reps=reps, task_bootstrap=task_bootstrap)


def mean_reference(entries: list[dict[str, Any]]) -> float | None:
    """The paper's single-task DT over each seed's own tasks (the official lists differ by seed), averaged over
    the seeds; None for tasks of one's own."""
    references = [entry.get("reference_score") for entry in entries]
    return None if any(value is None for value in references) else float(np.mean(references))


def build_rows(results: list[Result], reps: int, seed: int) -> list[Row]:
    """One Row per Result.key, sorted, with per-family and total mean ± std over seeds, the paper's single-task DT
    reference, and the IQM with its 95% CI (`reps` bootstrap resamples, numpy seed `seed`). ArtifactError
    when two results of a row have one seed."""
    grouped: dict[tuple, list[Result]] = defaultdict(list)
    for result in results:
        grouped[result.key].append(result)
    rows = []
    for key in sorted(grouped, key=lambda key: (*key[:6], key[7], key[6])):
        members = sorted(grouped[key], key=lambda result: result.seed)
        for first, second in zip(members, members[1:]):
            if first.seed == second.seed:
                raise ArtifactError(f"{first.path} and {second.path}: two results of the same method, settings and "
                                    f"seed {first.seed}: report one of them")
        row = Row(members)
        for family in REPORTED_FAMILIES:
            values = [result.data["families"][family]["score"] for result in members
                      if family in result.data.get("families", {})]
            if values:
                row.families[family] = mean_std(values)
                row.reference[family] = mean_reference([result.data["families"][family] for result in members
                                                        if family in result.data.get("families", {})])
        row.total = mean_std([result.data["total"]["score"] for result in members])
        row.reference["total"] = mean_reference([result.data["total"] for result in members])
        matrix, same_tasks = score_matrix(members)
        row.task_bootstrap = not same_tasks
        row.iqm, row.interval = iqm_interval(matrix, reps, seed, task_bootstrap=row.task_bootstrap)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ tables
def cell(statistic: tuple[float, float, int]) -> str:
    """A (mean, std, seeds) statistic as "mean ± std", or "mean" for one seed, 2 decimals."""
    mean, std, count = statistic
    return f"{mean:.2f} ± {std:.2f}" if count > 1 else f"{mean:.2f}"


def iqm_cell(row: Row) -> str:
    """The row's IQM and its 95% CI, "IQM [low, high]", or the IQM marked as having no CI (one seed)."""
    if row.interval is None:
        return f"{row.iqm:.2f} (1 seed: no CI)"
    return f"{row.iqm:.2f} [{row.interval[0]:.2f}, {row.interval[1]:.2f}]"


def seeds_cell(row: Row) -> str:
    """How many seeds the row has and which, e.g. "3 (0, 1, 2)"."""
    return f"{len(row.results)} ({', '.join(map(str, row.seeds))})"


def label(row: Row) -> str:
    """The method as the paper names it, with its grouping when that is not the gradient one."""
    first = row.first
    return (first.method + (" (random grouping)" if first.grouping == "random" else "")
            + (f" [{first.variant}]" if first.variant else ""))


def table(rows: list[Row], paper: dict[str, dict[int, float]], families: bool = True) -> list[str]:
    """Markdown rows with the paper's numbers for the same task counts after ours. Our rows that are not the
    full protocol say so in their own evaluation column; the caption says it too."""
    present = [family for family in REPORTED_FAMILIES
               if families and any(family in row.families for row in rows)]
    header = ["tasks", "method", "experts", "model", "evaluation", "seeds", *present, "total (mean ± std)",
              "IQM [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task_count, suite in sorted({(row.first.tasks, row.first.suite) for row in rows}):
        members = [row for row in rows if (row.first.tasks, row.first.suite) == (task_count, suite)]
        for row in members:
            first = row.first
            lines.append("| " + " | ".join([
                row.task_cell, label(row), str(first.experts or "-"), first.model, first.evaluation,
                seeds_cell(row), *(cell(row.families[family]) if family in row.families else "-" for family in present),
                cell(row.total), iqm_cell(row)]) + " |")
        for name, numbers in paper.items():
            if task_count in numbers and members[0].official:
                lines.append(f"| {members[0].task_cell} | *paper: {name}* | | | paper's protocol | - | "
                             + "| " * len(present) + f"*{numbers[task_count]:.2f}* | |")
    return lines


def caption(rows: list[Row]) -> list[str]:
    """The notes above the tables: how scores and statistics are computed and, where `rows` need them, notes on
    one's own tasks, unofficial task lists, task-position bootstraps and evaluations short of the full protocol."""
    notes = ["Score: per task the protocol's normalised score (Meta-World success %, DMC return / 10, ant-dir "
             "and cheetah-vel returns mapped to 0-100), averaged over tasks; mean ± sample std over the seeds "
             "of a row (seeds column: how many, which); IQM over every seed x task score with its 95% "
             "stratified-bootstrap CI (rliable)."]
    if any(GYMNASIUM in row.families for row in rows):
        notes.append("The gymnasium column: tasks of one's own (--task_table), each scored 100 x (return - min) / "
                     "(max - min) with the returns its table gives; the paper has no reference for them.")
    if any(own_in_mt160_families(row) for row in rows):
        notes.append("Tasks of one's own in MT160's families (--task_table rows of family dmc, ant_dir or "
                     "cheetah_vel) are scored by their family's rule; the single-task reference over them is the "
                     "task table's single_task_score, not the paper's (\"-\" where the table gives none).")
    if not all(row.official for row in rows):
        notes.append("The paper's numbers are of its official suites (mt10, mt80, mt160 of seeds 0-2): rows on "
                     "other task lists have none beside them, even with the same task count.")
    if any(row.interval and row.task_bootstrap for row in rows):
        notes.append("Where a row's seeds have different task lists (the official mt10..mt120 lists differ by "
                     "seed) its CI resamples task positions and seeds (rliable's task bootstrap).")
    if any("MEMORISED" in row.first.evaluation for row in rows):
        notes.append("**Rows marked MEMORISED goals were evaluated on Meta-World goals that their training data was "
                     "collected on (the collection's seed is the evaluation's): they measure memorisation, not the "
                     "paper's protocol.**")
    if any(not row.first.full for row in rows):
        notes.append("**Rows marked NOT full protocol were evaluated with fewer episodes or shorter episodes than "
                     "the paper's protocol: they are not comparable with the paper's numbers.**")
    return notes


def own_in_mt160_families(row: Row) -> bool:
    """Whether a row's tasks include tasks of one's own in an MT160 family (not gymnasium)."""
    data = row.first.data
    return any(data["tasks"][name]["family"] != GYMNASIUM for name in own_task_names(data))


def reference_table(rows: list[Row]) -> list[str]:
    """The paper's single-task DT scores over the same tasks (from the official task table)."""
    seen: dict[str, Row] = {}
    for row in sorted(rows, key=lambda row: row.first.tasks):
        seen.setdefault(row.task_cell, row)
    present = [family for family in REPORTED_FAMILIES if any(family in row.reference for row in seen.values())]
    lines = ["| tasks | " + " | ".join(present) + " | total |", "|---|" + "---|" * (len(present) + 1)]
    for task_cell, row in seen.items():
        values = [reference_text(row.reference.get(family)) for family in [*present, "total"]]
        lines.append(f"| {task_cell} | " + " | ".join(values) + " |")
    return lines


def representative(candidates: list[Row]) -> Row:
    """The M3DT row a method comparison shows when a task count has several expert counts: the one with the
    most seeds, then the paper's best count for that task count, then the largest count (never the score)."""
    tasks = candidates[0].first.tasks
    return max(candidates, key=lambda row: (len(row.results), row.first.experts == PAPER_BEST_EXPERTS.get(tasks),
                                            row.first.experts))


def main_rows(rows: list[Row]) -> list[Row]:
    """The method comparison: every method with the gradient grouping (or none), Prompt-DT at M3DT's model
    size (else its smallest; the other sizes are the size sweep), and for M3DT one expert count per task count
    and evaluation setting (`representative`)."""
    models = {row.first.model for row in rows if row.first.method == "M3DT"}
    dense = sorted((row.first.parameters or 0, row.first.model) for row in rows if row.first.method == "Prompt-DT")
    models = models or {model for _, model in dense[:1]}
    chosen, m3dt = [], defaultdict(list)
    for row in rows:
        first = row.first
        if first.method not in MAIN_METHODS or first.grouping == "random" or \
                (first.method == "Prompt-DT" and first.model not in models | {"-"}):
            continue
        if first.method == "M3DT":
            m3dt[(first.tasks, first.suite, first.evaluation)].append(row)
        else:
            chosen.append(row)
    chosen += [representative(candidates) for candidates in m3dt.values()]
    return sorted(chosen, key=lambda row: (row.first.tasks, MAIN_METHODS.index(row.first.method),
                                           not row.first.full, row.first.evaluation))


def ablation_rows(rows: list[Row]) -> list[Row]:
    """The ablations, and M3DT at the same task and expert counts."""
    ablations = [row for row in rows if row.first.method in ABLATIONS or
                 (row.first.method == "M3DT" and row.first.grouping == "random")]
    def place(row: Row) -> tuple:
        return row.first.tasks, row.first.suite, row.first.experts, row.first.evaluation

    where = {place(row) for row in ablations}
    return [row for row in rows if row in ablations or (row.first.method == "M3DT" and place(row) in where)]


def report_markdown(rows: list[Row], stale: list[Result], unusable: list[Unusable], folders: list[Path], reps: int,
                    seed: int) -> str:
    """report.md: the method comparison beside the paper's numbers, the single-task DT references, M3DT by
    expert count, the ablations, dense Prompt-DT by size, and the results left out: out of date (`stale`) or
    unreadable (`unusable`)."""
    expert_rows = [row for row in rows if row.first.method == "M3DT"]
    ablations = ablation_rows(rows)
    dense_rows = [row for row in rows if row.first.method == "Prompt-DT"]
    results = sum(len(row.results) for row in rows)
    best = ", ".join(f"{count} at {tasks} tasks" for tasks, count in PAPER_BEST_EXPERTS.items())
    text = ["# M3DT results", "",
            f"{results} evaluations from {', '.join(map(str, folders))}, in {len(rows)} rows. Statistics: "
            f"{reps} bootstrap resamples (numpy seed {seed}).", "", *caption(rows), "",
            "## Score by number of tasks and method", "", *table(main_rows(rows), PAPER_TOTALS), "",
            "M3DT, where there is one, is shown at one expert count per task count (the one with most seeds, then "
            "the paper's best count); every count is in the next table. The paper's 'best baseline' is the best of its baselines "
            "(MTDT, Prompt-DT, HarmoDT) at each task count.", "",
            "Single-task Decision Transformers (the paper's per-task scores, mean over the same tasks"
            + ("; over tasks of one's own, their task table's single_task_score" if any(own_task_names(row.first.data)
                                                                                       for row in rows) else "") + "):", "",
            *reference_table(rows), "", "## M3DT by number of experts", ""]
    if expert_rows:
        text += [*table(expert_rows, {"M3DT": PAPER_TOTALS["M3DT"]}, families=False), "",
                 f"The paper reports its best expert counts as {best}."]
    else:
        text.append("(no M3DT results)")
    text += ["", "## Ablations", ""]
    text += [*table(ablations, {"M3DT": PAPER_TOTALS["M3DT"], **PAPER_ABLATIONS}, families=False)] \
        if ablations else ["(no ablation results)"]
    text += ["", "## Dense Prompt-DT by size", ""]
    if dense_rows:
        text += [*size_table(dense_rows), "", "The paper's claim: a larger dense model does not recover the score "
                 "lost from 10 to 160 tasks (it gives no per-size numbers in a table)."]
    else:
        text.append("(no Prompt-DT results)")
    if stale or unusable:
        text += ["", "## Left out"]
    for entries, advice in ((stale, "Out of date: evaluate these again."),
                            (unusable, "Unreadable, or not results of m3dt.evaluate: repair or remove these.")):
        if entries:
            text += ["", advice, "", *[f"- {entry.path}: {entry.flag}" for entry in entries]]
    return "\n".join(text) + "\n"


def size_table(rows: list[Row]) -> list[str]:
    """The dense Prompt-DT size sweep as Markdown: each row's model, parameters (millions), evaluation, seeds,
    total and IQM, by task count, then size."""
    lines = ["| tasks | model | parameters | evaluation | seeds | total (mean ± std) | IQM [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (row.first.tasks, row.first.parameters or 0)):
        first = row.first
        parameters = f"{first.parameters / 1e6:.1f}M" if first.parameters else "-"
        lines.append(f"| {row.task_cell} | {first.model} | {parameters} | {first.evaluation} | {seeds_cell(row)} | "
                     f"{cell(row.total)} | {iqm_cell(row)} |")
    return lines


def write_csvs(out: Path, rows: list[Row], results: list[Result], unusable: list[Unusable]) -> None:
    """Write `out`/report.csv (a line per row with every statistic; a single seed's std left empty) and
    results.csv (a line per results.json, those left out with the reason; an unusable one's other cells empty),
    atomically."""
    with atomic_path(out / "report.csv") as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["tasks", "suite", "method", "grouping", "experts", "model", "parameters", "evaluation",
                         "full_protocol", "seeds", "seed_list", *(f"{family}_{stat}" for family in
                                                                REPORTED_FAMILIES for stat in ("mean", "std")),
                         "total_mean", "total_std", "iqm", "iqm_ci_low", "iqm_ci_high", "bootstrap"])
        for row in rows:
            first = row.first
            single = len(row.results) == 1  # no std of one seed: left empty, not 0
            family_values = [f"{row.families[family][index]:.4f}" if family in row.families and not (index and single)
                             else "" for family in REPORTED_FAMILIES for index in (0, 1)]
            low, high = (f"{bound:.4f}" for bound in row.interval) if row.interval else ("", "")
            writer.writerow([first.tasks, first.suite, first.method, first.grouping, first.experts, first.model,
                             first.parameters or "", first.evaluation, first.full, len(row.results),
                             " ".join(map(str, row.seeds)), *family_values, f"{row.total[0]:.4f}",
                             "" if single else f"{row.total[1]:.4f}", f"{row.iqm:.4f}", low, high, row.bootstrap])
    with atomic_path(out / "results.csv") as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        header = ["results", "tasks", "suite", "method", "grouping", "experts", "model", "seed", "training_seed",
                  "evaluation", "full_protocol", *REPORTED_FAMILIES, "total", "left_out_because"]
        writer.writerow(header)
        for result in results:
            families = result.data.get("families", {})
            writer.writerow([result.path, result.tasks, result.suite, result.method, result.grouping, result.experts,
                             result.model, result.seed, result.data.get("training_seed", result.seed),
                             result.evaluation, result.full,
                             *(f"{families[family]['score']:.4f}" if family in families else ""
                               for family in REPORTED_FAMILIES), f"{result.data['total']['score']:.4f}", result.flag])
        for entry in unusable:
            writer.writerow([entry.path, *[""] * (len(header) - 2), entry.flag])


# ------------------------------------------------------------------------------------------ plots
def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, imported only when the report plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_title(what: str, rows: list[Row], title: str) -> str:
    """What is plotted, the runs, and the evaluation settings (flagged when not the paper's protocol; each
    series' label says how it was evaluated)."""
    settings = "evaluation: full protocol"
    if any(not row.first.full for row in rows):
        settings = ("series marked 'not full protocol' or 'MEMORISED' were evaluated with fewer episodes or steps, "
                    "or on goals of their training data (their labels say how): not comparable with the paper's "
                    "numbers")
    return "\n".join([what, *textwrap.wrap(title, 90), *textwrap.wrap(settings, 90)])


def series_name(row: Row, with_experts: bool = True) -> str:
    """A row's name in the plots: its method label, E={experts} (with `with_experts`), its model when not the
    paper's size, and its evaluation settings when not the full protocol."""
    first = row.first
    parts = [label(row)]
    if with_experts and first.experts:
        parts.append(f"E={first.experts}")
    if first.model not in (DEFAULT_MODEL, "-"):
        parts.append(first.model)
    if not first.full:
        parts.append(first.evaluation.replace("NOT full protocol", "not full protocol"))
    return ", ".join(parts)


def colours(names: list[str]) -> dict[str, Any]:
    """One colour per series name (without its expert count), the same in every plot of a report."""
    unique = list(dict.fromkeys(names))
    palette = pyplot().get_cmap("tab10" if len(unique) <= 10 else "tab20").colors
    return {name: palette[index % len(palette)] for index, name in enumerate(unique)}


def finish(figure: Any, all_axes: list, path: Path) -> None:
    """Grid, one legend for every series of `all_axes` below the plots (long series names would squeeze the
    plots beside them), and the PNG cropped to what was drawn (titles and legend whole)."""
    entries: dict[str, Any] = {}
    for axes in all_axes:
        axes.grid(alpha=0.3, axis="y" if len(all_axes) > 1 else "both")
        for handle, name in zip(*axes.get_legend_handles_labels()):
            entries.setdefault(name, handle)
    columns = 2 if max(map(len, entries), default=0) <= 48 and len(entries) > 3 else 1
    figure.legend(list(entries.values()), list(entries), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=columns, frameon=False)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight", pad_inches=0.15)
    pyplot().close(figure)


def plot_tasks(path: Path, rows: list[Row], title: str, palette: dict[str, Any]) -> None:
    """Total score against task count, one line per method (M3DT at the expert count of the method table,
    annotated), error bars = std over seeds; the paper's M3DT and best-baseline numbers dashed."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 4.8))
    series: dict[str, list[Row]] = defaultdict(list)
    suites_per_count = defaultdict(set)
    for row in rows:
        suites_per_count[row.first.tasks].add(row.first.suite)
    several = any(len(names) > 1 for names in suites_per_count.values())  # then a line per task list
    for row in rows:
        name = series_name(row, with_experts=False)
        series[f"{name}, {row.first.suite}" if several else name].append(row)
    for index, (name, members) in enumerate(series.items()):
        members.sort(key=lambda row: row.first.tasks)
        seeds = "/".join(str(len(row.results)) for row in members)
        xs = [row.first.tasks * 10 ** dodge(index, len(series), LOG_DODGE) for row in members]
        axes.errorbar(xs, [row.total[0] for row in members],
                      yerr=[row.total[1] for row in members], marker="o", capsize=3,
                      color=None if several else palette.get(name), label=f"{name} (seeds per point: {seeds})")
        for x, row in zip(xs, members):
            if row.first.experts:
                axes.annotate(f"E={row.first.experts}", (x, row.total[0]), textcoords="offset points",
                              xytext=(5, 4), fontsize=7)
    official = {row.first.tasks for row in rows if row.official}
    for name, numbers in PAPER_TOTALS.items():
        xs = sorted(numbers) if official else []
        if xs:
            axes.plot(xs, [numbers[x] for x in xs], "--", marker="s", color="gray" if "baseline" in name else "black",
                      label=f"paper: {name}")
    task_counts = sorted({row.first.tasks for row in rows} | ({x for numbers in PAPER_TOTALS.values() for x in numbers}
                                                                if official else set()))
    axes.set_xscale("log")
    axes.set_xticks(task_counts, [str(count) for count in task_counts])
    axes.minorticks_off()
    axes.set_xlim(task_counts[0] / 10 ** (2 * LOG_DODGE), task_counts[-1] * 10 ** (2 * LOG_DODGE))
    axes.set_ylim(*score_axis_limits(error_bar_ends([row.total for row in rows])))
    axes.set_xlabel("number of tasks")
    axes.set_ylabel("normalised score, mean over tasks (MT160: 0-100)")
    axes.set_title(plot_title("Total score against task count (log axis; series side by side at each count; error bars: std over seeds)", rows, title),
                   fontsize=9)
    finish(figure, [axes], path)


# Series that share an x (every method at one task count, say) are drawn side by side, their error bars apart:
# spread over this share of a decade (log axis) or of the spacing between ticks (linear axis), centred on the tick.
LOG_DODGE = 0.08
LINEAR_DODGE = 0.2


def dodge(index: int, count: int, spread: float) -> float:
    """The offset of series `index` of `count` within `spread`, centred on 0 (0 for a single series)."""
    return 0.0 if count < 2 else spread * (index / (count - 1) - 0.5)


def error_bar_ends(means_and_stds: list[tuple[float, ...]]) -> list[float]:
    """The low and high ends of error bars (mean, std, ...) and their means, for the axis to hold them."""
    return [mean + sign * std for mean, std, *_ in means_and_stds for sign in (-1, 0, 1)]


def plot_experts(path: Path, rows: list[Row], title: str) -> None:
    """Total score against expert count (integer ticks), one line per task count and method, error bars =
    std over seeds; the paper's M3DT score at each task count as a dashed line of the same colour."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 4.8))
    series: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        series[(row.first.tasks, series_name(row, with_experts=False))].append(row)
    palette = colours([f"{name}, {tasks} tasks" for tasks, name in sorted(series)])
    counts = sorted({row.first.experts for row in rows})
    spacing = min(np.diff(counts), default=1)
    for index, ((tasks, name), members) in enumerate(sorted(series.items())):
        members.sort(key=lambda row: row.first.experts)
        seeds = "/".join(str(len(row.results)) for row in members)
        axes.errorbar([row.first.experts + spacing * dodge(index, len(series), LINEAR_DODGE) for row in members],
                      [row.total[0] for row in members],
                      yerr=[row.total[1] for row in members], marker="o", capsize=3,
                      color=palette[f"{name}, {tasks} tasks"], label=f"{name}, {tasks} tasks (seeds per point: {seeds})")
    official = {row.first.tasks for row in rows if row.official}
    for tasks, score in PAPER_TOTALS["M3DT"].items():
        colour = palette.get(f"M3DT, {tasks} tasks")
        if colour is not None and tasks in official:
            axes.axhline(score, linestyle="--", color=colour,
                         label=f"paper: M3DT, {tasks} tasks: {score:.2f}\n(its best count: "
                               f"{PAPER_BEST_EXPERTS[tasks]} experts)")
    axes.set_xticks(counts)
    axes.set_ylim(*score_axis_limits(error_bar_ends([row.total for row in rows])))
    axes.set_xlabel("number of experts")
    axes.set_ylabel("normalised score, mean over tasks (MT160: 0-100)")
    axes.set_title(plot_title("Total score against expert count (series side by side at each count; error bars: std over seeds)", rows, title),
                   fontsize=9)
    finish(figure, [axes], path)


def plot_families(path: Path, rows: list[Row], title: str, palette: dict[str, Any]) -> None:
    """One panel per family with its own score on the y axis: each method's mean, std over seeds as error
    bars, the paper's single-task DT over the same tasks as a dashed line."""
    plt = pyplot()
    present = [family for family in REPORTED_FAMILIES if any(family in row.families for row in rows)]
    figure, all_axes = plt.subplots(1, len(present), figsize=(max(2.4 * len(present) + 0.8, 6.5), 4.4), squeeze=False)
    for axes, family in zip(all_axes[0], present):
        members = [row for row in rows if family in row.families]
        numbers = [rows.index(row) + 1 for row in members]  # a series' number, the same in every panel
        for position, (number, row) in enumerate(zip(numbers, members)):
            axes.bar(position, row.families[family][0], yerr=row.families[family][1], capsize=3,
                     color=palette.get(series_name(row, with_experts=False)),
                     label=f"{number}: {series_name(row)} (seeds {', '.join(map(str, row.seeds))})")
        if members[0].reference[family] is not None:
            first = members[0].first.data
            family_tasks = [name for name, task in first["tasks"].items() if task["family"] == family]
            axes.axhline(members[0].reference[family], color="black", linestyle="--",
                         label=reference_label(family_tasks, own_task_names(first)))
        axes.set_xticks(range(len(members)), [str(number) for number in numbers], fontsize=7)
        low, high = score_axis_limits(error_bar_ends([row.families[family] for row in members]))
        axes.set_ylim(low, high + 0.04 * (high - low))  # headroom: a reference at 100 is a line, not the frame
        if axes.get_ylim()[0] < 0:
            axes.axhline(0, color="black", linewidth=0.8)
        axes.set_ylabel(SCORE_AXIS[family])
        axes.set_title(family, fontsize=9)
    figure.suptitle(plot_title(f"Score per family, {rows[0].task_cell.replace('(', 'tasks (')} (error bars: std "
                               "over seeds)", rows, title),
                    fontsize=9)
    figure.subplots_adjust(top=0.74, wspace=0.45)  # room for the title's lines above the panels
    finish(figure, list(all_axes[0]), path)


def profile_curves(rows: list[Row], thresholds: np.ndarray, reps: int, seed: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each row's performance profile and 95% band, by series name. As for its IQM interval, a row whose task
    lists differ by seed has task positions for columns, and its band resamples them too; the others
    resample seeds within tasks."""
    profiles, bands = {}, {}
    for row in rows:
        name = series_name(row)
        curve, band = performance_profiles({name: score_matrix(row.results)[0]}, thresholds, reps, seed,
                                           task_bootstrap=row.task_bootstrap)
        profiles[name], bands[name] = curve[name], band[name]
    return profiles, bands


def plot_profiles(path: Path, rows: list[Row], title: str, palette: dict[str, Any], reps: int, seed: int) -> None:
    """Performance profiles with 95% bands: the fraction of seed x task scores above each threshold."""
    plt = pyplot()
    thresholds = np.linspace(0.0, 100.0, 101)
    profiles, bands = profile_curves(rows, thresholds, reps, seed)
    task_positions = any(row.task_bootstrap for row in rows)
    figure, axes = plt.subplots(figsize=(9, 4.8))
    for name, row in zip(profiles, rows):
        colour = palette.get(series_name(row, with_experts=False))
        axes.plot(thresholds, profiles[name], color=colour, label=f"{name} (seeds: {len(row.results)})")
        if len(row.results) > 1:
            axes.fill_between(thresholds, bands[name][0], bands[name][1], color=colour, alpha=0.2)
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 1)
    axes.set_xlabel("normalised score threshold τ")
    axes.set_ylabel("fraction of seed x task scores > τ")
    axes.set_title(plot_title(f"Performance profiles, {rows[0].task_cell.replace('(', 'tasks (')} (bands: 95% "
                              "bootstrap CI over seeds" + (", and task positions where a series' task lists differ "
                                                           "by seed" if task_positions else "")
                              + ("; a series of one seed has none" if any(len(row.results) == 1 for row in rows)
                                 else "") + ")", rows, title),
                   fontsize=9)
    finish(figure, [axes], path)


def video_links(folders: list[Path], out_dir: Path) -> list[str]:
    """A section linking every rollout video the evaluations below `folders` wrote (m3dt.evaluate --video),
    relative to the report's folder."""
    videos = sorted(path for folder in folders for path in folder.glob("**/eval/*/videos/*.mp4"))
    links = [f"- {path.parents[3].name}, {path.parents[1].name}: [{path.stem}]({os.path.relpath(path, out_dir)})"
             for path in videos]
    return ["## Videos of rollouts", "", *links, ""] if links else []


def write_plots(out: Path, rows: list[Row], title: str, reps: int, seed: int) -> list[Path]:
    """The method comparison against task count and per family and as performance profiles (main_rows), and
    every M3DT and ablation row against expert count."""
    compared = main_rows(rows)
    palette = colours([series_name(row, with_experts=False) for row in compared])
    written = [out / "score_by_tasks.png"]
    plot_tasks(written[0], compared, title, palette)
    expert_rows = [row for row in rows if row.first.experts]
    if expert_rows:
        written.append(out / "score_by_experts.png")
        plot_experts(written[-1], expert_rows, title)
    for tasks, suite in sorted({(row.first.tasks, row.first.suite) for row in compared}):
        members = [row for row in compared if (row.first.tasks, row.first.suite) == (tasks, suite)]
        name = f"{tasks}_tasks" + ("" if members[0].official else "_" + re.sub(r"[^\w.-]+", "_", suite))
        written += [out / f"families_{name}.png", out / f"profiles_{name}.png"]
        plot_families(written[-2], members, title, palette)
        plot_profiles(written[-1], members, title, palette, reps, seed)
    return written


# ------------------------------------------------------------------------------------------ CLI
def build_report(folders: list[Path], out: Path, reps: int = 2000, seed: int = 0) -> str:
    """Read the results under `folders`, write report.md, the CSVs and the plots to `out`; return the text.
    ArtifactError, before any work, when `out` is a file or cannot be made; and when no result can be reported."""
    check_folder(out, "report folder (--out)")  # made only once there is a report to put in it
    results, unusable = load_results(find_results(folders))
    kept = [result for result in results if not result.flag]
    stale = [result for result in results if result.flag]
    if not kept:
        example = (stale + unusable)[0]
        raise ArtifactError(f"no results.json under {', '.join(map(str, folders))} can be reported: each is out of "
                            f"date or unreadable (e.g. {example.path}: {example.flag})")
    rows = build_rows(kept, reps, seed)
    text = report_markdown(rows, stale, unusable, folders, reps, seed) + "\n".join(["", *video_links(folders, out)])
    make_folder(out, "report folder (--out)")
    with atomic_path(out / "report.md") as temporary:
        temporary.write_text(text)
    write_csvs(out, rows, results, unusable)
    written = write_plots(out, rows, "runs: " + ", ".join(folder.name for folder in folders), reps, seed)
    remove_earlier_plots(out, written)
    return text


def remove_earlier_plots(out: Path, written: list[Path]) -> None:
    """Delete the plots an earlier report into `out` wrote that this one did not (rows that are gone would
    otherwise stay beside the new plots), then record this report's in `out`/PLOT_LIST. Only names that list
    holds are deleted, never other files of the folder; an unreadable list deletes nothing."""
    listed = out / PLOT_LIST
    try:
        earlier = read_json(listed, "list of the report's plots") if listed.is_file() else {}
    except ArtifactError:
        earlier = {}
    names = {path.name for path in written}
    earlier_names = earlier.get("plots", []) if isinstance(earlier, dict) else []
    for name in earlier_names:
        # a plain PNG name of this folder: an edited list cannot reach files elsewhere
        if isinstance(name, str) and name not in names and name == Path(name).name and name.endswith(".png"):
            (out / name).unlink(missing_ok=True)
    write_json(listed, {"plots": sorted(names)})


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line; without folders, --config's run directory. ConfigError when neither is given or
    --bootstrap_reps is below 1; SystemExit for arguments argparse rejects."""
    parser = ArgumentParser(prog="python -m m3dt.report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="run roots or run directories (default: --config's "
                        "run directory)")
    parser.add_argument("--config", help="YAML file of options (the stages' format): its run directory is reported")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md, CSVs and plots")
    parser.add_argument("--bootstrap_reps", type=int, default=2000, help="bootstrap resamples of each CI")
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="numpy seed of the bootstrap")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    arguments = parser.parse_args(argv)
    if not arguments.folders and arguments.config:
        if "runs" in read_yaml_mapping(Path(arguments.config), "config file"):
            raise ConfigError(f"{arguments.config}: is a grid file (m3dt.experiment): give its run root instead, "
                              "e.g. python -m m3dt.report runs/paper")
        arguments.folders = [Config(**load_yaml(arguments.config)).resolved_run_dir()]
    if not arguments.folders:
        raise ConfigError("give run roots or run directories, or --config")
    if arguments.bootstrap_reps < 1:
        raise ConfigError(f"--bootstrap_reps must be at least 1, got {arguments.bootstrap_reps}")
    return arguments


@command
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        arguments = parse_arguments(argv)
        print(build_report(arguments.folders, arguments.out, arguments.bootstrap_reps, arguments.bootstrap_seed))
    except (ArtifactError, ConfigError) as error:
        exit_with_message(error, "--debug" in argv)
    print(f"wrote {arguments.out}/report.md, report.csv, results.csv and plots")


if __name__ == "__main__":
    main()

"""Grids through m3dt.experiment: a 2 x 2 grid (Prompt-DT and M3DT x two seeds) end to end into the report,
skipped when rerun, resumed after SIGKILL to the same weights; the SLURM launcher through submitit's local
executor; the plan and its cost; grid files with errors."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m3dt import experiment
from m3dt.experiment import (JobFailed, dry_run, estimate_hours, execute, job_status, levels, load_benches, load_grid,
                             main, plan_jobs, planned_steps, run_submitit, shard_jobs)
from m3dt.config import parse_config
from m3dt.report import build_report
from m3dt.synthetic import make_dataset
from tests.conftest import REPO

TASKS = "cheetah-vel-8,cheetah-vel-3,ant-dir-2"
GRID = """
description: Prompt-DT and M3DT x two seeds, tiny
options: {embed_dim: 16, n_layer: 1, n_head: 2, router_hidden: "16,16", backbone_steps: 60, expert_steps: 10,
          router_steps: 10, warmup_steps: 5, log_every: 5, save_every: 5, device: cpu, workers: 0,
          kmeans_restarts: 2, kmeans_repeats: 2, grouping_gradients: 2, data_path: DATA}
suites: [loco]
task_sets: {loco: "TASKS"}
seeds: [0, 1]
evaluation: {episodes: 1, max_steps: 5, workers: 0, device: cpu}
runs:
  - method: prompt-dt
  - method: m3dt
    experts: [2]
"""


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    data = make_dataset(folder / "data", TASKS.split(","))
    path = folder / "tiny.yaml"
    path.write_text(GRID.replace("DATA", str(data)).replace("TASKS", TASKS))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared machine: one thread is faster, and the same in every process (bit-equal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_grid(grid_file, one_thread) -> Path:
    run_root = grid_file.parent / "runs"
    main([str(grid_file), "--run_root", str(run_root)])
    return run_root


def weight_hashes(run_root: Path) -> dict[str, str]:
    return {str(path.relative_to(run_root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_root.glob("**/*.safetensors"))}


def task_scores(run_root: Path) -> dict[str, dict]:
    return {str(path.relative_to(run_root)): {task: row["score"] for task, row in
                                              json.loads(path.read_text())["tasks"].items()}
            for path in sorted(run_root.glob("*/eval/*/results.json"))}


def test_grid_runs_every_job_into_the_report(finished_grid, tmp_path):
    evaluated = task_scores(finished_grid)
    assert sorted(evaluated) == [f"loco_seed{seed}/eval/{label}_episodes1_steps5/results.json" for seed in (0, 1)
                                 for label in ("stage1", "stage3_gradient_2")]  # short evaluations: own folders
    for seed in (0, 1):  # M3DT and Prompt-DT of a seed share one stage-1 backbone
        manifest = json.loads((finished_grid / f"loco_seed{seed}/stage3/gradient_2/moe.manifest.json").read_text())
        assert "stage1/backbone.safetensors" in manifest["inputs"] and manifest["config"]["seed"] == seed
    text = build_report([finished_grid], tmp_path / "report", reps=100)
    assert "| Prompt-DT | - | d16 L1 |" in text and "| M3DT | 2 | d16 L1 |" in text
    assert text.count("| 2 (0, 1) |") >= 2 and "NOT full protocol (" in text and "<= 5 steps)" in text


def test_rerun_skips_everything(finished_grid, grid_file, capsys):
    before = {path: path.stat().st_mtime_ns for path in finished_grid.glob("**/*") if path.is_file()}
    main([str(grid_file), "--run_root", str(finished_grid)])
    out = capsys.readouterr().out
    assert out.count("already finished") == 8  # per seed: stage 1, grouping, experts, routers
    assert out.count("already evaluated") == 4
    after = {path: path.stat().st_mtime_ns for path in finished_grid.glob("**/*") if path.is_file()}
    assert after == before
    grid = load_grid(grid_file)
    assert all(job_status(job).done for job in plan_jobs(grid, finished_grid, {}))
    main([str(grid_file), "--run_root", str(finished_grid), "--dry_run"])  # its cost lines had an empty breakdown
    assert "- 0 hours on this CPU bench (no GPU figure): nothing is left; " in capsys.readouterr().out


def test_data_changed_since_stage_1_is_a_conflict_the_dry_run_lists(finished_grid, grid_file, tmp_path, capsys):
    """The dry run used to say every job was done, and the real run then failed each training job one by one."""
    data = tmp_path / "data"
    shutil.copytree(grid_file.parent / "data", data)
    episode = data / "ant-dir-2" / "0.npz"
    episode.write_bytes(episode.read_bytes() + b"\0")  # another size: the stages' cheap check sees it
    main([str(grid_file), "--run_root", str(finished_grid), "--data_path", str(data), "--dry_run"])
    out = capsys.readouterr().out
    assert out.count("| stage 1 backbone | data changed since it trained |") == 2  # both seeds' runs
    message = (f"{finished_grid / 'loco_seed0' / 'stage1' / 'backbone.safetensors'}: the data under {data} changed "
               "since it trained (1 task(s): ant-dir-2)")
    assert f"- {message}" in out
    with pytest.raises(SystemExit) as stop:  # the real run refuses before any job
        main([str(grid_file), "--run_root", str(finished_grid), "--data_path", str(data)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.startswith(f"error: {message}") and error.count("\n") == 1


def test_a_killed_grid_resumes_to_the_same_weights_and_scores(finished_grid, grid_file, one_thread):
    run_root = grid_file.parent / "killed"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "m3dt.experiment", str(grid_file), "--run_root", str(run_root)],
                               cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_root / "loco_seed0" / "stage1" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_root / "loco_seed1").exists()  # killed within the first run's stage 1
    main([str(grid_file), "--run_root", str(run_root)])
    assert weight_hashes(run_root) == weight_hashes(finished_grid)
    assert task_scores(run_root) == task_scores(finished_grid)


def test_slurm_launcher_through_submitits_local_executor(grid_file, monkeypatch):
    """Each level of the plan is a job array; with the local executor each waits for the one before."""
    grid = grid_file.with_name("one_run.yaml")
    grid.write_text(grid_file.read_text().replace("seeds: [0, 1]", "seeds: [0]").replace("backbone_steps: 60",
                                                                                        "backbone_steps: 20")
                    .split("  - method: m3dt")[0])
    run_root = grid_file.parent / "slurm"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main([str(grid), "--run_root", str(run_root), "--launcher", "slurm", "--cluster", "local"])
    run = run_root / "loco_seed0"
    assert json.loads((run / "eval" / "stage1_episodes1_steps5" / "results.json").read_text())["total"]["tasks"] == 3
    logs = {path.name: path.read_text() for path in (run / "logs").glob("*.log")}
    assert sorted(logs) == ["evaluate_prompt-dt.log", "stage_1_backbone.log"]  # beside them: each job's lock
    assert "python stage1_backbone_train.py" in logs["stage_1_backbone.log"]
    assert "stage 1: wrote" in logs["stage_1_backbone.log"]
    plan = plan_jobs(load_grid(grid), run_root, {})
    assert [[job.kind for job in level] for level in levels(plan)] == [["stage1"], ["evaluate"]]


def test_on_slurm_each_job_waits_only_for_the_jobs_it_reads_from(grid_file, monkeypatch, capsys):
    """--cluster slurm (no SLURM here: submitit's executor replaced by one that records what is submitted):
    one SLURM job per job of the plan, whose dependency names exactly the jobs of its own run it needs."""
    import submitit

    submissions = []

    class RecordingExecutor:
        def __init__(self, folder, cluster):
            self.parameters = {}

        def update_parameters(self, **parameters):
            self.parameters.update(parameters)

        def submit(self, function, job):
            submissions.append((job, dict(self.parameters.get("slurm_additional_parameters", {}))))
            return SimpleNamespace(job_id=str(100 + len(submissions)))

    monkeypatch.setattr(submitit, "AutoExecutor", RecordingExecutor)
    run_root = grid_file.parent / "slurm_plan"
    main([str(grid_file), "--run_root", str(run_root), "--launcher", "slurm", "--dry_run"])
    assert "--launcher slurm would submit 12 SLURM job(s)" in capsys.readouterr().out and not submissions
    main([str(grid_file), "--run_root", str(run_root), "--launcher", "slurm", "--cluster", "slurm"])
    # per run: stage 1, its Prompt-DT evaluation, grouping, experts, routers, M3DT evaluation (ids from 101)
    expected = [("stage1", None), ("evaluate", 1), ("grouping", 1), ("experts", 3), ("router", 4), ("evaluate", 5)]
    for seed in (0, 1):
        for position, (kind, needs) in enumerate(expected):
            job, extra = submissions[6 * seed + position]
            assert job.run_dir.name == f"loco_seed{seed}" and job.kind == kind
            wanted = None if needs is None else f"afterany:{100 + 6 * seed + needs}"
            assert extra.get("dependency") == wanted, (job.describe(), extra)
    assert "(after " in capsys.readouterr().out


def test_every_shipped_grid_plans_as_the_readme_says():
    """The README's table of the paper grids (run directories, jobs) against each grid's plan; every shipped grid
    is read and planned (a grid file edited into an error would fail its user first)."""
    table = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`paper_\w+\.yaml`", cells[0]) and cells[2].isdigit():
            table[cells[0].strip("`")] = (int(cells[2]), int(cells[3]))
    folder = REPO / "configs" / "experiments"
    assert sorted(table) == sorted(path.name for path in folder.glob("paper_*.yaml"))
    for path in sorted(folder.glob("*.yaml")):
        plan = plan_jobs(load_grid(path), Path("no_such_root"), {})
        if path.name in table:
            assert (len({job.run_dir for job in plan}), len(plan)) == table[path.name], path.name


def test_dry_run_of_the_paper_grid_and_its_cost():
    grid = load_grid(REPO / "configs/experiments/paper_table1.yaml")
    jobs = plan_jobs(grid, Path("no_such_root"), {})
    assert len({job.run_dir for job in jobs}) == 9  # 3 suites x 3 seeds; every method of a run shares it
    kinds = [job.kind for job in jobs if job.run_dir.name == "mt160_seed0"]
    assert kinds.count("stage1") == 1 and kinds.count("evaluate") == 5 and kinds.count("baseline") == 2
    bench = next(bench for bench in load_benches() if bench.device == "cpu-2core")
    stage1 = next(job for job in jobs if job.kind == "stage1")
    projection = json.loads((REPO / "benchmarks/cpu-2core.json").read_text())["projection"]
    bench_hours = next(row["stage 1"] for row in projection if row["path"] == "fast")  # the bench's own figure
    assert estimate_hours(bench, stage1, job_status(stage1)) == pytest.approx(bench_hours, rel=1e-9)
    text = dry_run(grid, jobs, Path("no_such_root"), [bench], show_commands=True)
    assert text.count("| to do |") == len(jobs) == 99 and "Left: 99 of 99 jobs." in text
    assert "Estimates, not measurements" in text and "python stage1_backbone_train.py --prefix_name mt160" in text
    assert "(compute only; not counted: the start of each of the 99 jobs," in text  # a grid of tiny jobs is mostly starts
    runs = list(dict.fromkeys(job.run_dir.name for job in jobs))
    shard = shard_jobs(jobs, "1/4")  # run directories 1 and 5 of 9, every job of each
    assert list(dict.fromkeys(job.run_dir.name for job in shard)) == [runs[1], runs[5]]
    assert len(shard) == sum(job.run_dir.name in (runs[1], runs[5]) for job in jobs)


@pytest.mark.parametrize("content, message", [
    ("runs: [{method: mtdtx}]\nsuites: [mt10]", "unknown method 'mtdtx'"),
    ("runs: [{method: m3dt}]\nsuites: [mt10]", "needs experts"),
    ("runs: [{method: mtdt, options: {seed: 3}}]\nsuites: [mt10]", "'seed' is set by the grid"),
    ("runs: [{method: mtdt, options: {embed_dims: 3}}]\nsuites: [mt10]", "unknown option 'embed_dims'"),
    ("runs: [{method: mtdt}]\nsuites: [mt11]", "'mt11' is neither an official suite"),
    ("runs: [{method: mtdt, options: {embed_dim: 30}}]\nsuites: [mt10]", "must be a multiple of --n_head"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: [1]", "evaluation: must be a mapping"),
    ("runs: [{method: m3dt, experts: {mt10: [4], mt11: [8]}}]\nsuites: [mt10]", "'mt11' is not one of the grid's"),
    # two entries that would train the same files two ways: the second one is named, not silently dropped
    ("runs: [{method: m3dt, experts: [4]}, {method: m3dt, experts: [4], options: {router_steps: 5}}]\n"
     "suites: [mt10]", "runs[1] (m3dt, mt10_seed0): would train"),
    ("runs: [{method: m3dt-end2end, experts: [4, 8]}]\nsuites: [mt10]", "expert_num 8, not 4"),
    # the evaluation's settings, checked as m3dt.evaluate checks its flags, when the grid is read (not after training)
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {episodes: -1}", "evaluation: --episodes must be at least 1"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {max_steps: 0}", "--max_steps must be at least 1"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {workers: -1}", "evaluation: --workers must be at least 0"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {max_rollouts: 0}", "--max_rollouts must be at least 1"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {episodes: true}", "episodes must be int, got True"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {context_actions: half}", "--context_actions must be one of"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {device: gpu}", "--device 'gpu' is not a device name"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nevaluation: {episodes: 60}", "evaluation: --episodes 60: Meta-World"),
    # options of the wrong type: one line naming the option, as a stage's --config file gets (not argparse's two)
    ("runs: [{method: mtdt, options: {embed_dim: abc}}]\nsuites: [mt10]", "runs[0].options: embed_dim must be int, "
                                                                          "got 'abc'"),
    ("runs: [{method: mtdt, options: {embed_dim: true}}]\nsuites: [mt10]", "embed_dim must be int, got True"),
    ("runs: [{method: mtdt, options: {wandb: 1}}]\nsuites: [mt10]", "runs[0].options: wandb must be bool, got 1"),
    ("runs: [{method: mtdt, options: {residual: foo}}]\nsuites: [mt10]", "--residual must be one of ln2, standard"),
    ("options: {learning_rate: fast}\nruns: [{method: mtdt}]\nsuites: [mt10]", "options: learning_rate must be float"),
    ("", "the grid file is empty: it needs suites and runs"),
    ("runs: [{method: mtdt}]\nsuites: [mt10]\nseeds: [zero]", "seeds: expected an integer or a non-empty list of "
                                                              "them, got ['zero']"),
    # a group per expert: 16 experts at 10 tasks used to be planned, then stop the grid after its stage 1
    ("runs: [{method: m3dt, experts: [8, 16]}]\nsuites: [mt10]", "runs[0].experts: 16 experts for the 10 tasks of "
                                                               "mt10: the task grouping makes one group per expert"),
])
def test_grid_file_errors_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        main([str(path), "--dry_run"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and str(path) in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_an_entry_of_other_options_gets_a_valid_run_directory(tmp_path):
    path = tmp_path / "wide.yaml"
    path.write_text("runs: [{method: prompt-dt, options: {router_hidden: '64,64', data_path: ./other/data}}]\n"
                    "suites: [mt10]\n")
    names = {job.run_dir.name for job in plan_jobs(load_grid(path), tmp_path / "runs", {})}
    assert names == {"mt10_seed0_data_path.-other-data_router_hidden64-64"}


def test_a_grid_that_would_reuse_files_trained_otherwise_is_refused(finished_grid, grid_file, tmp_path, capsys):
    """Another grid on the same run root asking for other router steps: its router is not "already finished"
    with the first grid's weights; the grid refuses in one line before any job runs, --dry_run lists it."""
    other = tmp_path / "other.yaml"
    other.write_text(grid_file.read_text().replace("router_steps: 10", "router_steps: 12"))
    before = weight_hashes(finished_grid)
    with pytest.raises(SystemExit) as stop:
        main([str(other), "--run_root", str(finished_grid)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "stage3/gradient_2/moe.safetensors was trained with 10 steps, not 12" in error
    assert "(1 more: --dry_run lists them)" in error and error.count("\n") == 1 and "Traceback" not in error
    assert weight_hashes(finished_grid) == before
    main([str(other), "--run_root", str(finished_grid), "--dry_run"])
    assert capsys.readouterr().out.count("conflict: trained with other options") == 2  # the router of each seed


def test_a_job_run_by_another_process_is_refused(finished_grid, grid_file):
    """The lock in the run's logs/ folder: a second process on the same job stops at once, with one line."""
    import fcntl

    from m3dt.experiment import JobFailed, execute, log_name

    job = plan_jobs(load_grid(grid_file), finished_grid, {})[0]
    lock = finished_grid / job.run_dir.name / "logs" / (log_name(job) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                                 "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(lock)], capture_output=True)
        assert holder.returncode != 0  # another process cannot take it while this one holds it
        with pytest.raises(JobFailed, match="is being run by another process"):
            execute(job)  # flock is per open file: a second open in this very process is refused too
    execute(job)  # free again: stage 1 is already finished and returns at once


def test_comparison_methods_through_the_grid(grid_file, one_thread, tmp_path):
    """MTDT, HarmoDT, the two ablations and the random policy train and evaluate through a grid (each
    method's steps and stage-1 dependency from its module in m3dt/baselines) and reach the report."""
    grid = tmp_path / "baselines.yaml"
    text = grid_file.read_text().replace("seeds: [0, 1]", "seeds: [0]")
    text = text.replace("backbone_steps: 60", "backbone_steps: 20")
    grid.write_text(text.split("runs:")[0].replace("router_steps: 10,", "router_steps: 10, harmodt_steps: 20,")
                    + "runs:\n  - method: random\n  - method: mtdt\n  - method: harmodt\n"
                      "  - {method: m3dt-end2end, experts: [2]}\n  - {method: m3dt-no-grouping, experts: [2]}\n")
    plan = plan_jobs(load_grid(grid), tmp_path / "runs", {})
    steps = {job.method: planned_steps(job) for job in plan if job.kind == "baseline"}
    assert steps == {"mtdt": 20, "harmodt": 20, "m3dt-end2end": 40, "m3dt-no-grouping": 20}
    main([str(grid), "--run_root", str(tmp_path / "runs")])
    run = tmp_path / "runs" / "loco_seed0"
    inputs = {method: json.loads((run / "baselines" / method / "model.manifest.json").read_text())["inputs"]
              for method in steps}
    assert list(inputs.pop("m3dt-no-grouping")) == ["stage1/backbone.safetensors"]  # after stage 1
    assert all(not recorded for recorded in inputs.values())  # the others train from scratch
    text = build_report([tmp_path / "runs"], tmp_path / "report", reps=50)
    for name in ("random policy", "MTDT", "HarmoDT", "M3DT w/o three-stage", "M3DT w/o grouping"):
        assert f"| {name} |" in text


def test_ctrl_c_in_a_job_stops_the_grid(grid_file, monkeypatch, tmp_path, capsys):
    """A stage stopped by Ctrl-C exits with 130 after saying where it stopped: the grid stops with it rather
    than counting a failed job and going on to the next."""
    called = []

    def interrupted_stage(flags):
        called.append(flags)
        raise SystemExit(130)

    monkeypatch.setattr("m3dt.experiment.entry_point", lambda job: interrupted_stage)
    with pytest.raises(SystemExit) as stop:
        main([str(grid_file), "--run_root", str(tmp_path / "runs")])
    assert stop.value.code == 130 and len(called) == 1 and "grid finished" not in capsys.readouterr().out


def test_a_grid_of_ones_own_tasks_is_planned(tmp_path):
    """A grid whose options name a --task_table plans runs on the tasks of that table."""
    table = tmp_path / "own.json"
    table.write_text(json.dumps([{"task": "own-hopper", "env_id": "Hopper-v5", "obs_dim": 11, "act_dim": 3,
                                  "horizon": 40, "return_target": 60.0, "rtg_scale": 100.0,
                                  "score_min_return": -20.3, "score_max_return": 3234.3}]))
    grid = tmp_path / "own.yaml"
    grid.write_text(f"options: {{task_table: {table}}}\nsuites: [mine]\ntask_sets: {{mine: 'own-hopper,reach-v2'}}\n"
                    "runs: [{method: prompt-dt}]\n")
    jobs = plan_jobs(load_grid(grid), tmp_path / "runs", {})
    assert [job.kind for job in jobs] == ["stage1", "evaluate"]
    assert "| to do |" in dry_run(load_grid(grid), jobs, tmp_path / "runs", load_benches(), show_commands=False)


def test_a_value_starting_with_a_dash_reaches_the_stage_as_that_value():
    """A grid's option value that starts with "-" (a folder named "-data") is passed as --name=value, which the
    stage's parser reads as that option's value rather than as a flag of its own; others stay --name value."""
    flags = experiment.config_flags({"data_path": "-data", "embed_dim": 16, "wandb": True, "restart": False,
                                     "run_dir": None})
    assert flags == ["--data_path=-data", "--embed_dim", "16", "--wandb", "--no-restart"]
    config = parse_config("stage 1", flags)
    assert (config.data_path, config.embed_dim, config.wandb, config.restart) == ("-data", 16, True, False)


@pytest.mark.parametrize("mode", [[], ["--dry_run"]])
def test_a_run_root_that_is_a_file_is_one_line_before_anything_runs(grid_file, tmp_path, capsys, mode):
    """The plan's run directories (m3dt.run.RunDir) refuse a path below a file when the plan is made."""
    blocker = tmp_path / "F"
    blocker.write_text("")
    for run_root in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as stop:
            main([str(grid_file), "--run_root", str(run_root), *mode])
        captured = capsys.readouterr()
        assert stop.value.code == 2 and captured.err.startswith(f"error: {run_root}/")
        assert f": run directory cannot be made: {blocker} is a file, not a folder" in captured.err
        assert "==" not in captured.out
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_a_lock_that_cannot_be_written_fails_its_job_in_one_line(grid_file, tmp_path):
    job = plan_jobs(load_grid(grid_file), tmp_path / "runs", {})[0]
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "logs").write_text("")  # a file where the logs folder goes
    with pytest.raises(JobFailed, match="logs: folder of the lock of .* is a file, not a folder"):
        execute(job)


def test_missing_data_is_one_line_before_any_job_and_listed_by_the_dry_run(grid_file, tmp_path, capsys,
                                                                           monkeypatch):
    """Every training job reads --data_path (a finished stage too: it compares the data with what it trained
    on), so a grid without its data stops before the first job rather than failing each one in turn."""
    run_root, missing, empty = tmp_path / "runs", tmp_path / "no_data", tmp_path / "empty"
    with pytest.raises(SystemExit) as stop:
        main([str(grid_file), "--run_root", str(run_root), "--data_path", str(missing)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and f"{missing}: data root does not exist" in error
    assert "read by 8 of the grid's training jobs" in error  # per seed: stage 1, grouping, experts, routers
    assert error.count("\n") == 1 and not run_root.exists()
    main([str(grid_file), "--run_root", str(run_root), "--data_path", str(missing), "--dry_run"])
    assert f"- {missing}: data root does not exist (download MT160 or run python -m m3dt.collect) (8 job(s))" \
        in capsys.readouterr().out
    empty.mkdir()  # a data root without the grid's task folders: each named by the stages' own check
    with pytest.raises(SystemExit):
        main([str(grid_file), "--run_root", str(run_root), "--data_path", str(empty)])
    error = capsys.readouterr().err
    assert "task folder does not exist" in error and "2 more problem(s) with the data" in error
    assert error.count("\n") == 1 and not run_root.exists()
    # SLURM's nodes may mount other file systems than the submitting machine: a warning, and the jobs go
    monkeypatch.setattr(experiment, "run_submitit", lambda jobs, *rest: submitted.extend(jobs) or 0)
    submitted = []
    main([str(grid_file), "--run_root", str(run_root), "--data_path", str(missing), "--launcher", "slurm"])
    out = capsys.readouterr().out
    assert out.startswith(f"warning: on this machine, {missing}: data root does not exist") and submitted


def test_a_failed_job_skips_the_jobs_that_need_it_on_submitits_executors(grid_file, monkeypatch, tmp_path, capsys):
    """submitit's local executor runs a level at a time: the jobs that need a failed one are skipped with a
    line each, not submitted to fail on its missing output."""
    import submitit

    submitted = []

    class FailingStage1Executor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **parameters):
            pass

        def batch(self):
            return contextlib.nullcontext()

        def submit(self, function, job):
            submitted.append(job.kind)

            def result():
                if job.kind == "stage1":
                    raise RuntimeError("stage 1 failed")

            return SimpleNamespace(job_id=str(len(submitted)), result=result)

    monkeypatch.setattr(submitit, "AutoExecutor", FailingStage1Executor)
    jobs = plan_jobs(load_grid(grid_file), tmp_path / "runs", {})
    assert run_submitit(jobs, tmp_path / "runs", {}, "local") == len(jobs)
    assert submitted == ["stage1", "stage1"]
    assert capsys.readouterr().out.count("a job it needs failed") == len(jobs) - 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_evaluation_device_this_machine_lacks_stops_the_local_grid_before_training(grid_file, tmp_path, capsys):
    grid = tmp_path / "cuda.yaml"
    grid.write_text(grid_file.read_text().replace("device: cpu}", "device: cuda}"))
    main([str(grid), "--run_root", str(tmp_path / "runs"), "--dry_run"])  # the plan may go to a GPU machine
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(grid), "--run_root", str(tmp_path / "runs")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "evaluation: --device cuda: no CUDA device is visible" in error
    assert error.count("\n") == 1 and not (tmp_path / "runs").exists()

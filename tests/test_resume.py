"""Resumable stages: a stage killed with SIGKILL at a random moment and run again ends with the same weights,
bit for bit, as a run that was never interrupted; a checkpoint write that dies midway leaves the previous
checkpoint intact; a finished stage is not redone unless --restart says so."""

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import m3dt.run
from m3dt.run import (atomic_path, load_checkpoint, remove_stale_temporaries, save_checkpoint, save_tensors,
                      truncate_jsonl)
from m3dt.workers import SPAWN, starting_workers
from tests.conftest import REPO, SMALL_TASKS
from tests.test_pipeline import TINY, run_stage

STEPS = 60
SAVE_EVERY = 5
GROUPS = 2


def stage_args(data: Path, run_dir: Path) -> list[str]:
    return [*TINY, "--router_hidden", "64,64", "--save_every", str(SAVE_EVERY), "--log_every", str(SAVE_EVERY),
            "--max_iters", str(STEPS),
            "--workers", "0", "--tasks", ",".join(SMALL_TASKS), "--data_path", str(data), "--run_dir", str(run_dir)]


EXPERT_ARGS = ["--grouping", "random", "--expert_num", str(GROUPS), "--all"]
ROUTER_ARGS = ["--grouping", "random", "--expert_num", str(GROUPS)]


def last_logged_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being appended right now
            pass
    return max(steps)


def kill_at_random_step(script: str, args: list[str], metrics: Path, log: Path, rng: random.Random,
                        signal_number: int = signal.SIGKILL) -> int:
    """Start a stage, wait until it logged a random step (a checkpoint exists by then), wait a random
    moment more (the kill may land anywhere, a checkpoint write included), SIGKILL it (or send
    `signal_number`: SIGINT is Ctrl-C). Returns the step."""
    target = rng.randrange(2 * SAVE_EVERY, STEPS - 20 + 1)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as output:
        # a shell's background job ignores SIGINT, and so would the stage: give it Ctrl-C back
        process = subprocess.Popen([sys.executable, str(REPO / script), *args], stdout=output, stderr=output,
                                   cwd=REPO, env=environment,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while last_logged_step(metrics) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))
        process.send_signal(signal_number)  # SIGKILL: no cleanup code of the stage runs
        process.wait()
    expected = -signal.SIGKILL if signal_number == signal.SIGKILL else 128 + signal_number  # 130 for Ctrl-C
    assert process.returncode == expected, f"ended before the signal at step {target}:\n{log.read_text()[-3000:]}"
    return target


def resumed_step(stdout: str) -> int:
    match = re.search(r"resuming from step (\d+)", stdout)
    assert match, f"the rerun did not resume:\n{stdout}"
    return int(match.group(1))


def assert_same_tensors(file: Path, reference: Path) -> None:
    tensors, expected = load_file(file), load_file(reference)
    assert tensors.keys() == expected.keys()
    for name in expected:
        assert torch.equal(tensors[name], expected[name]), f"{file.name}: {name} differs from the uninterrupted run"


def logged_losses(metrics: Path) -> list[tuple[int, float]]:
    return [(record["step"], record["loss"]) for record in map(json.loads, metrics.read_text().splitlines())]


@pytest.fixture(scope="module")
def reference_run(small_data, tmp_path_factory) -> Path:
    """Stage 1, expert training (--all) and router training without interruption."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    args = stage_args(small_data, run_dir)
    run_stage("stage1_backbone_train.py", *args)
    run_stage("stage2_task_grouping_random.py", "--group_num", str(GROUPS), *args)
    run_stage("stage2_expert_train.py", *EXPERT_ARGS, *args)
    run_stage("stage3_router_train.py", *ROUTER_ARGS, *args)
    return run_dir


@pytest.fixture(scope="module")
def killed_stage1(small_data, tmp_path_factory) -> tuple[Path, int, int]:
    """Stage 1 killed at a random step, then the same command again; returns the run, kill and resume steps."""
    run_dir = tmp_path_factory.mktemp("killed")
    args = stage_args(small_data, run_dir)
    rng = random.Random()
    killed_at = kill_at_random_step("stage1_backbone_train.py", args, run_dir / "stage1" / "metrics.jsonl",
                                    run_dir / "killed.log", rng)
    assert not (run_dir / "stage1" / "backbone.safetensors").exists()
    rerun = run_stage("stage1_backbone_train.py", *args)
    return run_dir, killed_at, resumed_step(rerun.stdout)


def test_stage1_resumes_bit_for_bit(reference_run, killed_stage1):
    run_dir, killed_at, resumed_at = killed_stage1
    assert SAVE_EVERY <= resumed_at < STEPS and resumed_at % SAVE_EVERY == 0, (killed_at, resumed_at)
    assert_same_tensors(run_dir / "stage1" / "backbone.safetensors", reference_run / "stage1" / "backbone.safetensors")
    # the log has each step once and the same losses: records after the checkpoint were dropped on resume
    metrics = "stage1/metrics.jsonl"
    assert logged_losses(run_dir / metrics) == logged_losses(reference_run / metrics)
    assert not list((run_dir / "stage1").glob(".*.tmp"))


def test_expert_training_resumes_bit_for_bit(small_data, reference_run, killed_stage1):
    run_dir, _, _ = killed_stage1
    args = stage_args(small_data, run_dir)
    run_stage("stage2_task_grouping_random.py", "--group_num", str(GROUPS), *args)
    job_dir = run_dir / "stage2" / f"experts_random_{GROUPS}" / "jobs" / "all"
    kill_at_random_step("stage2_expert_train.py", [*EXPERT_ARGS, *args], job_dir / "metrics.jsonl",
                        run_dir / "killed_experts.log", random.Random())
    rerun = run_stage("stage2_expert_train.py", *EXPERT_ARGS, *args)
    assert resumed_step(rerun.stdout) < STEPS
    for expert in range(GROUPS):
        name = f"stage2/experts_random_{GROUPS}/expert_{expert}.safetensors"
        assert_same_tensors(run_dir / name, reference_run / name)


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["SIGKILL", "Ctrl-C", "SIGTERM"])
def test_router_training_resumes_bit_for_bit(small_data, reference_run, tmp_path, signal_number):
    """Killed, or interrupted with Ctrl-C or SIGTERM (a scheduler's stop; it ended the stage silently), which
    end it with one line saying where it stopped and from which step the same command resumes."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "stage1", run_dir / "stage1")
    shutil.copytree(reference_run / "stage2", run_dir / "stage2")
    args = [*ROUTER_ARGS, *stage_args(small_data, run_dir)]
    stage3 = f"stage3/random_{GROUPS}"
    log = run_dir / "stopped_router.log"
    kill_at_random_step("stage3_router_train.py", args, run_dir / stage3 / "metrics.jsonl", log, random.Random(),
                        signal_number)
    assert not (run_dir / stage3 / "moe.safetensors").exists()
    said = interrupted_message_step(log.read_text(), run_dir / stage3 / "train_state.pt", signal_number) \
        if signal_number != signal.SIGKILL else None
    rerun = run_stage("stage3_router_train.py", *args)
    assert resumed_step(rerun.stdout) < STEPS and said in (None, resumed_step(rerun.stdout))
    assert_same_tensors(run_dir / stage3 / "moe.safetensors", reference_run / stage3 / "moe.safetensors")
    assert logged_losses(run_dir / stage3 / "metrics.jsonl") == logged_losses(reference_run / stage3 / "metrics.jsonl")


def interrupted_message_step(output: str, checkpoint: Path, signal_number: int = signal.SIGINT) -> int:
    """Checks the one line Ctrl-C (or SIGTERM) leaves (no traceback) and returns the step it says a rerun resumes
    from."""
    assert "Traceback" not in output and output.count("interrupted") == 1
    cause = "Ctrl-C" if signal_number == signal.SIGINT else "SIGTERM"
    match = re.fullmatch(rf"interrupted \({cause}\): \[stage3 router\] stopped at step (\d+) of 60; rerun the same "
                         r"command to resume from step (\d+) \((.+)\)", output.splitlines()[-1])
    assert match, output.splitlines()[-1]
    stopped, saved = int(match.group(1)), int(match.group(2))
    assert saved <= stopped < STEPS and saved % SAVE_EVERY == 0 and match.group(3) == str(checkpoint)
    return saved


def test_finished_stage_is_not_redone_unless_restarted(small_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "stage1", run_dir / "stage1")
    backbone = run_dir / "stage1" / "backbone.safetensors"
    written = backbone.stat().st_mtime_ns
    args = stage_args(small_data, run_dir)

    again = run_stage("stage1_backbone_train.py", *args)
    assert "stage 1 already finished (60 steps)" in again.stdout and "--restart" in again.stdout
    assert backbone.stat().st_mtime_ns == written

    restarted = run_stage("stage1_backbone_train.py", *args, "--restart")
    assert "resuming" not in restarted.stdout and backbone.stat().st_mtime_ns != written
    # a fresh start from the same seed retrains the same weights and starts a new log
    assert_same_tensors(backbone, reference_run / "stage1" / "backbone.safetensors")
    assert [step for step, _ in logged_losses(run_dir / "stage1" / "metrics.jsonl")] == list(range(5, STEPS + 1, 5))


# ---------------------------------------------------------------------------------------- atomic writes
SIGKILL_MIDWAY = """
import io, os, signal, sys
from pathlib import Path
import torch
from m3dt.run import save_checkpoint

real_save = torch.save

def save_half_then_die(state, file):
    buffer = io.BytesIO()
    real_save(state, buffer)
    Path(file).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
save_checkpoint(Path(sys.argv[1]), {"step": 2, "weights": torch.ones(1000)})
"""


def test_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "train_state.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.zeros(1000)})
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SIGKILL_MIDWAY, str(path)], env=environment, timeout=120)
    assert result.returncode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.zeros(1000))
    # SIGKILL skipped the cleanup: the half-written temporary is left, and the next run removes it
    assert len(list(tmp_path.glob(".train_state.pt.*.tmp"))) == 1
    remove_stale_temporaries(path)
    assert sorted(tmp_path.iterdir()) == [path]


def failing_after_half(real_write):
    """A writer that writes half of what `real_write` would, then raises (a full disk, an I/O error)."""
    def write(value, file, *args, **kwargs):
        real_write(value, file, *args, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[: Path(file).stat().st_size // 2])
        raise OSError("disk full")
    return write


def test_failed_writes_leave_previous_files_intact(tmp_path, monkeypatch):
    checkpoint, tensors = tmp_path / "train_state.pt", tmp_path / "backbone.safetensors"
    save_checkpoint(checkpoint, {"step": 1})
    save_tensors(tensors, {"weight": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", failing_after_half(torch.save))
    monkeypatch.setattr(m3dt.run, "save_file", failing_after_half(m3dt.run.save_file))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint, {"step": 2})
    with pytest.raises(OSError, match="disk full"):
        save_tensors(tensors, {"weight": torch.ones(3)})
    monkeypatch.undo()
    assert load_checkpoint(checkpoint)["step"] == 1
    assert torch.equal(load_file(tensors)["weight"], torch.zeros(3))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone.safetensors", "train_state.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_the_umask_whatever_the_writer(tmp_path, umask):
    """safetensors 0.8 creates its files 0600 whatever the umask; every artifact gets the umask's mode."""
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "artifact.json") as temporary:
            assert temporary.parent == tmp_path and not temporary.exists()
            temporary.write_text("{}")
        save_tensors(tmp_path / "weights.safetensors", {"weight": torch.zeros(3)})
        save_checkpoint(tmp_path / "train_state.pt", {"step": 1})
    finally:
        os.umask(previous)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_resume_drops_log_records_after_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "loss": 1.0}) for step in (5, 10, 15, 20)]
    metrics.write_text("\n".join(records) + '\n{"step": 25, "lo')  # killed mid-append
    truncate_jsonl(metrics, 10)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [5, 10]
    truncate_jsonl(metrics, 0)  # a fresh start
    assert metrics.read_text() == ""


def test_workers_ignore_ctrl_c_from_their_first_instruction():
    """A Ctrl-C while the spawned data-loading, env or collection workers were still importing torch printed
    their tracebacks beside the main process's one line: they now start with SIGINT ignored, and the main
    process keeps its own handler."""
    handler = signal.getsignal(signal.SIGINT)
    with starting_workers():
        pool = SPAWN.Pool(1)
    with pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("command", [["-m", "m3dt.report", "nowhere"], ["stage1_backbone_train.py", "--help"]],
                         ids=["python -m", "stage script"])
def test_ctrl_c_while_a_command_imports_is_one_line(command):
    """Ctrl-C in a command's first seconds, while torch and the simulators import, ended in an import traceback."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-X", "importtime", *command], stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env=environment, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:  # -X importtime: a line as each module finishes importing
        if line.split("|")[-1].strip() == "m3dt":  # the package: the command's own imports (torch) come next
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    process.wait()
    printed = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert process.returncode == 130 and printed == ["interrupted (Ctrl-C) while starting: nothing was written"]

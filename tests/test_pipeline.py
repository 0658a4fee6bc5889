"""Every stage script through its command line, each stage consuming what the previous one wrote."""

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3dt.config import parse_config
from m3dt.stages import group_tasks, run_cli, train_backbone
from tests.conftest import REPO, SMALL_TASKS

TINY = ["--embed_dim", "32", "--n_layer", "2", "--n_head", "2", "--warmup_steps", "5", "--log_every", "20",
        "--learning_rate", "1e-3",
        "--save_every", "20", "--device", "cpu", "--workers", "0"]


def tiny_on(device: torch.device) -> list[str]:
    """TINY on `device` (the --device of the test session)."""
    return [*TINY[:TINY.index("--device")], "--device", str(device), "--workers", "0"]


def run_stage(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                            cwd=REPO, env=environment, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def pipeline_run(small_data, tmp_path_factory, device):
    run_dir = tmp_path_factory.mktemp("run")
    common = [*tiny_on(device), "--data_path", str(small_data), "--run_dir", str(run_dir)]
    previous = os.umask(0o022)  # the stages inherit it; every file they write must be 0644 (readable by all)
    try:
        run_stage("stage1_backbone_train.py", "--tasks", ",".join(SMALL_TASKS), "--max_iters", "200", *common)
        yield run_dir, common
    finally:
        os.umask(previous)


def read_losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.device
def test_stage1_loss_falls_and_writes_artifacts(pipeline_run):
    run_dir, _ = pipeline_run
    losses = read_losses(run_dir / "stage1" / "metrics.jsonl")
    assert len(losses) == 10 and sum(losses[-2:]) < 0.7 * sum(losses[:2])
    manifest = json.loads((run_dir / "stage1" / "backbone.manifest.json").read_text())
    assert manifest["tasks"] == SMALL_TASKS and manifest["steps_done"] == 200
    assert set(load_file(run_dir / "stage1" / "data_stats.safetensors")) >= {"state_mean", "prompt_states"}


@pytest.mark.device
def test_full_chain_both_groupings(pipeline_run, device):
    run_dir, common = pipeline_run
    run_stage("stage2_task_grouping_gradient.py", "--group_num", "3", "--kmeans_restarts", "4",
              "--kmeans_repeats", "4", *common)
    run_stage("stage2_task_grouping_random.py", "--group_num", "2", *common)
    groups = json.loads((run_dir / "stage2" / "groups_gradient_3.json").read_text())
    assert sorted(groups) == ["expert_0", "expert_1", "expert_2"]
    assert sorted(t for g in groups.values() for t in g) == sorted(SMALL_TASKS)

    # gradient grouping: one process trains every expert
    run_stage("stage2_expert_train.py", "--grouping", "gradient", "--expert_num", "3", "--all", "--max_iters", "30", *common)
    experts = run_dir / "stage2" / "experts_gradient_3"
    assert all((experts / f"expert_{i}.safetensors").exists() for i in range(3))
    # random grouping: the shell script as on 2 GPUs (GPUS=2; on a CPU two processes, one shard of --all each;
    # on a machine with one GPU one --all process), then as on a machine without GPU (one --all process),
    # which finds every expert trained
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable}
    script = ["bash", str(REPO / "stage2_expert_train_total.sh"), "--grouping", "random", "--expert_num", "2",
              "--max_iters", "30", *common]
    shards = 2 if device.type == "cpu" else min(2, torch.cuda.device_count())
    subprocess.run(script, check=True, cwd=REPO, env={**environment, "GPUS": str(shards)}, capture_output=True,
                   timeout=600)
    random_experts = run_dir / "stage2" / "experts_random_2"
    assert all((random_experts / f"expert_{i}.safetensors").exists() for i in range(2))
    if shards == 2:
        assert sorted(path.name for path in (random_experts / "jobs").iterdir()) == ["shard_0_of_2", "shard_1_of_2"]
        assert "stage 2: wrote 1 expert(s)" in (random_experts / "train_gpu1.log").read_text()
    again = subprocess.run(script, check=True, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert "already finished" in again.stdout

    run_stage("stage3_router_train.py", "--grouping", "gradient", "--expert_num", "3", "--max_iters", "30", *common)
    moe = load_file(run_dir / "stage3" / "gradient_3" / "moe.safetensors")
    assert moe["blocks.0.expert_mixture.experts.up_weight"].shape[0] == 3
    # the router stage trained routers only: the experts in the MoE equal what stage 2 wrote
    expert_1 = load_file(experts / "expert_1.safetensors")
    assert torch.equal(moe["blocks.1.expert_mixture.experts.down_weight"][1], expert_1["blocks.1.down_weight"][0])
    assert torch.equal(moe["blocks.0.mlp.up.weight"], load_file(run_dir / "stage1" / "backbone.safetensors")["blocks.0.mlp.up.weight"])

    # a finished stage rerun does nothing and says so
    again = run_stage("stage3_router_train.py", "--grouping", "gradient", "--expert_num", "3", "--max_iters", "30", *common)
    assert "already finished" in again.stdout

    # every artifact kind the run directory holds, evaluation outputs included, follows the umask (022: 0644)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "m3dt.evaluate", "--run_dir", str(run_dir), "--stage", "3", "--expert_num",
                    "3", "--tasks", "pendulum-swingup", "--episodes", "1", "--max_steps", "3", "--workers", "0",
                    "--device", "cpu"], check=True, cwd=REPO, env=environment, capture_output=True, timeout=600)
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    kinds = {path.suffix for path in files} | {path.name for path in files if path.name.endswith(".manifest.json")}
    assert {".safetensors", ".json", ".pt", ".jsonl", ".csv", ".md", ".png", ".log"} <= kinds
    assert {"backbone.manifest.json", "groups_gradient_3.manifest.json", "expert_0.manifest.json",
            "moe.manifest.json", "results.json"} <= {path.name for path in files}
    assert {path.relative_to(run_dir): oct(stat.S_IMODE(path.stat().st_mode)) for path in files
            if stat.S_IMODE(path.stat().st_mode) != 0o644} == {}


def test_mismatched_inputs_are_named(pipeline_run):
    run_dir, common = pipeline_run
    wrong_width = [*common, "--embed_dim", "64"]
    result = run_stage("stage2_task_grouping_random.py", "--group_num", "2", *wrong_width, check=False)
    assert result.returncode == 2
    assert "backbone.safetensors: made with embed_dim=32, this run uses embed_dim=64; pass --embed_dim 32" in result.stderr
    result = run_stage("stage3_router_train.py", "--expert_num", "5", *common, check=False)
    assert result.returncode == 2 and "groups_gradient_5.json: group file does not exist" in result.stderr
    result = run_stage("stage2_task_grouping_random.py", "--group_num", "2", "--tasks", "reach-v2", *common, check=False)
    assert result.returncode == 2 and "differ" in result.stderr
    assert "Traceback" not in result.stderr


TOTAL_SCRIPT = str(REPO / "stage2_expert_train_total.sh")


def script_environment(**variables: str) -> dict[str, str]:
    """The environment the shell script runs in: no PYTHON unless given (it then picks the repository's
    .venv/bin/python), nothing on PYTHONPATH (it adds the repository itself)."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "PYTHONPATH", "GPUS")}
    return {**environment, "OMP_NUM_THREADS": "1", **variables}


def test_total_script_help_and_interpreter(tmp_path):
    result = subprocess.run(["bash", TOTAL_SCRIPT, "--help"], capture_output=True, text=True, cwd=tmp_path,
                            env=script_environment(), timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # was "usage: unbound variable"
    venv = REPO / ".venv" / "bin" / "python"
    assert f"interpreter: {venv if venv.exists() else 'python3'}\n" in result.stdout
    assert "Ctrl-C (or SIGTERM) stops every shard" in result.stdout and "--expert_num EXPERT_NUM" in result.stdout


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_total_script_relative_paths_one_copy_and_interrupt(pipeline_run, small_data):
    """Paths relative to the caller's directory; a second copy for the same experts refused while the first
    runs; more GPUS than visible refused unless on the CPU; Ctrl-C stops every shard, and frees the lock."""
    run_dir, _ = pipeline_run
    caller = run_dir.parent
    relative = ["--run_dir", run_dir.name, "--data_path", os.path.relpath(small_data, caller)]
    group_tasks(parse_config("", [*TINY, "--run_dir", str(run_dir), "--group_num", "3"]), "random")
    flags = [*TINY, *relative, "--grouping", "random", "--expert_num", "3", "--max_iters", "100000"]
    experts = run_dir / "stage2" / "experts_random_3"
    first = subprocess.Popen(["bash", TOTAL_SCRIPT, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=caller, env=script_environment(PYTHON=sys.executable, GPUS="2"),
                             start_new_session=True)
    try:
        logs = [experts / f"train_gpu{shard}.log" for shard in (0, 1)]
        wait_for(lambda: all(log.exists() and "loaded " in log.read_text() for log in logs))  # found the data
        shards = children_of(first.pid)
        assert len(shards) == 2

        visible = torch.cuda.device_count()
        second = subprocess.run(["bash", TOTAL_SCRIPT, *flags, "--device", "auto"], capture_output=True, text=True,
                                cwd=caller, env=script_environment(PYTHON=sys.executable), timeout=120)
        assert second.returncode == 2 and second.stderr == (
            "error: the experts of random grouping with 3 experts are being trained by another process (lock "
            f"{run_dir.name}/stage2/experts_random_3/train.lock); wait for it or stop it\n")
        if visible == 0:  # said before anything trains on the CPU
            assert second.stdout == "no CUDA device is visible: one process trains all 3 experts on the CPU\n"
        too_many = subprocess.run(["bash", TOTAL_SCRIPT, *flags, "--device", "auto"], capture_output=True, text=True,
                                  cwd=caller, env=script_environment(PYTHON=sys.executable, GPUS=str(visible + 1)),
                                  timeout=120)
        assert too_many.returncode == 2 and too_many.stderr.startswith(f"error: GPUS={visible + 1} but {visible} CUDA")

        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, err
    assert "stopping the 2 shards; rerun the same command to resume" in err
    assert not any(Path(f"/proc/{shard}").exists() for shard in shards)
    with open(experts / "train.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_wandb_logs_offline(small_data, tmp_path):
    run_dir = tmp_path / "run"
    environment_flags = [*TINY, "--data_path", str(small_data), "--run_dir", str(run_dir)]
    run_stage("stage1_backbone_train.py", "--tasks", "reach-v2,walker-walk", "--max_iters", "20", "--wandb",
              *environment_flags)
    runs = list((run_dir / "stage1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # a resumed stage continues that W&B run (offline: a second folder of the same run id); --restart begins anew
    run_id = (run_dir / "stage1" / "wandb_run_id").read_text()
    run_stage("stage1_backbone_train.py", "--tasks", "reach-v2,walker-walk", "--max_iters", "30", "--wandb",
              *environment_flags)
    run_stage("stage1_backbone_train.py", "--tasks", "reach-v2,walker-walk", "--max_iters", "20", "--wandb",
              "--restart", *environment_flags)
    ids = sorted(path.name.rsplit("-", 1)[1] for path in (run_dir / "stage1" / "wandb").glob("offline-run-*"))
    restarted = (run_dir / "stage1" / "wandb_run_id").read_text()
    assert restarted != run_id and ids == sorted([run_id, run_id, restarted])


@pytest.mark.device
def test_compiled_training_matches_eager(small_data, tmp_path, device):
    """--compile changes how the forward runs, not what it computes (dropout off: the compiled graph draws
    its masks differently). On a GPU, `reduce-overhead` (CUDA graphs) too; on a CPU it would compile the same
    graph as `default`."""
    modes = ("none", "default", "reduce-overhead") if device.type == "cuda" else ("none", "default")
    weights = {}
    for mode in modes:
        run_dir = tmp_path / mode
        run_stage("stage1_backbone_train.py", "--tasks", ",".join(SMALL_TASKS[:2]), "--max_iters", "4",
                  "--dropout", "0", "--compile", mode, *tiny_on(device), "--data_path", str(small_data),
                  "--run_dir", str(run_dir))
        weights[mode] = load_file(run_dir / "stage1" / "backbone.safetensors")
    eager = weights.pop("none")
    for mode, compiled in weights.items():
        assert eager.keys() == compiled.keys()
        for name, tensor in eager.items():
            torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{mode}: {name}")


@pytest.fixture
def in_process_stages():
    """Stages run in this process: one CPU thread, as run_stage gives the stage scripts (a tiny model gains
    nothing from more, and OpenMP threads wait on each other on a busy machine); afterwards the thread count
    and PyTorch's deterministic mode (--deterministic) as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@pytest.mark.device
def test_deterministic_training_repeats_bit_for_bit(small_data, tmp_path, device, in_process_stages):
    """Two stage-1 runs with --deterministic end with the same weights, bit for bit (on a CPU every run
    does; on a GPU this is PyTorch's deterministic kernels at work). In this process, through the stage's
    command line. Whether runs without it repeat on a GPU is reported as a warning, not asserted: PyTorch
    does not promise it."""
    weights = []
    runs = [True, True, False, False] if device.type == "cuda" else [True, True]
    for deterministic in sorted(runs):  # the runs without first: --deterministic stays on in the process
        run_dir = tmp_path / str(len(weights))
        run_cli(train_backbone, "", ["--tasks", ",".join(SMALL_TASKS[:3]), "--max_iters", "10", *tiny_on(device),
                                     "--data_path", str(small_data), "--run_dir", str(run_dir),
                                     *(["--deterministic"] if deterministic else [])])
        weights.append(load_file(run_dir / "stage1" / "backbone.safetensors"))

    def same(first: dict, second: dict) -> bool:
        return all(torch.equal(tensor, second[name]) for name, tensor in first.items())

    assert same(weights[-1], weights[-2])
    if device.type == "cuda":
        warnings.warn(f"{device} training without --deterministic: two runs "
                      f"{'repeat bit for bit' if same(weights[0], weights[1]) else 'differ'}", stacklevel=1)

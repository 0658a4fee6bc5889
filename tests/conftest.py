"""Shared fixtures: a small dataset in the MT160 layout (m3dt/synthetic.py), one task or more of each family,
and the device the device-marked tests run on (`pytest --device cuda -m device`: what scripts/gpu_check.sh
runs on a GPU; the default, cpu, runs the same tests here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "disable")
os.environ.setdefault("WANDB_MODE", "offline")

from m3dt.synthetic import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL_TASKS = ["reach-v2", "door-close-v2", "walker-walk", "pendulum-swingup", "ant-dir-2", "cheetah-vel-8"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="device of the tests marked `device` (cpu, cuda, cuda:1, ...); default cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: runs on the device given by --device (scripts/gpu_check.sh: cuda)")
    # Under pytest-xdist (scripts/test.sh: a worker per core) each worker, and each process its tests start,
    # takes its share of the cores: the tests' tiny models on more threads than cores only wait for each other.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The modules that take longest (stage scripts in subprocesses, torchrun, fixtures that train; each over a minute
# in one process), longest first, run before the others: pytest-xdist hands the modules to its workers in this
# order (scripts/test.sh: --no-loadscope-reorder), so no worker starts a long module while the other one is
# nearly done.
LONGEST_MODULES = ("test_pipeline.py", "test_resume.py", "test_distributed.py", "test_envs_metaworld.py",
                   "test_experiment.py", "test_evaluate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The --device of this test session. A device that is asked for but missing is an error, not a skip."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda, but torch sees no CUDA device")
    return chosen


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("mt160_small"), SMALL_TASKS)


@pytest.fixture(autouse=True)
def forget_own_tasks():
    """Tasks of one's own (--task_table) are registered process-wide; each test starts without them."""
    from m3dt import tasks

    yield
    tasks._user_tasks.clear()
    tasks._user_table_files.clear()

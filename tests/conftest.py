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

"""Shared fixtures: a small dataset in the MT160 layout (m3dt/synthetic.py), one task or more of each family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")
os.environ.setdefault("WANDB_MODE", "offline")

from m3dt.synthetic import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL_TASKS = ["reach-v2", "door-close-v2", "walker-walk", "pendulum-swingup", "ant-dir-2", "cheetah-vel-8"]


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

"""What scripts/gpu_check.sh runs must import on a machine with torch but without the simulators (a lent GPU
machine has neither gymnasium, MuJoCo, Meta-World, dm_control, stable-baselines3 nor wandb): the modules it
touches are imported here with those packages blocked."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SIMULATORS = ("gymnasium", "mujoco", "metaworld", "dm_control", "stable_baselines3", "wandb")
GPU_CHECK_MODULES = ("m3dt.bench", "m3dt.memory", "m3dt.stages", "m3dt.evaluate", "m3dt.train", "m3dt.naive",
                     "tests.test_model", "tests.test_data", "tests.test_precision", "tests.test_evaluation_forward",
                     "tests.test_bench_paths",
                     "tests.test_pipeline", "tests.test_memory")


@pytest.mark.device
def test_gpu_check_imports_without_the_simulators():
    script = f"""
import importlib, sys
class NoSimulators:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SIMULATORS!r}:
            raise ImportError(f"{{name}} is not installed on this machine")
sys.meta_path.insert(0, NoSimulators())
for module in {GPU_CHECK_MODULES!r}:
    importlib.import_module(module)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]

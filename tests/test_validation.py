"""Bad input stops a stage with one line that names the file and what is wrong (a traceback only with
--debug); loading never runs code from a file; a non-finite loss or gradient stops training before anything
is saved."""

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import m3dt.train
from m3dt.config import (NON_NEGATIVE, NON_NEGATIVE_FLOATS, POSITIVE, POSITIVE_FLOATS, UNIT_INTERVAL, Config,
                         ConfigError, build_parser, check_values, field_comments, parse_config)
from m3dt.data import DataError, TaskDataset, files_fingerprint, load_episode
from m3dt.model import action_loss
from m3dt.naive import NaiveSampler
from m3dt.run import (ArtifactError, RunDir, load_checkpoint, load_tensors, make_folder, save_checkpoint,
                      save_tensors, write_json, write_manifest)
from m3dt.stages import (check_experts, group_tasks, read_groups, recorded_config, run_cli, stage1_tasks,
                         train_backbone, train_experts)
from m3dt.tasks import TaskError, check_timesteps, resolve_tasks
from m3dt.train import TrainingError
from m3dt.synthetic import make_task_data, write_episode
from tests.conftest import REPO
from tests.test_pipeline import TINY

LENGTH = 10
KEYS = ("observations", "actions", "rewards", "terminals")


def valid_arrays(length: int = LENGTH, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    terminals = np.zeros(length, dtype=bool)
    terminals[-1:] = True
    return {"observations": rng.normal(size=(length, 39)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(length, 8)).astype(np.float32),
            "rewards": rng.uniform(size=length).astype(np.float32), "terminals": terminals}


def write_task(root: Path, episodes: int = 4, length: int = LENGTH) -> Path:
    folder = root / "reach-v2"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(episodes):
        np.savez(folder / f"{index}.npz", **valid_arrays(length, seed=index))
    return folder


# ------------------------------------------------------------------------------------ episode files
Damage = Callable[[dict[str, np.ndarray]], None]  # changes one episode's arrays in place


def with_value(key: str, index: tuple, value) -> Damage:
    def damage(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = arrays[key].copy()
        arrays[key][index] = value
    return damage


def replaced(key: str, make: Callable[[np.ndarray], np.ndarray]) -> Damage:
    def damage(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = make(arrays[key])
    return damage


def without(key: str) -> Damage:
    return lambda arrays: arrays.pop(key)


def no_steps(arrays: dict[str, np.ndarray]) -> None:
    arrays.update({key: value[:0] for key, value in arrays.items()})


ARRAY_DEFECTS = {  # name: (damage to file 1 of 4, what the error says)
    "missing key": (without("actions"), "missing key 'actions' (has: observations, rewards, terminals)"),
    "no terminals or dones": (without("terminals"), "missing key 'terminals' or 'dones'"),
    "narrow observations": (replaced("observations", lambda a: a[:, :38]),
                            "'observations' has shape (10, 38), expected (T, 39)"),
    "flat actions": (replaced("actions", lambda a: a.reshape(-1)), "'actions' has shape (80,), expected (T, 8)"),
    "short rewards": (replaced("rewards", lambda a: a[:-1]), "'rewards' has 9 steps but observations have 10"),
    "complex dtype": (replaced("observations", lambda a: a.astype(np.complex64)), "'observations' has dtype complex64"),
    "text dtype": (replaced("rewards", lambda a: a.astype(str)), "'rewards' has dtype <U"),
    "object dtype": (replaced("rewards", lambda a: a.astype(object)), "not a readable npz file"),
    "NaN": (with_value("rewards", (3,), np.nan), "'rewards' contains NaN"),
    "inf": (with_value("observations", (2, 5), np.inf), "'observations' contains NaN, inf"),
    "beyond float32": (replaced("actions", lambda a: a.astype(np.float64) * 1e300),
                       "'actions' contains NaN, inf or values beyond float32's range"),
    "no steps": (no_steps, "episode has no steps"),
}


@pytest.mark.parametrize("defect", ARRAY_DEFECTS, ids=str)
def test_bad_arrays_name_the_file_and_the_problem(tmp_path, defect):
    damage, message = ARRAY_DEFECTS[defect]
    folder = write_task(tmp_path)
    arrays = valid_arrays()
    damage(arrays)
    np.savez(folder / "1.npz", **arrays)
    with pytest.raises(DataError) as raised:
        TaskDataset(tmp_path, ["reach-v2"])
    assert str(raised.value).startswith(f"{folder / '1.npz'}: ") and message in str(raised.value)


def write_single_array(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros(LENGTH))
    path.with_suffix(".npy").rename(path)


def write_truncated(path: Path) -> None:
    np.savez(path, **valid_arrays())
    path.write_bytes(path.read_bytes()[:500])


def write_members_without_suffix(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in valid_arrays().items():
            archive.writestr(key, array.tobytes())


FILE_DEFECTS = {
    "truncated": (write_truncated, "not a readable npz file"),
    "random bytes": (lambda path: path.write_bytes(np.random.default_rng(0).bytes(3000)),
                     "not an npz archive (a zip file of .npy arrays); it starts with"),
    "empty": (lambda path: path.write_bytes(b""), "not an npz archive (a zip file of .npy arrays); it starts with b''"),
    # numpy calls any file that is not a zip or .npy "pickled data" and advises allow_pickle, which we never use
    "text": (lambda path: path.write_text("step,reward\n"), "not an npz archive (a zip file of .npy arrays); it "
                                                           "starts with b'step,r'"),
    "single .npy array": (write_single_array, "holds a single array; expected an npz archive"),
    "members without .npy": (write_members_without_suffix, "'observations' is not a .npy array"),
}


@pytest.mark.parametrize("defect", FILE_DEFECTS, ids=str)
def test_damaged_files_name_the_file_and_the_problem(tmp_path, defect):
    write, message = FILE_DEFECTS[defect]
    path = tmp_path / "0.npz"
    write(path)
    with pytest.raises(DataError) as raised:
        load_episode(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert "allow_pickle" not in str(raised.value)


class CodeInFile:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_loading_never_runs_code_from_a_file(tmp_path):
    marker = tmp_path / "code_ran"
    episode, checkpoint = tmp_path / "0.npz", tmp_path / "train_state.pt"
    episode.write_bytes(pickle.dumps({"observations": CodeInFile(marker)}))
    torch.save({"step": 1, "rng": CodeInFile(marker)}, checkpoint)
    with pytest.raises(DataError, match="not an npz archive"):
        load_episode(episode)
    with pytest.raises(ArtifactError, match="train_state.pt: training checkpoint is truncated or not ours"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("sampler", ["device", "naive"])
def test_prompt_shorter_than_the_window(tmp_path, sampler):
    """The project's data path and the bench's reference-style sampler (m3dt/naive.py) refuse it alike."""
    folder = write_task(tmp_path)
    np.savez(folder / "3.npz", **valid_arrays(length=5))  # a prompt trajectory; the window needs P + 1 steps
    with pytest.raises(DataError, match=r"3\.npz: 5 steps; a prompt trajectory needs 6 \(the 5-step prompt window ends one step before its end\)"):
        if sampler == "device":
            TaskDataset(tmp_path, ["reach-v2"], prompt_length=5)
        else:
            NaiveSampler(tmp_path, ["reach-v2"], context_length=20, batch_size=4, prompt_length=5,
                         device=torch.device("cpu"), seed=0)


def test_task_folders_and_names(tmp_path):
    with pytest.raises(DataError, match="nowhere: data root does not exist"):
        TaskDataset(tmp_path / "nowhere", ["reach-v2"])
    (tmp_path / "episodes.npz").write_bytes(b"")
    with pytest.raises(DataError, match="episodes.npz: data root is a file; give the folder that holds a folder per "
                                        "task"):
        TaskDataset(tmp_path / "episodes.npz", ["reach-v2"])
    folder = write_task(tmp_path, episodes=2)
    with pytest.raises(DataError, match=r"reach-v2: 2 episode.s.; a task needs at least 3 \(2 are prompts\)$"):
        TaskDataset(tmp_path, ["reach-v2"])
    for index in range(4):  # files of another naming: the message says the one it reads
        np.savez(folder / f"episode_{index}.npz", **valid_arrays())
    with pytest.raises(DataError, match=r"reach-v2: 2 episode.s.; a task needs at least 3 \(2 are prompts\) \(episode "
                                        r"files are named 0.npz, 1.npz, ...; found episode_0.npz, episode_1.npz, "
                                        r"episode_2.npz, ...\)"):
        TaskDataset(tmp_path, ["reach-v2"])
    for index in range(4):
        (folder / f"episode_{index}.npz").unlink()
    np.savez(folder / "3.npz", **valid_arrays())
    with pytest.raises(DataError, match=r"reach-v2: episode files must be 0.npz..N.npz without gaps; missing \[2\]"):
        TaskDataset(tmp_path, ["reach-v2"])
    (folder / "3.npz").rename(folder / "02.npz")  # read as episode 2, then looked for as 2.npz: a traceback
    with pytest.raises(DataError, match="reach-v2: episode files are named 0.npz, 1.npz, ... without leading zeros; "
                                        "found 02.npz"):
        files_fingerprint(tmp_path, ["reach-v2"], 2000)
    (folder / "02.npz").unlink()
    np.savez(folder / "\u00b2.npz", **valid_arrays())  # a digit to str.isdigit, not to int(): was a ValueError
    with pytest.raises(DataError, match=r"reach-v2: 2 episode.s.; .* found \u00b2.npz\)"):
        files_fingerprint(tmp_path, ["reach-v2"], 2000)
    (folder / "\u00b2.npz").unlink()
    with pytest.raises(TaskError, match="unknown task 'reach-v3': not in the task table"):
        TaskDataset(tmp_path, ["reach-v3"])
    with pytest.raises(TaskError, match="unknown task 'reach-v3'"):
        resolve_tasks(None, "reach-v2,reach-v3", seed=0)
    with pytest.raises(TaskError, match="repeats a task"):
        resolve_tasks(None, "reach-v2,reach-v2", seed=0)


# ----------------------------------------------------------------------------- property-based loader
def array_mutations() -> list[Callable]:
    """Changes to one array of a valid episode, each `(arrays, key, rng) -> None`; any can hit any key."""
    def drop(arrays, key, rng):
        arrays.pop(key)

    def cast(dtype):
        def damage(arrays, key, rng):
            with contextlib.suppress(ValueError, TypeError):  # e.g. text that is not a number
                arrays[key] = arrays[key].astype(dtype)
        return damage

    def poke(value):
        def damage(arrays, key, rng):
            if arrays[key].dtype.kind == "f" and arrays[key].size:
                arrays[key].reshape(-1)[rng.integers(arrays[key].size)] = value
        return damage

    def shorten(arrays, key, rng):
        if arrays[key].ndim:
            arrays[key] = arrays[key][: rng.integers(arrays[key].shape[0] + 1)]

    def widen(arrays, key, rng):
        if arrays[key].ndim:
            arrays[key] = np.concatenate([arrays[key], arrays[key][..., :1]], axis=-1)

    def add_axis(arrays, key, rng):
        arrays[key] = arrays[key][..., None]

    def scalar(arrays, key, rng):
        arrays[key] = np.zeros((), dtype=arrays[key].dtype)

    def rename(arrays, key, rng):  # terminals -> dones is allowed, the others lose their key
        arrays["dones" if key == "terminals" else f"{key}_"] = arrays.pop(key)

    return [drop, cast(np.float64), cast(np.float16), cast(np.int64), cast(np.bool_), cast(np.complex64), cast(str),
            cast(object), poke(np.nan), poke(np.inf), poke(-np.inf), poke(3e38), shorten, widen, add_axis, scalar,
            rename]


def file_corruptions() -> list[Callable]:
    """Damage to a written episode file, each `(path, rng) -> None`."""
    def truncate(path, rng):
        path.write_bytes(path.read_bytes()[: rng.integers(path.stat().st_size)])

    def flip_bytes(path, rng):
        data = bytearray(path.read_bytes())
        for position in rng.integers(len(data), size=8):
            data[position] ^= 0xFF
        path.write_bytes(bytes(data))

    def random_bytes(path, rng):
        path.write_bytes(rng.bytes(int(rng.integers(0, 4000))))

    def pickled(path, rng):
        with np.load(path, allow_pickle=True) as archive:
            path.write_bytes(pickle.dumps(dict(archive)))

    return [truncate, flip_bytes, random_bytes, pickled, lambda path, rng: write_single_array(path),
            lambda path, rng: write_members_without_suffix(path)]


MUTATIONS, CORRUPTIONS = array_mutations(), file_corruptions()


@st.composite
def episode_recipes(draw, max_defects: int):
    """A valid episode (length, seed), up to `max_defects` array mutations as (mutation, key, seed), and in
    one case of four a file corruption; `write_recipe` writes the file, so hypothesis shrinks recipes, not bytes."""
    length, seed = draw(st.integers(1, 12)), draw(st.integers(0, 99))
    mutation = st.tuples(st.integers(0, len(MUTATIONS) - 1), st.sampled_from(KEYS), st.integers(0, 99))
    mutations = draw(st.lists(mutation, max_size=max_defects))
    corruption = draw(st.sampled_from([None] * 3 * len(CORRUPTIONS) + list(range(len(CORRUPTIONS)))))
    return length, seed, mutations, corruption


def write_recipe(path: Path, recipe) -> None:
    length, seed, mutations, corruption = recipe
    arrays = valid_arrays(length, seed)
    with warnings.catch_warnings():  # casting NaN to int and the like: noise of making bad data
        warnings.simplefilter("ignore")
        for mutation, key, mutation_seed in mutations:
            if key in arrays:
                MUTATIONS[mutation](arrays, key, np.random.default_rng(mutation_seed))
    np.savez(path, **arrays)
    if corruption is not None:
        CORRUPTIONS[corruption](path, np.random.default_rng(seed))


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(recipe=episode_recipes(max_defects=3))
def test_episode_loader_accepts_or_raises_data_error(tmp_path, recipe):
    path = tmp_path / "0.npz"
    write_recipe(path, recipe)
    try:
        episode = load_episode(path)
    except DataError as error:
        assert str(error).startswith(f"{path}: ")
        return
    length = episode.rewards.shape[0]
    assert length > 0 and episode.observations.shape == (length, 39) and episode.actions.shape == (length, 8)
    for array in (episode.observations, episode.actions, episode.rewards):
        assert array.dtype == np.float32 and np.isfinite(array).all()


# Values near float32's maximum are finite, so accepted; their statistics overflow, and training stops on the loss.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@PROPERTY_SETTINGS
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
       damaged=st.none() | st.tuples(st.integers(0, 4), episode_recipes(max_defects=2)))
def test_dataset_loader_accepts_or_raises_data_error(tmp_path, lengths, damaged):
    """A task folder of valid episodes, one of which may be damaged (a training file or a prompt)."""
    folder = tmp_path / "reach-v2"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for index, length in enumerate(lengths):
        np.savez(folder / f"{index}.npz", **valid_arrays(length, seed=index))
    damaged_file = damaged is not None and damaged[0] < len(lengths)
    if damaged_file:
        write_recipe(folder / f"{damaged[0]}.npz", damaged[1])
    valid_layout = len(lengths) >= 3 and min(lengths[-2:]) > 3  # prompts need the window of 3 plus one step
    try:
        dataset = TaskDataset(tmp_path, ["reach-v2"], prompt_length=3)
    except DataError as error:
        assert str(error).startswith(str(folder))
        assert damaged_file or not valid_layout
        return
    assert damaged_file or valid_layout
    assert dataset.task_sizes[0] == len(dataset.observations) == dataset.episode_starts[-1]
    assert dataset.prompts["states"].shape == (1, 2, 3, 39)


# ---------------------------------------------------------------------------------------- artifacts
def test_damaged_checkpoints_and_weights_are_named(tmp_path):
    checkpoint, weights = tmp_path / "train_state.pt", tmp_path / "backbone.safetensors"
    save_checkpoint(checkpoint, {"step": 5, "weights": torch.zeros(1000)})
    save_tensors(weights, {"weight": torch.zeros(1000)})
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="train_state.pt: training checkpoint is truncated or not ours"):
        load_checkpoint(checkpoint)
    with pytest.raises(ArtifactError, match="backbone.safetensors: stage-1 backbone is damaged or not a safetensors"):
        load_tensors(weights, "stage-1 backbone")
    torch.save(torch.zeros(3), checkpoint)
    with pytest.raises(ArtifactError, match="train_state.pt: not a training checkpoint"):
        load_checkpoint(checkpoint)


def fake_run(tmp_path: Path, tasks: list[str], embed_dim: int = 32) -> tuple[RunDir, object]:
    """A run directory with a stage-1 backbone file and manifest, without training anything."""
    config = parse_config("", [*TINY, "--embed_dim", str(embed_dim), "--tasks", ",".join(tasks),
                               "--run_dir", str(tmp_path / "run"), "--grouping", "random", "--expert_num", "2"])
    run = RunDir(config.resolved_run_dir())
    save_tensors(run.backbone, {"weight": torch.zeros(1)})
    write_manifest(run.backbone, "stage1", recorded_config(config, None), tasks, [], run.root)
    return run, config


GROUP_FILE_DEFECTS = {
    "misses a task": ({"expert_0": ["reach-v2"], "expert_1": ["walker-walk"]},
                      "1 task(s) in no group, e.g. pendulum-swingup"),
    "repeats a task": ({"expert_0": ["reach-v2", "walker-walk"], "expert_1": ["walker-walk", "pendulum-swingup"]},
                       "task 'walker-walk' appears in more than one group"),
    "empty group": ({"expert_0": ["reach-v2", "walker-walk", "pendulum-swingup"], "expert_1": []},
                    "group expert_1 is empty or not a list"),
    "unknown task": ({"expert_0": ["reach-v2", "walker-run"], "expert_1": ["walker-walk", "pendulum-swingup"]},
                     "group expert_0 has task 'walker-run', which stage 1 did not train on"),
    "wrong keys": ({"expert_0": ["reach-v2", "walker-walk", "pendulum-swingup"]}, "expected keys expert_0..expert_1"),
}


@pytest.mark.parametrize("defect", GROUP_FILE_DEFECTS, ids=str)
def test_bad_group_files(tmp_path, defect):
    content, message = GROUP_FILE_DEFECTS[defect]
    tasks = ["reach-v2", "walker-walk", "pendulum-swingup"]
    run, config = fake_run(tmp_path, tasks)
    write_json(run.groups("random", 2), content)
    with pytest.raises(ArtifactError) as raised:
        read_groups(run, config, tasks)
    assert str(raised.value) == f"{run.groups('random', 2)}: {message}"


def test_experts_made_with_another_config_or_backbone(tmp_path):
    tasks = ["reach-v2", "walker-walk"]
    run, config = fake_run(tmp_path, tasks)
    groups_file = run.groups("random", 2)
    write_json(groups_file, {"expert_0": ["reach-v2"], "expert_1": ["walker-walk"]})
    experts = [run.expert("random", 2, index) for index in range(2)]
    with pytest.raises(ArtifactError, match=r"expert_0.safetensors: expert 0 does not exist \(run the stage that"):
        check_experts(run, experts, groups_file, config)

    wide = parse_config("", [*TINY, "--embed_dim", "64"])
    for index, (expert, expert_config) in enumerate(zip(experts, [config, wide])):
        save_tensors(expert, {"weight": torch.zeros(1)})
        write_manifest(expert, "stage2_expert", recorded_config(expert_config, None), [tasks[index]],
                       [run.backbone, groups_file], run.root)
    with pytest.raises(ArtifactError, match="expert_1.safetensors: made with embed_dim=64, this run uses embed_dim=32"):
        check_experts(run, experts, groups_file, config)

    write_manifest(experts[1], "stage2_expert", recorded_config(config, None), [tasks[1]], [run.backbone, groups_file],
                   run.root)
    check_experts(run, experts, groups_file, config)  # consistent now
    # stage 3 with other router widths: the backbone and experts have no routers, so they still fit (they were
    # refused as "made with router_hidden=...", which only retraining stage 1 could answer)
    other_routers = parse_config("", [*TINY, "--tasks", ",".join(tasks), "--run_dir", str(run.root),
                                      "--router_hidden", "16,16,8"])
    assert other_routers.model_fields()["router_hidden"] != config.model_fields()["router_hidden"]
    assert stage1_tasks(run, other_routers) == tasks
    check_experts(run, experts, groups_file, other_routers)
    save_tensors(run.backbone, {"weight": torch.ones(1)})  # stage 1 was trained again since
    with pytest.raises(ArtifactError, match="expert_0.safetensors: made from another stage1/backbone.safetensors"):
        check_experts(run, experts, groups_file, config)


def test_more_groups_than_tasks(tmp_path):
    run, config = fake_run(tmp_path, ["reach-v2", "walker-walk"])
    config.group_num = 3
    with pytest.raises(ConfigError, match="--group_num 3 is more groups than the 2 stage-1 tasks"):
        group_tasks(config, "random")


# --------------------------------------------------------------------------------------------- CLI
def run_stage1(argv: list[str], capsys) -> str:
    """Stage 1 through its command-line entry point in this process; returns stderr after a user error."""
    with pytest.raises(SystemExit) as exited:
        run_cli(train_backbone, "stage 1", argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    nowhere = tmp_path / "nowhere"
    argv = [str(REPO / "stage1_backbone_train.py"), *TINY, "--tasks", "reach-v2", "--data_path", str(nowhere),
            "--run_dir", str(tmp_path / "run")]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {nowhere}: data root does not exist") and result.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, *argv, "--debug"], capture_output=True, text=True, env=environment,
                           timeout=120)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "m3dt.data.DataError" in debug.stderr


def test_timesteps_beyond_the_embedding_table_are_refused_at_start(tmp_path, capsys):
    """The issue's example: --max_timestep 59 on 60-step episodes was an IndexError in the first step. Every
    path (training batches, prompts, evaluation) uses timesteps up to horizon - 1: refused before loading."""
    make_task_data(tmp_path / "data", "reach-v2", episodes=4, steps=60, seed=0)
    err = run_stage1([*TINY, "--tasks", "reach-v2", "--max_timestep", "59", "--data_path", str(tmp_path / "data"),
                      "--run_dir", str(tmp_path / "run")], capsys)
    assert err == ("error: --max_timestep 59 is below the horizon of reach-v2 (500 steps): training, prompts and "
                   "evaluation use timesteps up to 499; use --max_timestep 500 or more (the reference uses 1000)\n")
    check_timesteps(500, ["reach-v2", "walker-walk", "ant-dir-2"])  # the longest horizon fits
    with pytest.raises(TaskError, match="--max_timestep 499 is below the horizon of walker-walk"):
        check_timesteps(499, ["ant-dir-2", "walker-walk"])
    check_timesteps(200, ["ant-dir-2", "cheetah-vel-8"])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "reach-v2,reach-v3"],
     "unknown task 'reach-v3': not in the task table mt160_tasks.json (tasks of your own: a task table, given to "
     "the training stages with --task_table FILE; README \"Your own tasks\")"),
    (["--tasks", "reach-v2", "--save_every", "0"], "--save_every must be at least 1, got 0"),
    (["--tasks", "reach-v2", "--n_head", "3"], "--embed_dim 32 must be a multiple of --n_head 3"),
    (["--tasks", "reach-v2", "--all", "--shard", "2/2"], "--shard must be i/n with 0 <= i < n, got '2/2'"),
    (["--tasks", "reach-v2", "--shard", "0/2"], "--shard goes with --all"),
], ids=["unknown task", "zero interval", "heads", "shard", "shard without --all"])
def test_bad_options_are_one_line(tmp_path, capsys, argv, message):
    err = run_stage1([*TINY, "--run_dir", str(tmp_path), *argv], capsys)
    assert err == f"error: {message}\n"


def test_an_abbreviated_option_is_not_taken_for_the_whole_one(tmp_path, capsys):
    """argparse took --max_iter for --max_iters (and --episode for --episodes): a misspelt option passed."""
    err = run_stage1([*TINY, "--run_dir", str(tmp_path), "--tasks", "reach-v2", "--max_iter", "5"], capsys)
    assert err == "error: unrecognized arguments: --max_iter 5 (--help lists the options)\n"


@pytest.mark.parametrize("name", [*POSITIVE, *NON_NEGATIVE])
def test_every_count_below_its_range_is_refused(name):
    """--max_iters 0 wrote an untrained backbone and said "stage 1: wrote"; every count, size, interval and
    step number of the config is checked (sizes at least 1, seeds and indices at least 0)."""
    minimum = 1 if name in POSITIVE else 0
    assert {field.name for field in dataclasses.fields(Config) if field.type in ("int", "int | None")} <= {
        *POSITIVE, *NON_NEGATIVE, "harmodt_eta_min", "harmodt_eta_max",  # the eta pair: checked as a pair
        "eval_episodes", "eval_max_steps"}  # checked by m3dt.evaluate as --episodes, --max_steps (test_cli_errors)
    with pytest.raises(ConfigError, match=f"^--{name} must be at least {minimum}, got {minimum - 1}$"):
        check_values(Config(**{name: minimum - 1}))
    check_values(Config(**{name: minimum, "n_head": 1}))  # width 1 needs one head


FLOAT_CASES = ([(name, -0.1, 0.0, "in [0, 1)") for name in UNIT_INTERVAL]
               + [(name, 1.0, 0.5, "in [0, 1)") for name in UNIT_INTERVAL]
               + [(name, 0.0, 1e-6, "above 0") for name in POSITIVE_FLOATS]
               + [(name, float("nan"), 1e-6, "above 0") for name in POSITIVE_FLOATS]
               + [(name, -1e-6, 0.0, "at least 0") for name in NON_NEGATIVE_FLOATS])


@pytest.mark.parametrize("name, bad, good, allowed", FLOAT_CASES)
def test_every_float_outside_its_range_is_refused(name, bad, good, allowed):
    """--dropout 1 gave NaN gradients; every float option has a range, checked at both sides of its edge."""
    assert {field.name for field in dataclasses.fields(Config) if field.type == "float"} == {
        *UNIT_INTERVAL, *POSITIVE_FLOATS, *NON_NEGATIVE_FLOATS}
    with pytest.raises(ConfigError, match=rf"^--{name} must be {re.escape(allowed)}, got {bad}$"):
        check_values(Config(**{name: bad}))
    check_values(Config(**{name: good}))


@pytest.mark.parametrize("text, message", [
    ("embed_dim: [32\n", "is not valid YAML"),
    ("embed_dim: wide\n", "embed_dim must be int, got 'wide'"),
    ("learning_rat: 0.1\n", "unknown option(s) learning_rat"),
    ("- 1\n", "must be a mapping of option: value"),
    ("max_iters: -5\n", ": --max_iters must be at least 1, got -5"),
], ids=["syntax", "type", "unknown", "not a mapping", "out of range"])
def test_bad_yaml_config_is_one_line(tmp_path, capsys, text, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    err = run_stage1(["--config", str(config_file), "--tasks", "reach-v2"], capsys)
    assert err.startswith(f"error: config file {config_file}") and message in err and err.count("\n") == 1


def test_a_flag_out_of_range_is_named_as_a_flag_beside_a_config_file(tmp_path, capsys):
    config_file = tmp_path / "good.yaml"
    config_file.write_text("max_iters: 5\n")
    err = run_stage1(["--config", str(config_file), "--tasks", "reach-v2", "--save_every", "0"], capsys)
    assert err == "error: --save_every must be at least 1, got 0\n"


def test_yaml_values_convert_like_flags_and_debug_from_yaml_counts(tmp_path):
    config_file = tmp_path / "config.yaml"
    # YAML 1.1 reads 1e-4 as text; the option converts it as it would the flag's text
    config_file.write_text("learning_rate: 1e-4\nmax_iters: null\nwandb: false\ndebug: true\n")
    config = parse_config("", ["--config", str(config_file)])
    assert config.learning_rate == 1e-4 and config.max_iters is None and config.debug is True
    with pytest.raises(DataError):  # debug: the error propagates with its traceback instead of one line
        run_cli(train_backbone, "stage 1", ["--config", str(config_file), "--tasks", "reach-v2",
                                             "--data_path", str(tmp_path / "nowhere"), "--run_dir", str(tmp_path)])


def test_help_shows_each_options_comment_and_default():
    assert field_comments().keys() == Config.__dataclass_fields__.keys()  # every option is documented
    text = " ".join(build_parser("stage").format_help().split())
    assert ("--top_k TOP_K 0: dense soft mixture over all experts (the paper); k > 0: the k most probable experts, "
            "weighted by their softmax probabilities (default: 0)") in text
    assert "--all, --no-all train every expert of the grouping in one process (default: False)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(tmp_path, capsys):
    err = run_stage1([*TINY, "--tasks", "reach-v2", "--device", "cuda", "--data_path", str(tmp_path),
                      "--run_dir", str(tmp_path)], capsys)
    assert err == "error: --device cuda: no CUDA device is visible (use --device cpu or auto)\n"


# ----------------------------------------------------------------------------------- training health
def tiny_run(data: Path, run_dir: Path, tasks: list[str], *extra: str) -> list[str]:
    return [*TINY, "--save_every", "5", "--log_every", "5", "--workers", "0", "--tasks", ",".join(tasks),
            "--data_path", str(data), "--run_dir", str(run_dir), *extra]


def test_non_finite_loss_from_the_data_stops_before_any_artifact(tmp_path, capsys):
    tasks = ["reach-v2", "door-close-v2"]
    for seed, task in enumerate(tasks):
        make_task_data(tmp_path / "data", task, episodes=4, steps=20, seed=seed)
    for episode in (tmp_path / "data" / "door-close-v2").glob("*.npz"):
        with np.load(episode) as archive:
            arrays = dict(archive)
        # finite in float32, but the squared error overflows to inf
        write_episode(episode, arrays["observations"], arrays["actions"] * 1e30, arrays["rewards"])
    err = run_stage1(tiny_run(tmp_path / "data", tmp_path / "run", tasks, "--max_iters", "10"), capsys)
    assert err.splitlines()[-1] == ("error: [stage1] non-finite loss at step 2 on task(s) door-close-v2; nothing was "
                                    "written for this window; no checkpoint was written yet")
    assert not (tmp_path / "run" / "stage1" / "backbone.safetensors").exists()
    assert not (tmp_path / "run" / "stage1" / "train_state.pt").exists()


@pytest.mark.parametrize("blocked, message", [
    ("run", "run directory is a file, not a folder"),
    ("run/stage1", "folder of stage1 is a file, not a folder"),
], ids=["run directory", "stage folder"])
def test_a_file_where_a_stage_writes_is_refused_before_training(small_data, tmp_path, capsys, blocked, message):
    """A user trial's --run_dir naming a file trained every step, then lost them to NotADirectoryError."""
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("a file of the user's\n")
    err = run_stage1(tiny_run(small_data, tmp_path / "run", ["reach-v2"], "--max_iters", "5"), capsys)
    assert err.splitlines()[-1] == f"error: {tmp_path / blocked}: {message}"
    assert (tmp_path / blocked).read_text() == "a file of the user's\n"  # untouched


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactError) as raised:
        make_folder(tmp_path / "file" / "out", "report folder (--out)")
    assert str(raised.value) == (f"{tmp_path / 'file' / 'out'}: report folder (--out) cannot be made: "
                                 f"{tmp_path / 'file'} is a file, not a folder")
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'file'}: run directory is a file, not a folder$"):
        RunDir(tmp_path / "file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder for a user other than root
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'out'}: report folder \\(--out\\) is not writable$"):
        make_folder(tmp_path / "out", "report folder (--out)")


def loss_with_nan_gradient_from(first_bad_call: int):
    """action_loss, plus from the given call on a term whose value is 0 and whose gradient is NaN."""
    calls = itertools.count(1)

    def loss(predicted, batch, groups=1):
        value = action_loss(predicted, batch, groups)
        if next(calls) >= first_bad_call:
            zero = predicted - predicted.detach()
            value = value + 0 * torch.sqrt((zero**2).sum())  # d sqrt(x)/dx at 0 is inf, and 0 * inf is NaN
        return value
    return loss


def test_nan_gradient_stops_with_step_task_and_last_good_checkpoint(small_data, tmp_path, monkeypatch):
    tasks = ["reach-v2", "walker-walk"]
    monkeypatch.setattr(m3dt.train, "action_loss", loss_with_nan_gradient_from(8))
    config = parse_config("", tiny_run(small_data, tmp_path, tasks, "--max_iters", "20"))
    stage1 = tmp_path / "stage1"
    with pytest.raises(TrainingError) as raised:
        train_backbone(config)
    assert str(raised.value) == ("[stage1] non-finite gradient at step 8 on task(s) walker-walk; nothing was written "
                                 f"for this window; last good checkpoint: {stage1 / 'train_state.pt'}")
    state = load_checkpoint(stage1 / "train_state.pt")
    assert state["step"] == 5 and all(torch.isfinite(weight).all() for weight in state["trainable"].values())
    assert [json.loads(line)["step"] for line in (stage1 / "metrics.jsonl").read_text().splitlines()] == [5]
    assert not (stage1 / "backbone.safetensors").exists()


def test_a_second_process_on_the_same_job_or_expert_is_refused_in_one_line(small_data, tmp_path):
    """Two processes on one run directory used to train side by side: the second truncated the first's
    metrics.jsonl and both wrote the same artifacts. A lock per training job and per expert stops the second
    (flock is per open file, so a second open in this process stands in for the other process)."""
    argv = tiny_run(small_data, tmp_path, ["reach-v2", "door-close-v2"])
    train_backbone(parse_config("", [*argv, "--max_iters", "5"]))
    metrics = (tmp_path / "stage1" / "metrics.jsonl").read_text()
    with open(tmp_path / "stage1" / "train.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ArtifactError, match=r"stage1/train.lock: stage1 is being run by another process, which "
                                                r"holds this lock; wait for it or stop it"):
            train_backbone(parse_config("", [*argv, "--max_iters", "10"]))
    assert (tmp_path / "stage1" / "metrics.jsonl").read_text() == metrics  # not truncated
    group_tasks(parse_config("", [*argv, "--group_num", "2"]), "random")
    experts = ["--grouping", "random", "--expert_num", "2", "--max_iters", "5"]
    lock = RunDir(tmp_path).expert("random", 2, 1).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:  # expert 1 trained by --expert_id 1 elsewhere: --all must not train it too
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ArtifactError, match=r"expert_1.lock: stage2 all is being run by another process"):
            train_experts(parse_config("", [*argv, *experts, "--all"]))
    train_experts(parse_config("", [*argv, *experts, "--all"]))  # free again


def test_checkpoint_of_another_config_or_truncated_is_not_resumed(small_data, tmp_path):
    argv = tiny_run(small_data, tmp_path, ["reach-v2"])
    train_backbone(parse_config("", [*argv, "--max_iters", "5"]))
    longer = [*argv, "--max_iters", "10"]
    # the finished backbone is not replaced unasked (it was: the checkpoint's check alone stopped a longer run)
    with pytest.raises(ArtifactError, match=r"backbone.safetensors: made with other settings: --learning_rate 0.001 -> "
                                            r"0.002; --restart replaces it \(what was trained on it would then be "
                                            r"refused\), or use another --run_dir$"):
        train_backbone(parse_config("", [*longer, "--learning_rate", "2e-3"]))
    backbone = tmp_path / "stage1" / "backbone.safetensors"
    backbone.unlink()  # without it, the checkpoint's own check
    with pytest.raises(ArtifactError, match=r"train_state.pt: checkpoint was made with other settings: --learning_rate "
                                            r"0.001 -> 0.002; rerun"):
        train_backbone(parse_config("", [*longer, "--learning_rate", "2e-3"]))
    with pytest.raises(ArtifactError, match=r"checkpoint was made with other settings: model \(--embed_dim 32 -> 64, "
                                            r"--router_hidden "):
        train_backbone(parse_config("", [*longer, "--embed_dim", "64"]))
    checkpoint = tmp_path / "stage1" / "train_state.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="train_state.pt: training checkpoint is truncated or not ours"):
        train_backbone(parse_config("", longer))
    train_backbone(parse_config("", [*longer, "--restart"]))  # --restart ignores the damaged checkpoint
    assert load_checkpoint(checkpoint)["step"] == 10

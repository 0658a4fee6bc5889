"""The MT160 data layout: loading, per-task statistics, and a batch sampler that runs where the data lives.

Layout (README "The MT160 pipeline"): `{data_root}/{task}/{i}.npz`, one episode per file, i = 0..n-1.
Files 0..n-3 are training data, the last two are the prompt trajectories. Keys: observations (T,39),
actions (T,8), rewards (T,), terminals or dones (T,). A task's episodes may also come from a Minari
dataset (m3dt/minari_io.py): `--data_path minari:NAMESPACE`, a Minari dataset folder at `{data_root}/{task}`,
or the task-table column `dataset`.

All training transitions of all tasks live in flat float32 arrays (stored once: observations, actions and
scaled return-to-go; timesteps are derived from the episode starts). Sampling a batch is index arithmetic
on those tensors, so the whole dataset can sit on the GPU (or in host memory, when it does not fit) and no
step builds samples in Python.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from numpy.lib.npyio import NpzFile
from tqdm import tqdm

from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM, MINARI_PREFIX, Task, get_task, task_table
from m3dt.workers import SPAWN, starting_workers

PAD_ACTION = -10.0  # training pads actions with -10 (states 0 before normalising, rtg 0, timestep 0)
STD_EPSILON = 1e-6
PROMPT_EPISODES = 2  # the last two episodes of a task are its prompt trajectories
MIN_EPISODES = PROMPT_EPISODES + 1
LOW_RETURN_PROMPT_ROWS = (0, 2)  # batch rows that use the lower-return prompt trajectory
ACTION_TOLERANCE = 1e-5  # rounding of actions mapped onto [-1, 1] in float32
# Each task being read costs about twice its size in memory (a 1M-transition task: ~400 MB) on top of the
# dataset; 4 tasks in flight keep MT160 (17.2 GiB) within a 24 GiB host.
MAX_LOADING_WORKERS = 4


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass
class Episode:
    """One trajectory of a task, zero-padded to the dataset's widths."""

    observations: np.ndarray  # (T, 39) float32
    actions: np.ndarray  # (T, 8) float32
    rewards: np.ndarray  # (T,) float32


def episode_files(task_dir: Path, max_episodes: int) -> list[Path]:
    """The episode files 0..n-1 of a task folder, checked to be contiguous, capped at `max_episodes`."""
    if not task_dir.is_dir():
        raise DataError(f"{task_dir}: task folder does not exist")
    # names, not Path objects: MT160 has up to 2,000 files a task, and this runs before every stage
    numbered = [name[:-4] for name in os.listdir(task_dir)
                if name.endswith(".npz") and name[:-4].isascii() and name[:-4].isdigit()]
    padded = [f"{stem}.npz" for stem in numbered if stem != str(int(stem))]
    if padded:  # 00.npz would be read as episode 0 and then looked for as 0.npz
        raise DataError(f"{task_dir}: episode files are named 0.npz, 1.npz, ... without leading zeros; found "
                        f"{', '.join(sorted(padded)[:3])}")
    indices = sorted(map(int, numbered))
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise DataError(f"{task_dir}: episode files must be 0.npz..N.npz without gaps; missing {missing[:5]}")
    count = min(len(indices), max_episodes)
    if count < MIN_EPISODES:
        others = sorted(set(os.listdir(task_dir)) - {f"{stem}.npz" for stem in numbered})
        named = (f" (episode files are named 0.npz, 1.npz, ...; found {', '.join(others[:3])}"
                 f"{', ...' if len(others) > 3 else ''})" if others else "")
        raise DataError(f"{task_dir}: {count} episode(s); a task needs at least {MIN_EPISODES} (2 are prompts)"
                        + named)
    return [task_dir / f"{index}.npz" for index in range(count)]


NPY_MAGIC = b"\x93NUMPY"  # a single .npy array (np.save), which np.load also opens


def open_npz(path: Path) -> NpzFile:
    """Open an episode archive; allow_pickle=False, so loading never executes code from the file."""
    with open(path, "rb") as file:
        start = file.read(6)
    if not start.startswith((b"PK", NPY_MAGIC)):  # numpy calls anything else pickled data and advises allow_pickle
        raise DataError(f"{path}: not an npz archive (a zip file of .npy arrays); it starts with {start!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy and zipfile raise many unrelated types for damaged files
        raise unreadable(path, error) from None
    if not isinstance(archive, NpzFile):
        raise DataError(f"{path}: holds a single array; expected an npz archive of named arrays")
    return archive


def unreadable(path: Path, error: Exception) -> DataError:
    """The DataError (returned, not raised) for an episode file that numpy cannot read, naming the file and `error`."""
    return DataError(f"{path}: not a readable npz file ({type(error).__name__}: {error})")


def _check_array(path: Path, key: str, array: np.ndarray, width: int | None, length: int | None) -> None:
    if not isinstance(array, np.ndarray):  # an archive member without the .npy suffix reads as raw bytes
        raise DataError(f"{path}: '{key}' is not a .npy array")
    if array.dtype.kind not in "biuf":  # bool, integer or float; complex or text would not cast meaningfully
        raise DataError(f"{path}: '{key}' has dtype {array.dtype}, expected a real numeric array")
    expected_ndim = 1 if width is None else 2
    if array.ndim != expected_ndim or (width is not None and array.shape[1] != width):
        shape = "(T,)" if width is None else f"(T, {width})"
        raise DataError(f"{path}: '{key}' has shape {array.shape}, expected {shape}")
    if length is not None and array.shape[0] != length:
        raise DataError(f"{path}: '{key}' has {array.shape[0]} steps but observations have {length}")


def finite_float32(path: Path | str, key: str, array: np.ndarray) -> np.ndarray:
    """The array as float32, checked after the cast, since float64 values beyond float32's range become inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(np.float32, copy=False)
    if not np.isfinite(converted).all():
        raise DataError(f"{path}: '{key}' contains NaN, inf or values beyond float32's range")
    return converted


def load_episode(path: Path) -> Episode:
    """Read and validate one episode file."""
    with open_npz(path) as archive:
        try:
            arrays = {key: archive[key] for key in archive.files}
        except Exception as error:  # a member that is not a valid .npy (truncated, pickled, bad header)
            raise unreadable(path, error) from None
    for key in ("observations", "actions", "rewards"):
        if key not in arrays:
            raise DataError(f"{path}: missing key '{key}' (has: {', '.join(sorted(arrays)) or 'none'})")
    if "terminals" not in arrays and "dones" not in arrays:
        raise DataError(f"{path}: missing key 'terminals' or 'dones'")
    observations = arrays["observations"]
    _check_array(path, "observations", observations, MAX_OBS_DIM, None)
    length = observations.shape[0]
    if length == 0:
        raise DataError(f"{path}: episode has no steps")
    _check_array(path, "actions", arrays["actions"], MAX_ACT_DIM, length)
    _check_array(path, "rewards", arrays["rewards"], None, length)
    done_key = "terminals" if "terminals" in arrays else "dones"
    _check_array(path, done_key, arrays[done_key], None, length)
    return Episode(
        observations=finite_float32(path, "observations", observations),
        actions=finite_float32(path, "actions", arrays["actions"]),
        rewards=finite_float32(path, "rewards", arrays["rewards"]),
    )


def mean_and_std(array: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and (population) std in float64, two passes over row chunks: exact like numpy's, without
    a float64 copy of a whole task (1M x 39 states would be 300 MB)."""
    count = array.shape[0]
    total = sum(array[start : start + chunk].sum(axis=0, dtype=np.float64) for start in range(0, count, chunk))
    mean = total / count
    squares = sum(((array[start : start + chunk] - mean) ** 2).sum(axis=0) for start in range(0, count, chunk))
    return mean, np.sqrt(squares / count)


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sums: rtg[t] = sum of rewards[t:]."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


def episode_length(path: Path) -> int:
    """Steps of an episode file, read from the header of its rewards array only."""
    with open_npz(path) as archive:
        if "rewards" not in archive.files:
            raise DataError(f"{path}: missing key 'rewards' (has: {', '.join(sorted(archive.files)) or 'none'})")
        try:
            with archive.zip.open("rewards.npy") as member:
                major, _ = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(member)
        except Exception as error:  # no rewards.npy member, or a damaged one
            raise unreadable(path, error) from None
    if len(shape) != 1:
        raise DataError(f"{path}: 'rewards' has shape {shape}, expected (T,)")
    return int(shape[0])


@dataclass
class Prompts:
    """The prompt window of each task's two prompt trajectories: index 0 lower return, 1 higher return."""

    states: torch.Tensor  # (tasks, 2, P, 39) normalised with the prompt trajectories' own statistics
    actions: torch.Tensor  # (tasks, 2, P, 8)
    returns_to_go: torch.Tensor  # (tasks, 2, P, 1) scaled
    timesteps: torch.Tensor  # (tasks, 2, P) long
    mask: torch.Tensor  # (tasks, 2, P) float, 1 on real steps

    @classmethod
    def from_arrays(cls, prompts: dict[str, np.ndarray], device: torch.device) -> Prompts:
        """From the stacked numpy prompts of TaskDataset / read_statistics."""
        return cls(
            states=torch.from_numpy(prompts["states"]).float().to(device),
            actions=torch.from_numpy(prompts["actions"]).float().to(device),
            returns_to_go=torch.from_numpy(prompts["returns_to_go"]).float().unsqueeze(-1).to(device),
            timesteps=torch.from_numpy(prompts["timesteps"]).long().to(device),
            mask=torch.ones(prompts["timesteps"].shape, device=device),
        )


@dataclass
class Batch:
    """Model inputs; every tensor has a leading batch dimension, prompts included."""

    states: torch.Tensor  # (B, K, 39) normalised
    actions: torch.Tensor  # (B, K, 8)
    returns_to_go: torch.Tensor  # (B, K, 1)
    timesteps: torch.Tensor  # (B, K) long
    mask: torch.Tensor  # (B, K) float
    prompt_states: torch.Tensor  # (B, P, 39)
    prompt_actions: torch.Tensor  # (B, P, 8)
    prompt_returns_to_go: torch.Tensor  # (B, P, 1)
    prompt_timesteps: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    action_mask: torch.Tensor  # (B, 1, 8): 1 on the task's true action dims
    task_index: torch.Tensor | None = None  # (B,) long: each row's task (in the run's task order), where known

    def apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `function` applied to every tensor (an absent task_index stays absent)."""
        return Batch(**{name: None if tensor is None else function(tensor) for name, tensor in vars(self).items()})

    def rows(self, index: slice | torch.Tensor) -> Batch:
        """The rows `index` of every tensor."""
        return self.apply(lambda tensor: tensor[index])


def check_prompt_length(episode: Episode, length: int, where: Path | str) -> None:
    """DataError naming `where` unless the prompt trajectory `episode` holds the `length`-step window that ends
    one step before its end (length + 1 steps)."""
    steps = episode.rewards.shape[0]
    if steps < length + 1:
        raise DataError(f"{where}: {steps} steps; a prompt trajectory needs {length + 1} (the {length}-step prompt "
                        "window ends one step before its end)")


def prompt_window(episode: Episode, task: Task, length: int, where: Path | str) -> dict[str, np.ndarray]:
    """The `length`-step window that ends one step before the end: steps T-length-1 .. T-2."""
    check_prompt_length(episode, length, where)
    start = episode.rewards.shape[0] - length - 1
    window = slice(start, start + length)
    return {
        "states": episode.observations[window],
        "actions": episode.actions[window],
        "returns_to_go": returns_to_go(episode.rewards)[window] / task.rtg_scale,
        "timesteps": np.minimum(np.arange(start, start + length), task.horizon - 1),
    }


def load_prompts(task: Task, source: EpisodeSource, length: int) -> dict[str, np.ndarray]:
    """Both prompt trajectories of a task, ordered (lower return, higher return), states normalised with
    the statistics of the two prompt trajectories only (as the reference does)."""
    episodes = source.load()
    order = np.argsort([episode.rewards.sum() for episode in episodes], kind="stable")
    all_states = np.concatenate([episode.observations for episode in episodes])
    mean, std = all_states.mean(axis=0), all_states.std(axis=0) + STD_EPSILON
    windows = [prompt_window(episodes[i], task, length, source.location(i)) for i in order]
    stacked = {key: np.stack([window[key] for window in windows]) for key in windows[0]}
    stacked["states"] = (stacked["states"] - mean) / std
    return stacked


@dataclass
class TaskStatistics:
    """What evaluation needs from one task's data: its state statistics and both prompt windows."""

    state_mean: np.ndarray  # (39,) over all training states
    state_std: np.ndarray  # (39,), plus STD_EPSILON
    prompts: dict[str, np.ndarray]  # load_prompts: (2, P, ...) each, lower return first


@dataclass
class TaskPart:
    """One task's training data, read by a worker and copied into the flat arrays."""

    observations: np.ndarray
    actions: np.ndarray
    returns_to_go: np.ndarray  # scaled
    episode_lengths: list[int]
    statistics: TaskStatistics


@dataclass(frozen=True)
class NpzEpisodes:
    """Episode files of one task in the MT160 layout (picklable: loading workers get it)."""

    files: tuple[Path, ...]

    @property
    def where(self) -> str:
        """The task folder (that of the first file), for messages."""
        return str(self.files[0].parent)

    def __len__(self) -> int:
        return len(self.files)

    def part(self, start: int, stop: int | None = None) -> NpzEpisodes:
        """The episodes start..stop-1 (slice semantics: negative positions count from the end)."""
        return NpzEpisodes(self.files[start:stop])

    def location(self, position: int) -> Path:
        """The file of the episode at `position`, for messages."""
        return self.files[position]

    def lengths(self) -> list[int]:
        """Steps per episode, from each file's rewards header only; DataError for an unreadable file."""
        return [episode_length(path) for path in self.files]

    def load(self) -> list[Episode]:
        """Every episode, read and validated (`load_episode`); DataError naming the first bad file."""
        return [load_episode(path) for path in self.files]

    def stored_files(self) -> list[Path]:
        """The episode files themselves."""
        return list(self.files)


class EpisodeSource(Protocol):
    """What the loader reads one task's episodes through: NpzEpisodes (the MT160 layout) or
    m3dt.minari_io.MinariEpisodes (a Minari dataset); picklable, so that loading workers get it."""

    @property
    def where(self) -> str:
        """A folder or dataset id, for messages."""

    def __len__(self) -> int: ...

    def part(self, start: int, stop: int | None = None) -> EpisodeSource:
        """The episodes start..stop-1, as a source of the same kind."""

    def location(self, position: int) -> Path | str:
        """One episode (its file, or dataset and index), for messages."""

    def lengths(self) -> list[int]:
        """Steps per episode, without loading the arrays."""

    def load(self) -> list[Episode]:
        """Every episode, read and validated: observations (T, 39), actions (T, 8), rewards (T,), float32."""

    def stored_files(self) -> list[Path]:
        """The files behind it (the data fingerprint)."""


def folder_episodes(folder: Path, task: Task, max_episodes: int) -> EpisodeSource:
    """The episodes of a task folder: a Minari dataset's, else the npz episode files 0.npz, 1.npz, ..."""
    from m3dt import minari_io

    if minari_io.is_minari_folder(folder):
        return minari_io.minari_episodes(str(folder), task, max_episodes)
    return NpzEpisodes(tuple(episode_files(folder, max_episodes)))


def task_source(data_path: str, task: Task, max_episodes: int) -> EpisodeSource:
    """Where a task's first `max_episodes` episodes are: the task table's `dataset` column if it has one (a
    folder of npz episodes or of a Minari dataset, or `minari:ID`), else `minari:NAMESPACE/{task}` for a data
    path `minari:NAMESPACE`, else the folder `{data_path}/{task}` of npz episode files or of a Minari dataset."""
    from m3dt import minari_io

    if task.dataset is not None and not task.dataset.startswith(MINARI_PREFIX):
        folder = Path(task.dataset)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder (the dataset column of task '{task.name}' in its task table)")
        source = folder_episodes(folder, task, max_episodes)
    elif task.dataset is not None or data_path.startswith(MINARI_PREFIX):
        source = minari_io.minari_episodes(task.dataset or f"{data_path}/{task.name}", task, max_episodes)
    else:
        root = Path(data_path)
        if root.exists() and not root.is_dir():
            raise DataError(f"{root}: data root is a file; give the folder that holds a folder per task")
        if not root.is_dir():
            raise DataError(f"{root}: data root does not exist (download MT160 or run python -m m3dt.collect)")
        source = folder_episodes(root / task.name, task, max_episodes)
    if len(source) < MIN_EPISODES:
        raise DataError(f"{source.where}: {len(source)} episode(s); a task needs at least {MIN_EPISODES} "
                        "(2 are prompts)")
    return source


def read_lengths(source: EpisodeSource) -> list[int]:
    """`source.lengths()`, as a picklable function for the loading workers' pool."""
    return source.lengths()


def read_task(task: Task, source: EpisodeSource, prompt_length: int) -> TaskPart:
    """Read one task's training episodes and prompts; the last PROMPT_EPISODES episodes are the prompts.
    A task of one's own (README "Your own tasks") is checked further (check_own_task_data)."""
    episodes = source.part(0, -PROMPT_EPISODES).load()
    observations = np.concatenate([episode.observations for episode in episodes])
    actions = np.concatenate([episode.actions for episode in episodes])
    if task.name not in task_table():
        check_own_task_data(task, source.where, observations, actions,
                            max(episode.rewards.shape[0] for episode in episodes))
    mean, std = mean_and_std(observations)
    return TaskPart(
        observations=observations,
        actions=actions,
        returns_to_go=np.concatenate([returns_to_go(episode.rewards) for episode in episodes]) / task.rtg_scale,
        episode_lengths=[episode.rewards.shape[0] for episode in episodes],
        statistics=TaskStatistics(mean, std + STD_EPSILON,
                                  load_prompts(task, source.part(-PROMPT_EPISODES), prompt_length)),
    )


def check_own_task_data(task: Task, where: str, observations: np.ndarray, actions: np.ndarray,
                        longest_episode: int) -> None:
    """DataError unless a user's task's data hold zeros beyond its table's obs_dim and act_dim (a width in the
    table below the data's would train on values evaluation never gives the model), actions within [-1, 1]
    (the action head's tanh range, which the env's own bounds are mapped onto: raw actions of an env acting in
    [-3, 3] would train the model on targets it cannot reach and act wrongly) and episodes no longer than the
    table's horizon (a horizon below the data's would give every later step the same timestep, and cut the
    evaluation's episodes short)."""
    if longest_episode > task.horizon:
        raise DataError(f"{where}: an episode of {longest_episode} steps, longer than the task table's horizon "
                        f"{task.horizon} of {task.name}: give the horizon its episodes have")
    for what, values, width in (("observations", observations, task.obs_dim), ("actions", actions, task.act_dim)):
        beyond = np.flatnonzero(np.abs(values[:, width:]).max(axis=0, initial=0.0) > 0)
        if len(beyond):
            raise DataError(f"{where}: {what} hold non-zero values in dim {width + beyond[0]}, beyond the task "
                            f"table's {'obs_dim' if what == 'observations' else 'act_dim'} {width} of {task.name}: "
                            "give its native width there, and zero-pad the data")
    largest = float(np.abs(actions).max(initial=0.0))
    if largest > 1.0 + ACTION_TOLERANCE:
        raise DataError(f"{where}: actions reach {largest:.4g} in absolute value, outside [-1, 1], the range the "
                        f"model acts in: map {task.name}'s actions from the env's bounds onto [-1, 1] "
                        "(README \"Your own tasks\")")


def stack_statistics(statistics: list[TaskStatistics]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per-task statistics stacked in task order: state mean and std (tasks, 39) float32, and the prompts
    (tasks, 2, P, ...)."""
    prompts = {key: np.stack([task.prompts[key] for task in statistics]) for key in statistics[0].prompts}
    return (np.stack([task.state_mean for task in statistics]).astype(np.float32),
            np.stack([task.state_std for task in statistics]).astype(np.float32), prompts)


def files_fingerprint(data_root: str | Path, task_names: list[str], max_episodes: int) -> dict[str, str]:
    """Per task, the sha256 of the names and byte sizes of the files a run reads (episode files, or a Minari dataset's): cheap (no file is
    opened), so a stage compares it before loading. Files of the same sizes with other contents are told
    apart after loading, by `statistics_fingerprints`."""
    fingerprints = {}
    for name in task_names:
        source = task_source(str(data_root), get_task(name), max_episodes)
        digest = hashlib.sha256()
        for path in source.stored_files():
            digest.update(f"{path.name} {path.stat().st_size}\n".encode())
        digest.update(f"{len(source)} episodes\n".encode())  # a Minari dataset's files hold all of its episodes
        fingerprints[name] = digest.hexdigest()
    return fingerprints


def statistics_fingerprints(task_names: list[str], state_mean: np.ndarray, state_std: np.ndarray,
                            prompts: dict[str, np.ndarray]) -> dict[str, str]:
    """Per task, the sha256 of what training and evaluation take from its data besides the batches: the
    state mean and std and both prompt windows (stack_statistics' arrays; the same data gives the same bits)."""
    fingerprints = {}
    for index, name in enumerate(task_names):
        digest = hashlib.sha256()
        for array in (state_mean[index], state_std[index], *(prompts[key][index] for key in sorted(prompts))):
            digest.update(np.ascontiguousarray(array).tobytes())
        fingerprints[name] = digest.hexdigest()
    return fingerprints


def read_statistics(data_root: str | Path, task_names: list[str], max_episodes: int = 2000, prompt_length: int = 5,
                    workers: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The per-task statistics that TaskDataset computes (stack_statistics' result), without keeping the
    transitions: each worker holds one task at a time, and only its statistics come back."""
    tasks = [get_task(name) for name in task_names]
    sources = [task_source(str(data_root), task, max_episodes) for task in tasks]
    workers = min(workers, MAX_LOADING_WORKERS, len(tasks))
    with worker_pool(workers) as pool:
        parts = bounded_map(pool, partial(read_statistics_star, prompt_length=prompt_length), list(zip(tasks, sources)),
                            max(1, workers))
        statistics = list(tqdm(parts, total=len(tasks), desc="task statistics", unit="task", dynamic_ncols=True))
    return stack_statistics(statistics)


@contextmanager
def worker_pool(workers: int) -> Iterator:
    """Something with `map`: a process pool, or plain in-process iteration for workers <= 1."""
    if workers <= 1:
        yield SimpleNamespace(map=lambda function, items: list(map(function, items)))
        return
    with starting_workers():
        pool = SPAWN.Pool(workers)
    with pool:
        yield pool


class TaskDataset:
    """Every task's training transitions in flat arrays, plus the statistics and prompts of each task.

    Flat layout: task t owns rows [task_offsets[t], task_offsets[t] + task_sizes[t]); episodes are
    contiguous within it and listed in `episode_starts` (global, sorted, with a final sentinel).
    Tasks are read in `workers` processes; the flat arrays are allocated once at their final size (a first
    pass reads only the episode lengths), so the peak memory is the dataset plus the tasks in flight.
    """

    def __init__(self, data_root: str | Path, task_names: list[str], max_episodes: int = 2000, prompt_length: int = 5,
                 workers: int = 0, lengths: list[list[int]] | None = None):
        """`lengths`: the training episodes' lengths per task when already read (episode_lengths)."""
        self.tasks = [get_task(name) for name in task_names]
        self.prompt_length = prompt_length
        sources = [task_source(str(data_root), task, max_episodes) for task in self.tasks]
        workers = min(workers, MAX_LOADING_WORKERS, len(self.tasks))
        with worker_pool(workers) as pool:
            if lengths is None:
                lengths = pool.map(read_lengths, [source.part(0, -PROMPT_EPISODES) for source in sources])
            total = sum(map(sum, lengths))
            self.observations = np.empty((total, MAX_OBS_DIM), dtype=np.float32)
            self.actions = np.empty((total, MAX_ACT_DIM), dtype=np.float32)
            self.returns_to_go = np.empty(total, dtype=np.float32)
            parts = bounded_map(pool, partial(read_task_star, prompt_length=prompt_length), list(zip(self.tasks, sources)),
                                max(1, workers))
            episode_starts, task_offsets, statistics = [], [], []
            row = 0
            for source, expected, part in zip(sources, lengths, parts):
                if part.episode_lengths != expected:
                    raise DataError(f"{source.where}: episode arrays disagree on their lengths")
                rows = slice(row, row + len(part.returns_to_go))
                self.observations[rows], self.actions[rows], self.returns_to_go[rows] = (
                    part.observations, part.actions, part.returns_to_go)
                task_offsets.append(row)
                episode_starts.extend(row + np.cumsum([0, *part.episode_lengths[:-1]]))
                statistics.append(part.statistics)
                row = rows.stop
        episode_starts.append(row)

        self.episode_starts = np.asarray(episode_starts, dtype=np.int64)
        self.task_offsets = np.asarray(task_offsets, dtype=np.int64)
        self.task_sizes = np.asarray([sum(task_lengths) for task_lengths in lengths], dtype=np.int64)
        self.state_mean, self.state_std, self.prompts = stack_statistics(statistics)

    @property
    def task_names(self) -> list[str]:
        """The tasks' names, in dataset order."""
        return [task.name for task in self.tasks]

    def statistics_fingerprints(self) -> dict[str, str]:
        """Per task, the sha256 of its state statistics and prompt windows (the module's `statistics_fingerprints`)."""
        return statistics_fingerprints(self.task_names, self.state_mean, self.state_std, self.prompts)

    def nbytes(self) -> int:
        """Bytes of the flat arrays (observations, actions, return-to-go, episode starts); prompts and statistics not
        counted."""
        return self.observations.nbytes + self.actions.nbytes + self.returns_to_go.nbytes + self.episode_starts.nbytes


def episode_lengths(data_root: str | Path, task_names: list[str], max_episodes: int = 2000,
                    workers: int = 0) -> list[list[int]]:
    """The steps of every training episode of each task, from the files' headers only: what a stage needs
    to plan its memory before it reads the data (then pass them to TaskDataset, which reads them otherwise)."""
    sources = [task_source(str(data_root), get_task(name), max_episodes) for name in task_names]
    with worker_pool(min(workers, MAX_LOADING_WORKERS, len(task_names))) as pool:
        return pool.map(read_lengths, [source.part(0, -PROMPT_EPISODES) for source in sources])


def bounded_map(pool: multiprocessing.pool.Pool, function: Callable, items: list, in_flight: int) -> Iterator:
    """pool.map over `in_flight` items at a time, so that at most that many tasks' arrays wait in memory."""
    for start in range(0, len(items), in_flight):
        yield from pool.map(function, items[start : start + in_flight])


def read_task_star(arguments: tuple[Task, EpisodeSource], prompt_length: int) -> TaskPart:
    """`read_task` of one (task, source) pair, as `bounded_map` passes its items."""
    return read_task(*arguments, prompt_length)


def read_statistics_star(arguments: tuple[Task, EpisodeSource], prompt_length: int) -> TaskStatistics:
    """Only the statistics of `read_task` of one (task, source) pair, so that a worker sends back no transitions."""
    return read_task(*arguments, prompt_length).statistics


class DeviceSampler:
    """Draws training batches with tensor ops on `data_device`, where the dataset is copied once, and hands
    them to the training `device`.

    For one task, a segment starts at a transition drawn uniformly over the task's training transitions
    (the same distribution as the reference's "episode in proportion to its length, start uniform within
    it"), runs up to K steps without crossing its episode's end, and is left-padded to K.

    `data_device` is the training device (the default) or the CPU (`--data_device cpu`, or `auto` when
    the dataset does not fit the GPU): batches are then gathered in host memory and copied to the GPU from
    pinned memory without waiting (the host prepares the next batch while the GPU trains on this one).
    The random draws come from CPU generators in both placements and the rest is exact arithmetic
    (gathers, and one IEEE subtraction and division per state value), so both placements give the same
    batches bit for bit.
    """

    def __init__(self, dataset: TaskDataset, context_length: int, batch_size: int, device: torch.device,
                 seeds: list[int], data_device: torch.device | None = None):
        self.device = device
        self.data_device = data_device = device if data_device is None else data_device
        self.context_length = context_length
        self.batch_size = batch_size
        self.observations = torch.from_numpy(dataset.observations).to(data_device)
        self.actions = torch.from_numpy(dataset.actions).to(data_device)
        self.returns_to_go = torch.from_numpy(dataset.returns_to_go).to(data_device)
        self.episode_starts = torch.from_numpy(dataset.episode_starts).to(data_device)
        self.task_offsets = torch.from_numpy(dataset.task_offsets).to(data_device)
        self.task_sizes = torch.from_numpy(dataset.task_sizes).to(data_device)
        self.state_mean = torch.from_numpy(dataset.state_mean).to(data_device)
        self.state_std = torch.from_numpy(dataset.state_std).to(data_device)
        self.horizons = torch.tensor([task.horizon for task in dataset.tasks], device=data_device)
        act_dims = torch.tensor([task.act_dim for task in dataset.tasks], device=data_device)
        self.action_masks = (torch.arange(MAX_ACT_DIM, device=data_device) < act_dims[:, None]).float()
        self.prompts = Prompts.from_arrays(dataset.prompts, data_device)
        # Which prompt trajectory each row of a task's batch uses: rows 0 and 2 the lower-return one.
        prompt_choice = torch.ones(batch_size, dtype=torch.long)
        prompt_choice[[row for row in LOW_RETURN_PROMPT_ROWS if row < batch_size]] = 0
        self.prompt_choice = prompt_choice.to(data_device)
        # One random stream per row group: `--all` expert training draws group g's rows from stream g,
        # exactly as a separate run of expert g would. CPU generators whatever the device (a few numbers
        # per step), so that the draws do not depend on where the data lives.
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def sample(self, task_indices: torch.Tensor, generators: list[torch.Generator] | None = None) -> Batch:
        """One batch of `batch_size` segments for each task in `task_indices` (shape (G,), on data_device
        to avoid a copy), concatenated task by task into G * batch_size rows, on `device`. `generators` (CPU
        generators, one per row group) instead of the sampler's own streams draws a batch that leaves the
        training streams untouched (a diagnostic's batches)."""
        generators = self.generators if generators is None else generators
        if len(task_indices) != len(generators):
            raise ValueError(f"sampler has {len(generators)} streams, asked for {len(task_indices)} row groups")
        rows_task = task_indices.to(self.data_device).repeat_interleave(self.batch_size)  # (R,)
        uniform = to_device(torch.cat([torch.rand(self.batch_size, generator=generator) for generator in generators]),
                            self.data_device)
        starts = self.task_offsets[rows_task] + (uniform * self.task_sizes[rows_task]).long()
        episode = torch.searchsorted(self.episode_starts, starts, right=True) - 1
        episode_start, episode_end = self.episode_starts[episode], self.episode_starts[episode + 1]
        valid_steps = torch.clamp(episode_end - starts, max=self.context_length)  # (R,)
        padding = self.context_length - valid_steps
        positions = torch.arange(self.context_length, device=self.data_device)
        source = starts[:, None] + positions[None, :] - padding[:, None]  # (R, K), left-padded
        mask = positions[None, :] >= padding[:, None]
        source = torch.where(mask, source, starts[:, None])  # any valid row index; masked out below

        mask_float = mask.float()
        states = self.observations[source] * mask_float[..., None]  # padded states are 0 before normalising
        states = (states - self.state_mean[rows_task, None]) / self.state_std[rows_task, None]
        actions = torch.where(mask[..., None], self.actions[source], torch.full_like(self.actions[source], PAD_ACTION))
        returns = (self.returns_to_go[source] * mask_float)[..., None]
        timesteps = torch.minimum(source - episode_start[:, None], self.horizons[rows_task, None] - 1)
        timesteps = timesteps * mask.long()

        choice = self.prompt_choice.repeat(task_indices.shape[0])
        prompts = self.prompts
        batch = Batch(
            states=states,
            actions=actions,
            returns_to_go=returns,
            timesteps=timesteps,
            mask=mask_float,
            prompt_states=prompts.states[rows_task, choice],
            prompt_actions=prompts.actions[rows_task, choice],
            prompt_returns_to_go=prompts.returns_to_go[rows_task, choice],
            prompt_timesteps=prompts.timesteps[rows_task, choice],
            prompt_mask=prompts.mask[rows_task, choice],
            action_mask=self.action_masks[rows_task, None],
            task_index=rows_task,
        )
        if self.data_device == self.device:
            return batch
        return batch.apply(lambda tensor: to_device(tensor, self.device))

    def eval_prompt(self, task_index: int) -> dict[str, torch.Tensor]:
        """The higher-return prompt of a task, as evaluation uses it (each tensor without batch dim)."""
        prompts = self.prompts
        return {
            "states": prompts.states[task_index, 1],
            "actions": prompts.actions[task_index, 1],
            "returns_to_go": prompts.returns_to_go[task_index, 1],
            "timesteps": prompts.timesteps[task_index, 1],
            "mask": prompts.mask[task_index, 1],
        }


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from host to GPU through pinned memory, without waiting for the copy (PyTorch's
    pinned-memory cache keeps the buffer until the copy is done)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

"""Minari datasets (Farama's format for offline RL data) in and out of the MT160 layout.

In: a task's data may be a Minari dataset instead of a folder of npz episodes (README "Making datasets"):
`--data_path minari:NAMESPACE` reads task t from the local dataset NAMESPACE/t (its highest version), a
folder `{data_path}/{t}` that holds a Minari dataset is read as one, and a task-table row's `dataset`
column ("minari:ID" or a folder) names one task's dataset. Local means Minari's datasets root
(MINARI_DATASETS_PATH, default ~/.minari/datasets): nothing is downloaded here (`minari download ID` does).
Episodes are read as the npz loader reads files: observations (T, obs_dim) of the T+1 Minari stores (the
final one is dropped) and actions (T, act_dim), zero-padded to 39 and 8; rewards; the last two episodes
are the task's prompts. A Box action space with bounds other than [-1, 1] is mapped linearly onto
[-1, 1], where the model acts (a gymnasium task's env maps actions back, m3dt/envs/gymnasium_env.py).

Out: `python -m m3dt.collect ... --format minari` writes each collected task as the Minari dataset
`{namespace}/{task}-v0` (write_task_dataset): its episodes with native observation and action widths,
spaces, the gymnasium env spec when the task has one, Minari's reference scores where the protocol's
score is linear in the return, and this project's task row, collection settings and expert scores under
the metadata key "m3dt".
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from m3dt.data import ACTION_TOLERANCE, DataError, Episode, finite_float32
from m3dt.tasks import MAX_ACT_DIM, MAX_OBS_DIM, MINARI_PREFIX, Task

if TYPE_CHECKING:  # optional packages, imported where they are used
    import gymnasium
    import minari

# Minari's ref_min_score / ref_max_score where the protocol's score is 100 (return - min) / (max - min), before
# clipping (ant-dir and cheetah-vel clip to [0, 100]); Meta-World's score counts successes, not returns.
REFERENCE_RETURNS = {"dmc": (0.0, 1000.0), "ant_dir": (0.0, 500.0), "cheetah_vel": (-100.0, -30.0)}


def is_minari_folder(folder: Path) -> bool:
    """True for a Minari dataset folder (the one holding data/) or its data/ folder."""
    return (folder / "data" / "metadata.json").is_file() or (folder / "metadata.json").is_file()


def data_folder(folder: Path) -> Path:
    """The data/ folder of a Minari dataset folder (`folder` itself when it is already the data/ folder)."""
    return folder / "data" if (folder / "data" / "metadata.json").is_file() else folder


def local_dataset_folder(dataset_id: str) -> Path:
    """The folder of a local Minari dataset: the id as given, else its highest local version (task names
    such as 'reach-v2' end like a version, so the id is tried as it is first)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    folder = get_dataset_path(dataset_id)
    if is_minari_folder(folder):
        return folder
    parent, _, name = dataset_id.rpartition("/")
    versions = {}
    if get_dataset_path(parent).is_dir():
        for path in get_dataset_path(parent).iterdir():
            match = re.fullmatch(re.escape(name) + r"-v(\d+)", path.name)
            if match and is_minari_folder(path):
                versions[int(match.group(1))] = path
    if not versions:
        raise DataError(f"Minari dataset {dataset_id} not found under {get_dataset_path()} (MINARI_DATASETS_PATH); "
                        f"nothing is downloaded here: run `minari download {dataset_id}` first")
    return versions[max(versions)]


@dataclass(frozen=True)
class MinariEpisodes:
    """Some episodes of a Minari dataset, read as one task's episodes (picklable: loading workers get it)."""

    data_path: Path  # the dataset's data/ folder
    indices: tuple[int, ...]
    task: Task

    @property
    def where(self) -> str:
        """The dataset folder (the one holding data/), for messages."""
        return str(self.data_path.parent)

    def __len__(self) -> int:
        return len(self.indices)

    def part(self, start: int, stop: int | None = None) -> MinariEpisodes:
        """The episodes start..stop-1 of these (slice semantics: negative positions count from the end)."""
        return MinariEpisodes(self.data_path, self.indices[start:stop], self.task)

    def location(self, position: int) -> str:
        """The dataset folder and the dataset's index of the episode at `position`, for messages."""
        return f"{self.where} episode {self.indices[position]}"

    def stored_files(self) -> list[Path]:
        """Every file of the data/ folder (they hold all of the dataset's episodes, not only these), sorted."""
        return sorted(path for path in self.data_path.iterdir() if path.is_file())

    def lengths(self) -> list[int]:
        """From the episodes' metadata (both Minari storages record total_steps), without reading them."""
        with readable(self.where):
            metadata = list(open_dataset(self.data_path).storage.get_episode_metadata(self.indices))
        return [int(episode["total_steps"]) for episode in metadata]

    def load(self) -> list[Episode]:
        """The episodes as the npz loader gives them: observations without the final one, zero-padded to (T, 39),
        actions mapped onto [-1, 1] and zero-padded to (T, 8), rewards (T,), all float32. Raises DataError when
        the spaces' widths are not the task's, or an episode's arrays are malformed or not finite."""
        dataset = open_dataset(self.data_path)
        observation_width = space_width(dataset.observation_space, "observation", self.where)
        action_width = space_width(dataset.action_space, "action", self.where)
        if (observation_width, action_width) != (self.task.obs_dim, self.task.act_dim):
            raise DataError(f"{self.where}: observations of {observation_width} and actions of {action_width} dims; "
                            f"task '{self.task.name}' has {self.task.obs_dim} and {self.task.act_dim}")
        low, high = dataset.action_space.low.astype(np.float64), dataset.action_space.high.astype(np.float64)
        unit_range = bool(np.all(low == -1.0) and np.all(high == 1.0))
        with readable(self.where):
            stored = list(dataset.storage.get_episodes(self.indices))
        episodes = []
        for position, data in enumerate(stored):
            where = self.location(position)
            rewards = np.asarray(data["rewards"])
            steps = rewards.shape[0]
            observations = np.asarray(data["observations"])
            if steps == 0 or observations.shape != (steps + 1, observation_width):
                raise DataError(f"{where}: {observations.shape} observations for {steps} steps; Minari stores "
                                f"steps + 1 = {steps + 1} (the final observation included)")
            actions = np.asarray(data["actions"], dtype=np.float64)
            check_action_bounds(where, actions, low, high)
            if not unit_range:  # onto [-1, 1], as the gymnasium env maps them back (from_unit_range)
                from m3dt.envs.gymnasium_env import to_unit_range

                actions = to_unit_range(actions, low, high)
            episodes.append(Episode(
                observations=padded(finite_float32(where, "observations", observations[:steps]), MAX_OBS_DIM),
                actions=padded(finite_float32(where, "actions", actions), MAX_ACT_DIM),
                rewards=finite_float32(where, "rewards", rewards.reshape(steps)),
            ))
        return episodes


def check_action_bounds(where: str, actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    """DataError when recorded actions (T, A) leave the dataset's action space [low, high] (A,): mapped onto
    [-1, 1] they would leave the range the model acts in (its tanh), and the env clips them anyway."""
    outside = (actions < low - ACTION_TOLERANCE) | (actions > high + ACTION_TOLERANCE)
    if outside.any():
        step, dim = np.argwhere(outside)[0]
        raise DataError(f"{where}: action dim {dim} is {actions[step, dim]:.4g} at step {step}, outside the "
                        f"dataset's action space [{low[dim]:.4g}, {high[dim]:.4g}]: record the actions the env "
                        "was given (clipped to its bounds)")


def padded(array: np.ndarray, width: int) -> np.ndarray:
    """(T, w) -> (T, `width`) float32, zeros beyond column w."""
    out = np.zeros((array.shape[0], width), dtype=np.float32)
    out[:, : array.shape[1]] = array
    return out


def space_width(space: gymnasium.spaces.Space, what: str, where: str) -> int:
    """The width of a flat Box space with finite bounds (actions) or any bounds (observations)."""
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise DataError(f"{where}: the {what} space must be a flat Box, got {space}")
    if what == "action" and not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise DataError(f"{where}: the action space needs finite bounds, got {space}")
    return int(space.shape[0])


@contextmanager
def readable(where: str, advice: str = "write or download the dataset again") -> Iterator[None]:
    """Minari's storage reads its files only when episodes are asked for; a damaged one (h5py's OSError for a
    truncated HDF5 file, and others) becomes one DataError naming the dataset and saying what to do."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        detail = " ".join(str(error).split())
        raise DataError(f"{where}: a file of this Minari dataset cannot be read ({type(error).__name__}: {detail}); "
                        f"{advice}") from None


def open_dataset(data_path: Path) -> minari.MinariDataset:
    """The Minari dataset stored in the folder of `data_path`; DataError naming the folder when it cannot be
    read as one."""
    import minari

    try:
        return minari.MinariDataset(data_path)
    except Exception as error:  # minari and h5py raise many types for a damaged or foreign folder
        raise DataError(f"{data_path.parent}: not a readable Minari dataset "
                        f"({type(error).__name__}: {error})") from None


def minari_episodes(spec: str, task: Task, max_episodes: int) -> MinariEpisodes:
    """The first `max_episodes` episodes of the Minari dataset `spec` ("minari:ID" or a dataset folder)."""
    folder = local_dataset_folder(spec.removeprefix(MINARI_PREFIX)) if spec.startswith(MINARI_PREFIX) else Path(spec)
    if not is_minari_folder(folder):
        raise DataError(f"{folder}: not a Minari dataset folder (no data/metadata.json)")
    data_path = data_folder(folder)
    count = min(open_dataset(data_path).total_episodes, max_episodes)
    return MinariEpisodes(data_path, tuple(range(count)), task)


# ---------------------------------------------------------------------------------------------------------
# Writing


def dataset_id(namespace: str, task_name: str) -> str:
    """The Minari id a collected task is exported as: "{namespace}/{task_name}-v0"."""
    return f"{namespace}/{task_name}-v0"


def write_task_dataset(task: Task, episodes: list[dict[str, np.ndarray]], identifier: str, m3dt_metadata: dict,
                       description: str, algorithm: str) -> Path:
    """Write one task's episodes as the Minari dataset `identifier` under Minari's datasets root; return its
    folder. Each episode: observations (T+1, >= obs_dim) with the final observation, actions (T, >= act_dim),
    rewards (T,), terminations (T,), truncations (T,); widths beyond the task's (the MT160 padding) are cut."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=index, observations=episode["observations"][:, : task.obs_dim].astype(np.float32),
                             actions=episode["actions"][:, : task.act_dim].astype(np.float32),
                             rewards=episode["rewards"].astype(np.float64),
                             terminations=episode["terminations"].astype(bool),
                             truncations=episode["truncations"].astype(bool), infos={})
               for index, episode in enumerate(episodes)]
    with warnings.catch_warnings():  # Minari warns about each metadata field left empty (code link, email...)
        warnings.simplefilter("ignore", UserWarning)
        dataset = minari.create_dataset_from_buffers(
            identifier, buffers,
            env=gym.spec(task.env_id) if task.env_id is not None else None,
            eval_env=gym.spec(task.env_id) if task.env_id is not None else None,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (task.obs_dim,), np.float32),
            action_space=gym.spaces.Box(-1.0, 1.0, (task.act_dim,), np.float32),
            algorithm_name=algorithm, author="m3dt (python -m m3dt.collect)",
            description=description)
    # Set afterwards: Minari records reference scores only for a dataset with an env, and would roll out a
    # random policy for a missing minimum.
    low_high = task.score_returns or REFERENCE_RETURNS.get(task.family)
    reference = {"ref_min_score": low_high[0], "ref_max_score": low_high[1]} if low_high else {}
    dataset.storage.update_metadata({**reference, "m3dt": m3dt_metadata})
    return Path(dataset.spec.data_path).parent


def collected_episode(path: Path) -> dict[str, np.ndarray]:
    """One episode file written by m3dt.collect, in Minari's terms (the final observation appended; an
    episode that ends without a termination is truncated at its last step)."""
    with np.load(path, allow_pickle=False) as archive:
        if "final_observation" not in archive.files:
            raise DataError(f"{path}: has no final_observation (collected by an older m3dt.collect): delete the "
                            "task's folder and collect it again")
        terminations = archive["terminals"].astype(bool)
        truncations = np.zeros_like(terminations)
        truncations[-1] = not terminations[-1]
        return {"observations": np.concatenate([archive["observations"], archive["final_observation"][None]]),
                "actions": archive["actions"], "rewards": archive["rewards"], "terminations": terminations,
                "truncations": truncations}


def recorded_metadata(task: Task, namespace: str) -> tuple[str, Path, dict | None]:
    """(dataset id, its folder, the metadata m3dt recorded in it: task row and collect.json entry) of the Minari
    dataset {namespace}/{task}-v0; the metadata is None when there is no such dataset. DataError when a dataset of that name
    has no m3dt metadata (not written by m3dt, or its writing was cut short)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    identifier = dataset_id(namespace, task.name)
    existing = get_dataset_path(identifier)
    if not is_minari_folder(existing):
        return identifier, existing, None
    recorded = json.loads((data_folder(existing) / "metadata.json").read_text()).get("m3dt")
    if recorded is None:
        raise DataError(f"Minari dataset {identifier} ({existing}) has no m3dt metadata (not written by m3dt, "
                        f"or its writing was cut short): delete it (minari delete {identifier}) and export again")
    return identifier, existing, recorded


def check_namespace(namespace: str) -> None:
    """DataError for a --minari_namespace that Minari's dataset ids cannot hold."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id(namespace, "task"))
    except ValueError:
        raise DataError(f"--minari_namespace {namespace!r}: not a Minari namespace (letters, digits, '-', '_', "
                        "and '/' between parts)") from None


def check_export(task: Task, namespace: str, settings: dict, episodes: int) -> None:
    """Before a collection with --format minari: DataError when the dataset it would write already holds another
    collection of the task (other settings or episode count), which the export after collecting would refuse."""
    identifier, existing, recorded = recorded_metadata(task, namespace)
    if recorded is None:
        return
    planned = {"settings": settings, "episodes": episodes}
    entry = recorded.get("collection") or {}
    if {key: entry.get(key) for key in planned} != json_copy(planned):
        raise DataError(another_collection(identifier, existing, task))
    dataset = open_dataset(data_folder(existing))  # the same collection: kept, so it must read
    with readable(f"Minari dataset {identifier} ({existing})", f"delete it (minari delete {identifier}) and "
                                                                "collect again: the export rewrites it"):
        list(dataset.storage.get_episodes(range(dataset.total_episodes)))


def another_collection(identifier: str, existing: Path, task: Task) -> str:
    """The message for a Minari dataset that holds another collection of `task`."""
    return (f"Minari dataset {identifier} ({existing}) holds another collection of {task.name} (other settings or "
            f"episodes): delete it (minari delete {identifier}) to write this one")


def json_copy(value: object) -> object:
    """`value` as JSON gives it back (tuples as lists), for comparing with what a metadata file holds."""
    return json.loads(json.dumps(value))


def export_collected_task(task: Task, folder: Path, episodes: int, entry: dict, namespace: str) -> Path:
    """Write the collected episodes 0..episodes-1 of `folder` (a task of m3dt.collect, whose collect.json
    entry is `entry`) as the Minari dataset {namespace}/{task}-v0; an existing one made from the same
    collection is kept, one from another collection is refused."""
    metadata = json_copy({"task": task.name, "family": task.family, "goal": task.goal, "collection": entry})
    identifier, existing, recorded = recorded_metadata(task, namespace)
    if recorded is not None:
        if recorded != metadata:
            raise DataError(another_collection(identifier, existing, task))
        return existing
    description = (f"m3dt's collection of the MT160 task {task.name} ({task.family}): {episodes} episodes by "
                   f"{entry['settings']['policy']}; the last two are the task's prompt trajectories. Build its env "
                   f"with m3dt.envs.make_env('{task.name}', episode, seed).")
    return write_task_dataset(task, [collected_episode(folder / f"{index}.npz") for index in range(episodes)],
                              identifier, metadata, description, entry["settings"]["policy"])

"""Offline datasets in the MT160 layout, collected from this project's environments by expert policies.

    python -m m3dt.collect --tasks metaworld --episodes 2000 --out DATA_ROOT       # all 50 Meta-World tasks
    python -m m3dt.collect train-expert --expert cheetah_vel --steps 1000000 --out DATA_ROOT
    python -m m3dt.collect --tasks cheetah_vel --episodes 1002 --out DATA_ROOT     # its 40 tasks, that expert

Layout (the README's MT160 layout): `{out}/{task}/{i}.npz`, i = 0..N-1, N = --episodes files in all, of which the
loader uses the last two as the task's prompt trajectories. Keys: observations (T,39) and actions (T,8)
zero-padded (the env receives the first act_dim dims), rewards (T,), terminals (T,) (True only where the
env ended the episode, i.e. an ant falling; the horizon or --max_steps is not a terminal), and one key the
loader ignores: successes (T,), Meta-World's per-step info success (False elsewhere), from which
collect.json's success rates are computed, and final_observation (39,), the observation after the last
step (Minari datasets store it).

`--format minari` also writes each task as the Minari dataset `{--minari_namespace}/{task}-v0` in Minari's
datasets root (MINARI_DATASETS_PATH, default ~/.minari/datasets), with its collect.json entry in the
metadata (m3dt/minari_io.py); `--data_path minari:{namespace}` then trains on them.

Policies:
- Meta-World: the scripted expert that ships with `metaworld`. Episode i has its own goal: goal i % 50 of
  MT1 seeded with --seed for i < 50 (the goals of `make_env(task, i, seed)`), and for each further block of
  50 episodes an MT1 seeded with a seed derived from (--seed, block), since MT1 samples 50 goals per seed.
- ant-dir, cheetah-vel: one goal-conditioned SAC expert per family (stable-baselines3), trained by
  `train-expert` on goals drawn each episode (ant-dir: angle in [0, 2 pi), input (cos, sin); cheetah-vel:
  velocity in [0, 3], the table's goals span 0.075..3.0), rolled out with the task's goal; the goal is
  appended to the expert's input only, never stored.
- DMC: no expert ships with the packages; train one per task with the same command
  (`train-expert --expert walker-walk`, or `--expert dmc` for all 30 in turn), in the protocol's env
  (action repeat 2, 500 steps).
Experts live in `{out}/_experts/`; the loader reads only the folders of the tasks it is given, so this
folder is never taken for data. The repository's `experts/` folder holds experts trained by this project
(model and state file, no replay buffer) to copy there.

Collection is deterministic given --seed: episode i of task t draws its action noise and reset state from
a seed derived from (seed, task index, i), whatever the worker scheduling. The default seed (100) differs
from the run seeds 0-2 so that Meta-World's evaluation goals (MT1 seeded with the run seed) are not among
the training goals. Reruns resume: valid episode files are kept, missing or damaged ones are collected,
and every file is written to a temporary file and renamed, so there is never a half-written episode.
`{out}/collect.json` holds, per task, the settings it was collected with (a rerun must use the same), its
episodes' mean return, success rate and score under the protocol's normalisation, and for Meta-World the
goals used ("mt1_goals": [{"seed": s, "goals": n}, ...]: goals 0..n-1 of MT1 seeded with s), from which
evaluation tells whether its goals are training goals.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "disable")  # nothing renders; set before any MuJoCo import

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import SAC  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.logger import configure as configure_logger  # noqa: E402
from tqdm import tqdm  # noqa: E402

from m3dt.cli import command, exit_with_message  # noqa: E402
from m3dt.config import ArgumentParser  # noqa: E402
from m3dt.data import MIN_EPISODES, DataError, load_episode  # noqa: E402
from m3dt.envs import TaskEnv, make_env  # noqa: E402
from m3dt.envs.metaworld import scripted_policy  # noqa: E402
from m3dt.run import ArtifactError, atomic_path, make_folder, read_json, write_json  # noqa: E402
from m3dt.scores import SCORE_AXIS, episode_score, full_episode_return  # noqa: E402
from m3dt.tasks import (FAMILIES, MAX_ACT_DIM, MT1_GOALS, Task, TaskError, get_task, resolve_tasks,  # noqa: E402
                        suite_names, task_table)
from m3dt.workers import SPAWN, starting_workers  # noqa: E402

# metaworld's scripted policies warn that their gains exceed the action range; the actions are clipped.
warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")

EXPERTS_DIR = "_experts"
SHIPPED_EXPERTS = Path(__file__).resolve().parent.parent / "experts"  # trained experts in the repository
SUMMARY_FILE = "collect.json"
GOAL_RANGES = {"ant_dir": (0.0, 2 * np.pi), "cheetah_vel": (0.0, 3.0)}  # expert training goals, uniform
LOCOMOTION_FAMILIES = tuple(GOAL_RANGES)


class CollectError(ValueError):
    """A request that cannot be carried out; the message says what to do."""


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (usable by numpy, dm_control and metaworld's MT1)."""
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------
# Experts: which one serves a task, what it observes, its files


def expert_name(task: Task) -> str:
    """Locomotion tasks share their family's goal-conditioned expert; a DMC task has its own."""
    return task.family if task.family in LOCOMOTION_FAMILIES else task.name


def expert_task(name: str) -> Task:
    """A task whose env the expert `name` trains on (for a family, its first task; the goal is redrawn)."""
    if name in LOCOMOTION_FAMILIES:
        return next(task for task in task_table().values() if task.family == name)
    if name not in task_table():
        raise CollectError(f"unknown expert '{name}': choose ant_dir, cheetah_vel or a DMC task name")
    task = get_task(name)
    if task.family in LOCOMOTION_FAMILIES:
        raise CollectError(f"'{name}' is collected by its family's expert: use --expert {task.family}")
    if task.family != "dmc":
        raise CollectError(f"'{name}' needs no trained expert (metaworld's scripted one collects it)")
    return task


def goal_features(family: str, goal: float | None) -> np.ndarray:
    """The goal as the expert sees it: a direction as (cos, sin) so that 0 and 2 pi coincide; a velocity
    as itself; nothing for a DMC task."""
    if family == "ant_dir":
        return np.array([np.cos(goal), np.sin(goal)], dtype=np.float32)
    if family == "cheetah_vel":
        return np.array([goal], dtype=np.float32)
    return np.zeros(0, dtype=np.float32)


def expert_observation(task: Task, observation: np.ndarray, goal: float | None) -> np.ndarray:
    """The expert's input: the native (unpadded) observation followed by the goal features."""
    return np.concatenate([observation[: task.obs_dim], goal_features(task.family, goal)]).astype(np.float32)


def is_termination(env: TaskEnv, done: bool) -> bool:
    """True when the env ended the episode itself (an ant falling), not because the horizon came."""
    return done and env.steps < env.task.horizon


def mt1_seed(seed: int, block: int) -> int:
    """The MT1 seed of Meta-World episodes block * 50 .. block * 50 + 49 of a collection with `seed`."""
    return seed if block == 0 else derived_seed(seed, block)


def mt1_goal_blocks(seed: int, episodes: int) -> list[dict[str, int]]:
    """collect.json's record of a Meta-World task's goals: each {"seed": s, "goals": n} means goals 0..n-1 of
    metaworld.MT1(task, seed=s), the goals evaluation with --seed s uses first."""
    return [{"seed": mt1_seed(seed, block), "goals": min(MT1_GOALS, episodes - block * MT1_GOALS)}
            for block in range(-(-episodes // MT1_GOALS))]


def episode_env(task: Task, episode: int, seed: int) -> TaskEnv:
    """The env of dataset episode `episode` (see the module docstring for the goals and seeds)."""
    if task.family == "metaworld":
        block, goal = divmod(episode, MT1_GOALS)
        return make_env(task.name, episode=goal, seed=mt1_seed(seed, block))
    own_seed = derived_seed(seed, task.index, episode)
    if task.family == "dmc":
        return make_env(task.name, episode=own_seed)  # a DMC env's episode is its suite seed
    return make_env(task.name, episode=episode, seed=own_seed)


@dataclass(frozen=True)
class ExpertFiles:
    """The files of one SAC expert."""

    model: Path  # SB3 zip, what collection loads
    replay_buffer: Path  # kept so that a rerun continues training where it stopped
    state: Path  # JSON: steps done and asked for; written last, so it never claims more than the model has
    training_log: Path  # folder: SB3's progress.csv of each training run, in from_step_{N}/

    @staticmethod
    def in_folder(folder: Path, name: str) -> ExpertFiles:
        """The expert `name`'s files in `folder`: {name}.zip, {name}.replay_buffer.pkl, {name}.json and the
        folder {name}_log/."""
        return ExpertFiles(folder / f"{name}.zip", folder / f"{name}.replay_buffer.pkl", folder / f"{name}.json",
                           folder / f"{name}_log")

    def run_log(self, start: int) -> Path:
        """A folder no earlier run logged to, for the SB3 log of a run that starts at step `start`:
        from_step_{start}/, or from_step_{start}_{n}/ when a run started from the same checkpoint before (one
        that stopped before its next save); SB3 would truncate an existing progress.csv."""
        folder, again = self.training_log / f"from_step_{start}", 2
        while folder.exists():
            folder, again = self.training_log / f"from_step_{start}_{again}", again + 1
        return folder

    @staticmethod
    def in_data_root(out: Path, name: str) -> ExpertFiles:
        """The expert `name` of the data root `out`."""
        return ExpertFiles.in_folder(out / EXPERTS_DIR, name)


class ExpertTrainingEnv(gym.Env):
    """The gymnasium view of an expert's task for SB3: a fresh env each episode (its own reset state, seeded
    as collection seeds episodes; for a locomotion family, a new goal drawn from its range), observations
    with the goal appended, and the horizon reported as truncation so that SAC bootstraps through it."""

    def __init__(self, name: str, seed: int):
        self.task = expert_task(name)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.episodes = 0
        self.env: TaskEnv | None = None
        self.goal: float | None = None
        width = self.task.obs_dim + goal_features(self.task.family, 0.0).shape[0]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (width,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.task.act_dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Close the last env and start the next episode in a fresh one (a new goal for a locomotion family);
        returns the expert's observation (native observation + goal features, float32) and an empty info."""
        super().reset(seed=seed)
        if self.env is not None:
            self.env.close()
        self.env = episode_env(self.task, self.episodes, self.seed)
        self.episodes += 1
        if self.task.family in GOAL_RANGES:
            self.goal = float(self.rng.uniform(*GOAL_RANGES[self.task.family]))
            self.env.goal = self.goal
        return expert_observation(self.task, self.env.reset(), self.goal), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Gymnasium's (observation, reward, terminated, truncated, info): terminated only when the env ended the
        episode itself, truncated when the horizon came."""
        observation, reward, done, info = self.env.step(action)
        terminated = is_termination(self.env, done)
        return expert_observation(self.task, observation, self.goal), reward, terminated, done and not terminated, info

    def close(self) -> None:
        """Close the current episode's env, if any."""
        if self.env is not None:
            self.env.close()


# ---------------------------------------------------------------------------------------------------------
# Expert training


class TrainingProgress(BaseCallback):
    """A tqdm bar over environment steps, and a checkpoint every `save_every` steps."""

    def __init__(self, files: ExpertFiles, target_steps: int, save_every: int, seed: int):
        super().__init__()
        self.files, self.target_steps, self.save_every, self.seed = files, target_steps, save_every, seed

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.target_steps, initial=self.num_timesteps, desc="SAC steps", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(1)
        if self.num_timesteps % self.save_every == 0:
            save_expert(self.model, self.files, self.target_steps, self.seed)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def save_expert(model: SAC, files: ExpertFiles, target_steps: int, seed: int) -> None:
    """Checkpoint atomically: replay buffer and model first, the state file (the commit) last."""
    for path, save in ((files.replay_buffer, model.save_replay_buffer), (files.model, model.save)):
        with atomic_path(path) as temporary, open(temporary, "wb") as file:
            save(file)  # a file object, so that SB3 does not append its own suffix to the temporary name
    write_json(files.state, {"steps_done": model.num_timesteps, "steps_target": target_steps, "seed": seed})


def train_expert(name: str, steps: int, out: Path, seed: int, save_every: int, learning_starts: int,
                 buffer_size: int, device: str) -> None:
    """Train (or continue training) the SAC expert `name` to `steps` environment steps."""
    files = ExpertFiles.in_data_root(out, name)
    resume = files.model.is_file() and files.state.is_file()
    start = read_json(files.state, f"state of the {name} expert")["steps_done"] if resume else 0
    if start >= steps:
        print(f"expert {name}: already trained for {start} steps ({files.model})")
        return
    # A resumed run draws new goals and reset states rather than replaying those of its first episodes.
    env = ExpertTrainingEnv(name, derived_seed(seed, start))
    if resume:  # --buffer_size sizes the buffer of a checkpoint saved without one (a saved one returns as it was)
        model = SAC.load(files.model, env=env, device=device, buffer_size=buffer_size)
    else:
        # SB3's SAC defaults (256x256 MLPs, lr 3e-4, batch 256); random actions for the first
        # `learning_starts` steps, as RL Zoo does for MuJoCo.
        model = SAC("MlpPolicy", env, buffer_size=buffer_size, learning_starts=learning_starts, seed=seed,
                    device=device, verbose=0)
    # SB3 otherwise makes a new empty log folder in the system's temp dir on every learn(); keep its
    # training log (episode returns, losses) beside the expert instead, one folder per run.
    model.set_logger(configure_logger(str(files.run_log(start)), ["csv"]))
    if resume and files.replay_buffer.is_file():
        model.load_replay_buffer(files.replay_buffer)
        kept = model.replay_buffer.buffer_size
        print(f"resuming {name} from step {model.num_timesteps}" + (
            "" if kept == buffer_size else f" with its saved replay buffer of capacity {kept} (--buffer_size "
                                           f"{buffer_size} sizes a new buffer only)"))
    elif resume:
        refill_replay_buffer(model, name, min(learning_starts, steps - start))
    if model.num_timesteps < steps:
        progress = TrainingProgress(files, steps, save_every, seed)
        model.learn(total_timesteps=steps - model.num_timesteps, callback=progress, reset_num_timesteps=False)
    save_expert(model, files, steps, seed)
    env.close()
    print(f"expert {name}: {model.num_timesteps} steps, saved to {files.model}")


def refill_replay_buffer(model: SAC, name: str, steps: int) -> None:
    """Resume a checkpoint that has no replay buffer (as the experts shipped in `experts/`): first `steps`
    environment steps of its own stochastic policy with no update, so that its first updates sample its
    own behaviour rather than a handful of transitions (SB3's warm-up would act at random instead). They
    count as environment steps of the training."""
    print(f"resuming {name} from step {model.num_timesteps} without its replay buffer: {steps} steps of its "
          "policy refill it before the updates continue")
    gradient_steps, model.gradient_steps = model.gradient_steps, 0  # SB3 collects and skips train() at 0
    model.learn(total_timesteps=steps, reset_num_timesteps=False)
    model.gradient_steps = gradient_steps


# ---------------------------------------------------------------------------------------------------------
# Policies for collection

Policy = Callable[[np.ndarray], np.ndarray]  # padded 39-d observation -> action of the task's act_dim


def expert_state(task: Task, out: Path) -> dict:
    """The state file of a task's expert, checked to exist and to have finished its training."""
    name = expert_name(task)
    files = ExpertFiles.in_data_root(out, name)
    if not files.model.is_file() or not files.state.is_file():
        what = "no expert for DMC" if task.family == "dmc" else f"no {name} expert"
        shipped = ExpertFiles.in_folder(SHIPPED_EXPERTS, name)
        use_shipped = (f", or copy the repository's ({shipped.model} and {shipped.state.name}) into "
                       f"{files.model.parent}/" if shipped.model.is_file() else "")
        raise CollectError(f"{what} ({task.name}): train one with python -m m3dt.collect train-expert "
                           f"--expert {name} --out {out}{use_shipped}")
    state = read_json(files.state, f"state of the {name} expert")
    if state["steps_done"] < state["steps_target"]:
        raise CollectError(f"the {name} expert stopped at {state['steps_done']} of {state['steps_target']} "
                           f"steps: rerun python -m m3dt.collect train-expert --expert {name} --out {out}")
    return state


def policy_name(task: Task, out: Path) -> str:
    """What collects a task, recorded in collect.json (a rerun must use the same policy)."""
    if task.family == "metaworld":
        return "metaworld scripted"
    return f"sac {expert_name(task)} at {expert_state(task, out)['steps_done']} steps"


@lru_cache(maxsize=None)  # per process: the 40 tasks of a family share one loaded expert
def expert_model(name: str, out: Path) -> SAC:
    """The SAC expert `name` of the data root `out`, loaded on the CPU once per process."""
    return SAC.load(ExpertFiles.in_data_root(out, name).model, device="cpu")


@lru_cache(maxsize=None)
def task_policy(task_name: str, out: Path) -> Policy:
    """The policy that collects a task: Meta-World's scripted expert, or the SAC expert (deterministic
    actions) with the task's goal appended to its input."""
    task = get_task(task_name)
    if task.family == "metaworld":
        return scripted_policy(task.name)
    model = expert_model(expert_name(task), out)
    return lambda observation: model.predict(expert_observation(task, observation, task.goal), deterministic=True)[0]


# ---------------------------------------------------------------------------------------------------------
# Episodes


@dataclass(frozen=True)
class EpisodeJob:
    """One episode to collect: episode `episode` of task `task_name` into the data root `out`, with these settings."""

    task_name: str
    episode: int
    out: Path
    seed: int
    noise: float
    max_steps: int | None


@dataclass(frozen=True)
class EpisodeSummary:
    """What collect.json takes from one episode file: its length, undiscounted return, success and ending."""

    episode: int
    steps: int
    episode_return: float
    success: bool | None  # None for a file without the successes key (not written by this module)
    ended: bool  # the env ended the episode itself (its last step is a terminal)


def episode_path(out: Path, task_name: str, episode: int) -> Path:
    """The file of episode `episode` of a task: {out}/{task_name}/{episode}.npz."""
    return out / task_name / f"{episode}.npz"


def collect_episode(job: EpisodeJob) -> tuple[str, EpisodeSummary]:
    """Roll out one episode with the task's policy plus clipped Gaussian noise, and write its file."""
    task = get_task(job.task_name)
    policy = task_policy(task.name, job.out)
    noise_rng = np.random.default_rng(derived_seed(job.seed, task.index, job.episode))
    env = episode_env(task, job.episode, job.seed)
    steps = min(task.horizon, job.max_steps or task.horizon)
    rows = []  # (observation, padded action, reward, terminal, success) per step
    observation = env.reset()
    next_observation = observation
    for _ in range(steps):
        action = np.clip(policy(observation) + job.noise * noise_rng.standard_normal(task.act_dim), -1.0, 1.0)
        next_observation, reward, done, info = env.step(action)
        padded_action = np.zeros(MAX_ACT_DIM, dtype=np.float32)
        padded_action[: task.act_dim] = action
        rows.append((observation, padded_action, reward, is_termination(env, done), info["success"]))
        observation = next_observation
        if done:
            break
    env.close()
    observations, actions, rewards, terminals, successes = zip(*rows)
    arrays = {
        "observations": np.stack(observations).astype(np.float32),
        "actions": np.stack(actions),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminals": np.asarray(terminals, dtype=bool),
        "successes": np.asarray(successes, dtype=bool),
        "final_observation": np.asarray(next_observation, dtype=np.float32),
    }
    with atomic_path(episode_path(job.out, task.name, job.episode)) as temporary, open(temporary, "wb") as file:
        np.savez_compressed(file, **arrays)  # a file object: numpy would append .npz to the temporary name
    return task.name, summarize(job.episode, arrays["rewards"], arrays["successes"], arrays["terminals"])


def summarize(episode: int, rewards: np.ndarray, successes: np.ndarray | None, terminals: np.ndarray) -> EpisodeSummary:
    """The summary of an episode's arrays: a success when any step succeeded (None without `successes`), ended when
    its last step is a terminal."""
    success = None if successes is None else bool(successes.any())
    return EpisodeSummary(episode, int(rewards.shape[0]), float(rewards.sum(dtype=np.float64)), success,
                          bool(terminals[-1]))


def existing_episode(path: Path, episode: int) -> EpisodeSummary | None:
    """The summary of a valid episode file, or None when it is missing or damaged (it is collected again)."""
    if not path.is_file():
        return None
    try:
        rewards = load_episode(path).rewards
        with np.load(path, allow_pickle=False) as archive:
            successes = archive["successes"] if "successes" in archive.files else None
            terminals = archive["terminals" if "terminals" in archive.files else "dones"]  # load_episode checked
    except DataError:
        return None
    return summarize(episode, rewards, successes, terminals)


# ---------------------------------------------------------------------------------------------------------
# Collection


def task_settings(task: Task, out: Path, seed: int, noise: float, max_steps: int | None) -> dict:
    """The settings collect.json records for a task (policy, seed, noise, max_steps); a rerun must match them.
    Raises CollectError when the task's SAC expert is missing or unfinished."""
    return {"policy": policy_name(task, out), "seed": seed, "noise": noise, "max_steps": max_steps}


def check_task_folder(task: Task, out: Path, episodes: int, settings: dict, summary: dict) -> None:
    """Refuse to mix episodes of different settings, or to leave files beyond --episodes in the folder
    (the loader would read them and take the last two as prompts)."""
    previous = summary.get(task.name, {}).get("settings")
    if previous is not None and previous != settings:
        changed = ", ".join(f"{key} {previous.get(key)!r} -> {value!r}" for key, value in settings.items()
                            if previous.get(key) != value)
        raise CollectError(f"{task.name} was collected with other settings ({changed}): use the same ones, "
                           f"or delete {out / task.name} to start it over")
    folder = out / task.name
    extra = [path.name for path in folder.glob("*.npz") if not path.stem.isdigit() or int(path.stem) >= episodes]
    if extra:
        raise CollectError(f"{folder} holds files beyond --episodes {episodes} ({', '.join(sorted(extra)[:3])}): "
                           "raise --episodes or delete them")
    for stale in folder.glob(".*.npz.*.tmp"):  # left by a killed worker; atomic_path removes its own otherwise
        stale.unlink()


def task_entry(task: Task, settings: dict, summaries: list[EpisodeSummary]) -> dict:
    """The collect.json entry of a task."""
    returns = [summary.episode_return for summary in summaries]
    successes = [summary.success for summary in summaries]
    # Files from elsewhere may lack the success flags; then Meta-World's rate and score are unknown.
    success_known = task.family == "metaworld" and None not in successes
    success_rate = float(np.mean(successes)) if success_known else None
    full_returns = [full_episode_return(summary.episode_return, summary.steps, task.horizon, summary.ended)
                    for summary in summaries]  # an episode cut by --max_steps on the scale of a full one
    score = (None if task.family == "metaworld" and not success_known
             else episode_score(task.family, full_returns, successes))
    goals = {"mt1_goals": mt1_goal_blocks(settings["seed"], len(summaries))} if task.family == "metaworld" else {}
    return {
        "settings": settings,
        "episodes": len(summaries),
        "steps": sum(summary.steps for summary in summaries),
        "mean_return": float(np.mean(returns)),
        "success_rate": success_rate,
        "score": score,
        **goals,
    }


def start_worker() -> None:
    """One torch thread per worker."""
    torch.set_num_threads(1)


def run_jobs(jobs: list[EpisodeJob], workers: int) -> list[tuple[str, EpisodeSummary]]:
    """Collect the episodes of `jobs` in `workers` processes (0: in this process), whole episodes each."""
    progress = {"total": len(jobs), "desc": "episodes", "dynamic_ncols": True}
    if workers == 0 or not jobs:
        return [collect_episode(job) for job in tqdm(jobs, **progress)]
    # spawn: MuJoCo and torch state must not be forked. One torch thread per worker: the expert is a small
    # MLP evaluated once per step, and more threads would only compete with the other workers.
    with starting_workers():
        pool = SPAWN.Pool(min(workers, len(jobs)), initializer=start_worker)
    with pool:
        return list(tqdm(pool.imap_unordered(collect_episode, jobs), **progress))


def collect(task_names: list[str], episodes: int, out: Path, seed: int, noise: float, workers: int,
            max_steps: int | None) -> dict:
    """Make sure episodes 0..episodes-1 of every task exist; return the updated collect.json."""
    tasks = [get_task(name) for name in task_names]
    summary_path = out / SUMMARY_FILE
    summary = read_json(summary_path, "collection summary") if summary_path.is_file() else {}
    settings = {task.name: task_settings(task, out, seed, noise, max_steps) for task in tasks}
    kept: dict[str, list[EpisodeSummary]] = {}
    jobs = []
    for task in tasks:
        check_task_folder(task, out, episodes, settings[task.name], summary)
        summary[task.name] = {"settings": settings[task.name]}  # recorded before any file is written
        kept[task.name] = []
        for episode in range(episodes):
            existing = existing_episode(episode_path(out, task.name, episode), episode)
            if existing is None:
                jobs.append(EpisodeJob(task.name, episode, out, seed, noise, max_steps))
            else:
                kept[task.name].append(existing)
    write_json(summary_path, summary)
    print(f"{len(jobs)} episodes to collect, {sum(map(len, kept.values()))} kept")
    for task_name, result in run_jobs(jobs, workers):
        kept[task_name].append(result)
    for task in tasks:
        ordered = sorted(kept[task.name], key=lambda item: item.episode)
        summary[task.name] = task_entry(task, settings[task.name], ordered)
    write_json(summary_path, summary)
    return summary


def print_table(summary: dict, task_names: list[str]) -> None:
    """Print collect.json's entries of `task_names` as a table: episodes, mean return, success rate (%), the
    expert's score (normalised as evaluation scores it: README "Evaluation")."""
    print(f"{'task':32s} {'episodes':>8s} {'mean return':>12s} {'success %':>9s} {'score':>7s}")
    for name in task_names:
        entry = summary[name]
        success = "-" if entry["success_rate"] is None else f"{100 * entry['success_rate']:.0f}"
        score = "-" if entry["score"] is None else f"{entry['score']:.1f}"
        print(f"{name:32s} {entry['episodes']:8d} {entry['mean_return']:12.2f} {success:>9s} {score:>7s}")
    families = dict.fromkeys(get_task(name).family for name in task_names)
    cut = sorted({summary[name]["settings"]["max_steps"] for name in task_names} - {None})
    print("mean return: per episode, as collected"
          + (f" (episodes cut at --max_steps {', '.join(map(str, cut))})" if cut else "")
          + "; score: the expert's per-task score as evaluation computes it ("
          + "; ".join(f"{family}: {SCORE_AXIS[family]}" for family in families) + ")"
          + (", each cut episode's return scaled to the full horizon first (return x horizon / steps)"
             if cut and set(families) - {"metaworld"} else ""))


# ---------------------------------------------------------------------------------------------------------
# Command line


def collect_parser() -> argparse.ArgumentParser:
    """The command line of collection (`python -m m3dt.collect --tasks ...`)."""
    parser = ArgumentParser(
        prog="python -m m3dt.collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Expert training: python -m m3dt.collect train-expert --help")
    parser.add_argument("--tasks", required=True,
                        help=f"task names a,b,c, @file.json (a JSON list); in a list, a family ({', '.join(FAMILIES)}) "
                             f"or an official suite ({', '.join(suite_names())}) stands for its tasks")
    parser.add_argument("--episodes", type=int, required=True,
                        help="episode files per task in all, prompts included (the loader uses the last two as "
                             f"prompts); at least {MIN_EPISODES}")
    parser.add_argument("--out", required=True, help="data root; also holds _experts/ and collect.json")
    parser.add_argument("--seed", type=int, default=100, help="collection seed (keep it apart from run seeds 0-2)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the expert's actions, then clipped to [-1, 1]")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="worker processes, whole episodes each (default: CPU count; 0: in-process)")
    parser.add_argument("--max_steps", type=int, help="cut episodes to this many steps, for quick checks")
    parser.add_argument("--format", choices=("npz", "minari"), default="npz",
                        help="npz: the MT160 layout only; minari: also each task as the Minari dataset "
                             "{minari_namespace}/{task}-v0 in Minari's datasets root (MINARI_DATASETS_PATH)")
    parser.add_argument("--minari_namespace", default="m3dt", help="namespace of the Minari datasets written")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


def train_parser() -> argparse.ArgumentParser:
    """The command line of expert training (`python -m m3dt.collect train-expert ...`)."""
    parser = ArgumentParser(
        prog="python -m m3dt.collect train-expert",
        description="Train the SAC expert that collects ant-dir, cheetah-vel or a DMC task (stable-baselines3, "
                    "cuda when available). Saved to {out}/_experts/{expert}.zip with its replay buffer and a "
                    "checkpoint every --save_every steps; a rerun continues from the last checkpoint, and a larger "
                    "--steps trains further.")
    parser.add_argument("--expert", required=True,
                        help="ant_dir or cheetah_vel (one goal-conditioned expert for the family's 40 tasks), "
                             "a DMC task name (an expert for that task), or dmc (one expert per DMC task, in turn)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="environment steps in all")
    parser.add_argument("--out", required=True, help="data root (the expert goes to its _experts/ folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_every", type=int, default=50_000, help="checkpoint period in steps")
    parser.add_argument("--learning_starts", type=int, default=10_000,
                        help="random-action steps before learning; when a checkpoint resumes without its replay "
                             "buffer, that many steps of its own policy refill the buffer instead (0: none, and "
                             "the first updates sample the few transitions collected so far)")
    parser.add_argument("--buffer_size", type=int, default=1_000_000,
                        help="replay buffer capacity of a new buffer: a first run's, or a resumed checkpoint's saved "
                             "without one, as experts/ ships them (a saved buffer keeps its own); each checkpoint "
                             "writes all of it: ~200-300 MB at 1M")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for SAC's updates: 1 leaves the other cores to other work (a second "
                             "thread on a busy machine made each step ~10x slower); on an otherwise idle 2-core "
                             "machine 2 threads ran ant-dir's expert 1.3-1.4x faster than 1")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


def collection_tasks(text: str) -> list[str]:
    """--tasks: a list as the stages take it, in which a family or an official suite stands for its tasks
    ("metaworld,ant_dir"); each task once, in the order given."""
    items = text.split(",")
    if not any(item in FAMILIES or item in suite_names() for item in items):
        return resolve_tasks(None, text, seed=0)  # names, or @file.json
    names: list[str] = []
    for item in items:
        if item in FAMILIES:
            names += [name for name, task in task_table().items() if task.family == item]
        elif item in suite_names():
            names += resolve_tasks(item, None, seed=0)
        else:
            names += resolve_tasks(None, item, seed=0)
    return list(dict.fromkeys(names))


def positive(name: str, value: int | float | None, minimum: int | float) -> None:
    """Raise CollectError when option --`name` is not a finite number, or is below `minimum` (None passes)."""
    if value is not None and not math.isfinite(value):
        raise CollectError(f"--{name} must be a finite number, got {value}")
    if value is not None and value < minimum:
        raise CollectError(f"--{name} must be at least {minimum}, got {value}")


def data_root(text: str) -> Path:
    """--out as a folder; CollectError for an empty one (it would write into the current directory unasked)."""
    if not text.strip():
        raise CollectError("--out is empty: give the data root folder")
    return Path(text)


def run_command(argv: list[str]) -> None:
    """Run `train-expert` (every named expert in turn) or a collection (then the table, and the Minari export with
    --format minari). Raises CollectError for a bad option value; SystemExit for one argparse rejects."""
    if argv and argv[0] == "train-expert":
        args = train_parser().parse_args(argv[1:])
        positive("steps", args.steps, 1)
        positive("save_every", args.save_every, 1)
        positive("learning_starts", args.learning_starts, 0)
        positive("buffer_size", args.buffer_size, 1)
        positive("threads", args.threads, 1)
        positive("seed", args.seed, 0)
        out = data_root(args.out)
        names = collection_tasks("dmc") if args.expert == "dmc" else [args.expert]
        for name in names:
            expert_task(name)  # validates the name before anything is built
        make_folder(out, "data root (--out)")  # before hours of training, not at the first checkpoint
        torch.set_num_threads(args.threads)  # SAC's 256x256 networks: see --threads for what more threads gain
        for name in names:  # each resumes from its own checkpoint, so a rerun skips the finished ones
            train_expert(name, args.steps, out, args.seed, args.save_every, args.learning_starts,
                         args.buffer_size, args.device)
        return
    args = collect_parser().parse_args(argv)
    positive("episodes", args.episodes, MIN_EPISODES)
    positive("noise", args.noise, 0.0)
    positive("workers", args.workers, 0)
    positive("max_steps", args.max_steps, 1)
    positive("seed", args.seed, 0)
    out = data_root(args.out)
    task_names = collection_tasks(args.tasks)
    if args.format == "minari":  # before anything is written: a bad namespace, a dataset of another collection
        from m3dt.minari_io import check_export, check_namespace

        check_namespace(args.minari_namespace)
        for name in task_names:
            task = get_task(name)
            check_export(task, args.minari_namespace,
                         task_settings(task, out, args.seed, args.noise, args.max_steps), args.episodes)
    make_folder(out, "data root (--out)")
    summary = collect(task_names, args.episodes, out, args.seed, args.noise, args.workers, args.max_steps)
    print_table(summary, task_names)
    if args.format == "minari":
        from m3dt.minari_io import export_collected_task

        for name in tqdm(task_names, desc="Minari datasets", dynamic_ncols=True):
            folder = export_collected_task(get_task(name), out / name, args.episodes, summary[name],
                                           args.minari_namespace)
        print(f"wrote {len(task_names)} Minari dataset(s) {args.minari_namespace}/{{task}}-v0 under {folder.parent}")


@command
def main(argv: list[str] | None = None) -> None:
    """`python -m m3dt.collect`: `run_command` on `argv` (default sys.argv[1:]); a bad request ends as one line and
    exit code 2 (SystemExit), a traceback with --debug."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_command(argv)
    except (CollectError, TaskError, DataError, ArtifactError) as error:
        exit_with_message(error, "--debug" in argv)


if __name__ == "__main__":
    main()

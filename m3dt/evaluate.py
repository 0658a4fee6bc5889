"""Evaluate a trained model in the real simulators with the protocol of the README's "Evaluation" section.

    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage 1          # Prompt-DT (the stage-1 backbone)
    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage 3 --grouping gradient --expert_num 48
    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage random   # the floor: uniform random actions
    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --method harmodt  # any method: --method prompt-dt (= --stage 1),
        # m3dt (= --stage 3), random, mtdt, harmodt, m3dt-end2end, m3dt-no-grouping (python -m m3dt.baselines)
    python -m m3dt.evaluate --config configs/demo.yaml --stage 3        # run dir, tasks, episodes... from the YAML

All (task, episode) rollouts advance in lockstep: at every env step, one batched model forward over all
live rollouts, then every env steps, spread over worker processes. Rollouts start together, so at step t
every live rollout's context is the same window of steps [t-K+1, t]: the context is plain slicing of one
history array, no per-rollout bookkeeping.

Per rollout: obs zero-padded to 39 and normalised with the task's training statistics; the higher-return
prompt of the task (fixed); return-to-go starting at the task's target / scale and decreased by
reward / scale after each step; the env receives the first act_dim dims of the predicted action, while the
context keeps all 8 predicted dims, as the reference does (`--context_actions masked` zeroes the dims beyond
act_dim, as the training data pads them).

With fewer episodes or steps than the protocol (`--episodes`, `--max_steps`) the evaluation is labelled as
not the full protocol in every output, and the return-based scores normalise the return of an episode cut
short per allowed step (return x horizon / steps allowed), so that it is scored on the scale of a full one
(an episode the env ended itself is complete: its return counts as it is); a Meta-World success counts
within the cut. Every input is checked before a worker starts, and an env that
fails in a worker reaches the user as one line naming the task and episode.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from m3dt.baselines import METHODS as BASELINES, load_baseline, method_module
from m3dt.cli import USER_ERRORS, command, exit_with_message
from m3dt.config import CHOICES, ArgumentParser, Config, ConfigError, check_values, field_comments, load_yaml
from m3dt.data import Batch
from m3dt.memory import evaluation_rows, free_memory
from m3dt.model import PromptDecisionTransformer, build_model
from m3dt.run import (ArtifactError, RunDir, atomic_path, check_inputs, file_hash, input_hashes, load_tensors,
                      make_folder, manifest_path, read_json, read_manifest, write_json)
from m3dt.scores import SCORE_AXIS, full_episode_return, score_axis_limits, task_score
from m3dt.tasks import (EPISODES_PER_FAMILY, FAMILIES, GYMNASIUM, MAX_ACT_DIM, MAX_OBS_DIM, MT1_GOALS, Task,
                        TaskError, UnknownTask, check_timesteps, get_task, names_hash, register_task_rows,
                        resolve_tasks, user_task_rows)
from m3dt.train import resolve_device
from m3dt.video import VideoError, video_path
from m3dt.workers import SPAWN, starting_workers

MAX_EPISODES_PER_FAMILY = {"metaworld": MT1_GOALS}  # episode e uses the e-th goal of an MT1 of 50 goals
FAMILY_NAMES = {"metaworld": "Meta-World", "dmc": "DMC", "ant_dir": "ant-dir", "cheetah_vel": "cheetah-vel",
                GYMNASIUM: "gymnasium"}
STAGE_METHODS = {"1": "prompt-dt", "3": "m3dt", "random": "random"}  # --stage values, aliases of --method
METHODS = ("prompt-dt", "m3dt", *BASELINES, "random")


def method_name(method: str) -> str:
    """The display name of a --method value (results.json "method")."""
    names = {"prompt-dt": "Prompt-DT", "m3dt": "M3DT", "random": "random policy"}
    return names[method] if method in names else method_module(method).NAME


class EnvFailure(RuntimeError):
    """An env that could not be built, reset or stepped, or a worker process that died; the message names
    the task and episode when it is known."""


@dataclass(frozen=True)
class Rollout:
    """One evaluation episode: its task, which of the run's tasks it is, and the episode number."""

    task: Task
    task_slot: int  # index of the task in the stage-1 statistics
    episode: int
    video: Path | None = None  # where its env worker writes the rollout's MP4 (--video)


# ------------------------------------------------------------------------------------------ environments
def _in_env(task_name: str, episode: int, what: str, call: Callable[[], Any]) -> Any:
    """`call()`, a failure of which becomes an EnvFailure naming the env (the simulators raise many types)."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001
        raise EnvFailure(f"{task_name} episode {episode}: {what} failed: {one_line(error)}") from error


def _build_env(task: Task, episode: int, seed: int, video: Path | None):
    """The env of a rollout (recording its video when `video` is a path). Workers get the Task itself, so
    that a user's own tasks need no registration there."""
    from m3dt.video import make_recorded_env

    return _in_env(task.name, episode, "building the env", lambda: make_recorded_env(task, episode, seed, video))


def one_line(error: BaseException) -> str:
    """An error as one line, its type and message (an env's failure in a worker, for the report)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _answer(envs: list, command: str, payload):
    """What `EnvPool` asks of a block of envs (in a worker or in this process)."""
    if command == "reset":
        return np.stack([_in_env(env.task.name, env.episode, "reset", env.reset) for env in envs])
    results = [_in_env(envs[i].task.name, envs[i].episode, "step", lambda: envs[i].step(action)) for i, action in payload]
    return [(observation, reward, done, info["success"]) for observation, reward, done, info in results]


def _worker(connection, rollouts: list[tuple[Task, int, Path | None]], seed: int) -> None:
    """Owns the envs of some rollouts; answers 'reset' and 'step' messages with ("ok", answer) until 'close',
    or with ("error", one line, traceback) once, when an env fails, and stops. Ctrl-C is the main process's to
    handle (one line); it then sends 'close'."""
    envs, finished = [], False
    try:
        envs = [_build_env(task, episode, seed, video) for task, episode, video in rollouts]
        while True:
            command, payload = connection.recv()
            if command in ("close", "abandon"):
                finished = command == "close"
                break
            connection.send(("ok", _answer(envs, command, payload)))
    except Exception as error:  # noqa: BLE001 - every failure goes back to the parent as a message
        connection.send(("error", str(error) if isinstance(error, EnvFailure) else one_line(error), traceback.format_exc()))
    finally:
        close_envs(envs, finished)
        connection.close()


def close_envs(envs: list, finished: bool) -> None:
    """Close every env; when the rollouts did not run to their end (an error, Ctrl-C) a recorded env deletes
    its video instead of keeping a cut one (m3dt/video.py)."""
    for env in envs:
        if finished or not hasattr(env, "abandon"):
            env.close()
        else:
            env.abandon()


class EnvPool:
    """The envs of all rollouts, in `workers` processes (0: in this process). Each worker owns a contiguous
    block of rollouts, so a task's episodes mostly share a worker (Meta-World builds its goal set once per
    task and process). Every env is seeded by its (task, episode), so results never depend on the workers."""

    def __init__(self, rollouts: list[Rollout], seed: int, workers: int):
        specs = [(rollout.task, rollout.episode, rollout.video) for rollout in rollouts]
        self.count = len(rollouts)
        self.workers = max(1, min(workers, self.count))
        self.local = workers <= 0
        if self.local:
            self.envs = [_build_env(task, episode, seed, video) for task, episode, video in specs]
            return
        self.connections, self.processes = [], []
        self.owner = np.arange(self.count) * self.workers // self.count  # rollout -> worker
        self.position = np.arange(self.count) - np.searchsorted(self.owner, self.owner)  # index within its worker
        for worker in range(self.workers):
            parent, child = SPAWN.Pipe()
            block = [spec for spec, owner in zip(specs, self.owner) if owner == worker]
            process = SPAWN.Process(target=_worker, args=(child, block, seed), daemon=True)
            with starting_workers():
                process.start()
            self.connections.append(parent)
            self.processes.append(process)

    def _ask(self, messages: list) -> list:
        """Send one message to each worker, then collect each answer; a worker's failure becomes EnvFailure."""
        for connection, message in zip(self.connections, messages):
            try:
                connection.send(message)
            except (BrokenPipeError, OSError):  # the worker stopped; its last message or EOF is read below
                pass
        answers = []
        for worker, connection in enumerate(self.connections):
            try:
                status, *answer = connection.recv()
            except EOFError:
                self.processes[worker].join(timeout=5)
                raise EnvFailure(f"env worker {worker} stopped (exit code {self.processes[worker].exitcode}); "
                                 "out of memory? --max_rollouts runs the rollouts in smaller waves") from None
            if status == "error":
                failure = EnvFailure(answer[0])
                failure.add_note(f"in env worker {worker}:\n{answer[1]}")  # shown with --debug
                raise failure
            answers.append(answer[0])
        return answers

    def reset(self) -> np.ndarray:
        """Reset every env: the first observations (count, 39), padded, in rollout order."""
        if self.local:
            return _answer(self.envs, "reset", None)
        observations = np.zeros((self.count, MAX_OBS_DIM), dtype=np.float32)
        for worker, answer in enumerate(self._ask([("reset", None)] * self.workers)):
            observations[self.owner == worker] = answer
        return observations

    def step(self, live: np.ndarray, actions: list[np.ndarray]) -> list[tuple[np.ndarray, float, bool, bool]]:
        """Step the rollouts `live` (indices) with `actions` (one per live rollout), in `live` order."""
        if self.local:
            return _answer(self.envs, "step", list(zip(live, actions)))
        messages = [[] for _ in range(self.workers)]
        for rollout, action in zip(live, actions):
            messages[self.owner[rollout]].append((self.position[rollout], action))
        answers = [iter(answer) for answer in self._ask([("step", message) for message in messages])]
        return [next(answers[self.owner[rollout]]) for rollout in live]

    def close(self, finished: bool = True) -> None:
        """Close every env; `finished`: the rollouts ran to their end (else videos are not kept)."""
        if self.local:
            close_envs(self.envs, finished)
            return
        for connection in self.connections:
            try:
                connection.send(("close" if finished else "abandon", None))
            except (BrokenPipeError, OSError):  # a worker that failed has closed its end
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


# ------------------------------------------------------------------------------------------ model
def method_files(run: RunDir, method: str, grouping: str, expert_num: int) -> tuple[Path, Path, str]:
    """The artifact a method's evaluation reads (its manifest lists the trained tasks and the data), the data
    statistics file that goes with it, and what to call the artifact in messages. The random policy needs
    only the statistics: stage 1's, or a comparison method's in a run directory without stage 1."""
    if method in BASELINES:
        return run.baseline_model(method), run.baseline_data_stats(method), f"{method_name(method)} model"
    if method == "m3dt":
        check_stage3_model(run, grouping, expert_num)
        return run.moe(grouping, expert_num), run.data_stats, "stage-3 model"
    if method == "random" and not run.backbone.exists():
        for baseline in BASELINES:
            if run.baseline_model(baseline).exists():
                return run.baseline_model(baseline), run.baseline_data_stats(baseline), f"{method_name(baseline)} model"
    return run.backbone, run.data_stats, "stage-1 backbone"


def check_stage3_model(run: RunDir, grouping: str, expert_num: int) -> None:
    """ArtifactError when the run has no stage-3 model of this grouping and expert count, naming those it has
    (--expert_num defaults to the paper's 48, which a smaller run may not have)."""
    if run.moe(grouping, expert_num).exists():
        return
    found = [path.parent.name.rsplit("_", 1) for path in sorted(run.root.glob("stage3/*/moe.safetensors"))]
    present = ("; this run has " + ", ".join(f"--grouping {name} --expert_num {count}" for name, count in found)
               if found else "; this run has none yet (stage3_router_train.py writes it)")
    raise ArtifactError(f"{run.moe(grouping, expert_num)}: stage-3 model does not exist{present}")


def load_policy(run: RunDir, method: str | int, grouping: str, expert_num: int) -> tuple[torch.nn.Module, dict]:
    """The trained model of a method (or --stage value), built from what its manifest says (eval mode)."""

    method = STAGE_METHODS.get(str(method), method)
    if method in BASELINES:
        return load_baseline(run, method)
    artifact, _, what = method_files(run, method, grouping, expert_num)
    manifest = read_manifest(artifact, what)
    if method == "m3dt":  # the statistics evaluation uses are stage 1's: the model must sit on that backbone
        check_inputs(manifest, input_hashes([run.backbone], run.root), artifact)
    config = manifest["config"]
    model = build_model(config, dropout=0.0)
    if method == "m3dt":
        model.install_experts(manifest["num_experts"], routed=True, top_k=manifest.get("top_k", 0))
    try:
        model.load_state_dict(load_tensors(artifact, what))
    except RuntimeError as error:
        raise ArtifactError(f"{artifact}: does not fit the model its manifest describes ({str(error).splitlines()[0]})") from None
    return model.eval(), manifest


@dataclass
class Statistics:
    """What evaluation needs from the training data (written by the training stage), indexed by task slot."""

    state_mean: np.ndarray
    state_std: np.ndarray
    prompts: dict[str, torch.Tensor]


def load_statistics(source: RunDir | Path) -> Statistics:
    """A run directory's stage-1 statistics, checked to be the file stage 1 wrote with its backbone, or a
    statistics file (a comparison method's)."""
    path = source
    if isinstance(source, RunDir):
        run = source
        recorded = read_manifest(run.backbone, "stage-1 backbone").get("data_stats_sha256")
        if recorded is not None and run.data_stats.is_file() and file_hash(run.data_stats) != recorded:
            raise ArtifactError(f"{run.data_stats}: not the data statistics stage 1 wrote with {run.backbone.name} "
                                "(another sha256 than its manifest records); rerun stage 1")
        path = run.data_stats
    tensors = load_tensors(path, "data statistics")
    prompts = {key.removeprefix("prompt_"): value for key, value in tensors.items() if key.startswith("prompt_")}
    return Statistics(tensors["state_mean"].numpy(), tensors["state_std"].numpy(), prompts)


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class History:
    """Every rollout's trajectory so far, one row per rollout, one column per step."""

    states: np.ndarray  # (rollouts, steps, 39), normalised
    actions: np.ndarray  # (rollouts, steps, 8)
    returns_to_go: np.ndarray  # (rollouts, steps), scaled


class ModelPolicy:
    """The trained model: one forward over the live rollouts with the context window [t-K+1, t], left-padded
    with zeros (the reference pads evaluation contexts with normalised state 0 and action 0; padded steps
    are masked either way) and each task's fixed higher-return prompt.

    The prompt tokens' keys and values are computed once per task (PromptCache: exact, since prompts come
    first and attention is causal), and the live rollouts go through the model in chunks of at most
    `eval_rows` rows (None: all in one forward; evaluate() picks what fits in half the device's free memory
    by m3dt/memory.py's count), so that an MT160 evaluation at 48 experts fits a small GPU; chunks change
    nothing but the peak memory."""

    def __init__(self, model: torch.nn.Module, statistics: Statistics, rollouts: list[Rollout],
                 context_length: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 eval_rows: int | None = None):
        self.model, self.context_length, self.device, self.dtype = model, context_length, device, dtype
        slots, task_of_rollout = torch.unique(torch.tensor([rollout.task_slot for rollout in rollouts]),
                                              return_inverse=True)
        self.slots, self.task_of_rollout = slots.to(device), task_of_rollout.to(device)  # run's task index, per task
        self.prompt = {key: value[slots].to(device, dtype if value.is_floating_point() else value.dtype)
                       for key, value in statistics.prompts.items()}
        # Our transformer with prompt embeddings takes the cache; other policies (MTDT has no prompt, HarmoDT
        # masks the weights per task) the plain forward.
        cached = isinstance(model, PromptDecisionTransformer) and model.embed_prompt is not None
        prompt = self.prompt
        self.cache = model.cache_prompt(prompt["states"], prompt["actions"], prompt["returns_to_go"],
                                        prompt["timesteps"], prompt["mask"]) if cached else None
        self.eval_rows = eval_rows or len(rollouts)

    @torch.no_grad()
    def __call__(self, history: History, live: np.ndarray, t: int) -> np.ndarray:
        start = max(0, t + 1 - self.context_length)
        padding = self.context_length - (t + 1 - start)
        rows = len(live)

        def window(array: np.ndarray) -> torch.Tensor:
            padded = np.zeros((rows, self.context_length, *array.shape[2:]), dtype=np.float32)
            padded[:, padding:] = array[live, start : t + 1]
            return torch.from_numpy(padded).to(self.device, self.dtype)

        timesteps = np.zeros((rows, self.context_length), dtype=np.int64)
        timesteps[:, padding:] = np.arange(start, t + 1)
        mask = torch.zeros(rows, self.context_length, device=self.device, dtype=self.dtype)
        mask[:, padding:] = 1.0
        tasks = self.task_of_rollout[torch.from_numpy(live).to(self.device)]
        prompt = {key: value[tasks] for key, value in self.prompt.items()}
        batch = Batch(
            states=window(history.states), actions=window(history.actions),
            returns_to_go=window(history.returns_to_go[..., None]), timesteps=torch.from_numpy(timesteps).to(self.device),
            mask=mask, prompt_states=prompt["states"], prompt_actions=prompt["actions"],
            prompt_returns_to_go=prompt["returns_to_go"], prompt_timesteps=prompt["timesteps"],
            prompt_mask=prompt["mask"], action_mask=torch.ones(rows, 1, MAX_ACT_DIM, device=self.device, dtype=self.dtype),
            task_index=self.slots[tasks],
        )
        actions = []
        for first in range(0, rows, self.eval_rows):
            chunk = slice(first, first + self.eval_rows)
            cache = {} if self.cache is None else {"prompt_cache": self.cache.select(tasks[chunk])}
            predicted = self.model(batch.rows(chunk), last_step_only=True, **cache)
            actions.append(predicted[:, -1].float().cpu())
        return torch.cat(actions).numpy()


class RandomPolicy:
    """Uniform random actions in [-1, 1]: the floor the learned policies are compared against."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, history: History, live: np.ndarray, t: int) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(len(live), MAX_ACT_DIM)).astype(np.float32)


def run_rollouts(policy: Callable[[History, np.ndarray, int], np.ndarray], statistics: Statistics,
                 rollouts: list[Rollout], seed: int, workers: int, max_steps: int | None,
                 context_actions: str = "full") -> dict[str, np.ndarray]:
    """All rollouts in lockstep. Returns per rollout: return, success (any step), steps, ended (the env ended
    the episode itself, before the horizon or --max_steps), and the actions
    (rollouts, steps, 8) the context held: all 8 predicted dims ("full", the reference) or those beyond the
    task's act_dim zeroed ("masked"). The env receives the first act_dim dims either way."""
    count = len(rollouts)
    horizons = np.array([rollout.task.horizon for rollout in rollouts])
    if max_steps:
        horizons = np.minimum(horizons, max_steps)
    longest = int(horizons.max())
    slots = np.array([rollout.task_slot for rollout in rollouts])
    act_dims = np.array([rollout.task.act_dim for rollout in rollouts])
    mean, std = statistics.state_mean[slots], statistics.state_std[slots]
    scales = np.array([rollout.task.rtg_scale for rollout in rollouts], dtype=np.float32)
    history = History(
        states=np.zeros((count, longest, MAX_OBS_DIM), dtype=np.float32),
        actions=np.zeros((count, longest, MAX_ACT_DIM), dtype=np.float32),
        returns_to_go=np.zeros((count, longest), dtype=np.float32),
    )
    history.returns_to_go[:, 0] = [rollout.task.return_target / rollout.task.rtg_scale for rollout in rollouts]
    total_return = np.zeros(count)
    success = np.zeros(count, dtype=bool)
    steps = np.zeros(count, dtype=np.int64)
    ended = np.zeros(count, dtype=bool)
    alive = np.ones(count, dtype=bool)

    pool = EnvPool(rollouts, seed, workers)
    finished = False
    try:
        history.states[:, 0] = (pool.reset() - mean) / std
        for t in tqdm(range(longest), desc="rollout steps", dynamic_ncols=True):
            live = np.flatnonzero(alive)
            if len(live) == 0:
                break
            predicted = policy(history, live, t)
            if context_actions == "masked":
                predicted[np.arange(MAX_ACT_DIM)[None, :] >= act_dims[live, None]] = 0.0  # as the data pads actions
            history.actions[live, t] = predicted
            results = pool.step(live, [predicted[i, : act_dims[rollout]] for i, rollout in enumerate(live)])
            for rollout, (observation, reward, done, succeeded) in zip(live, results):
                total_return[rollout] += reward
                success[rollout] |= succeeded
                steps[rollout] = t + 1
                ended[rollout] = done
                if done or t + 1 >= horizons[rollout]:
                    alive[rollout] = False
                else:
                    history.states[rollout, t + 1] = (observation - mean[rollout]) / std[rollout]
                    history.returns_to_go[rollout, t + 1] = history.returns_to_go[rollout, t] - reward / scales[rollout]
        finished = True
    finally:
        pool.close(finished)
    return {"returns": total_return, "success": success, "steps": steps, "ended": ended, "actions": history.actions}


# ------------------------------------------------------------------------------------------ results
def allowed_steps(task: Task, max_steps: int | None) -> int:
    """The steps an episode of `task` may run: its horizon, or fewer with `--max_steps`."""
    return min(task.horizon, max_steps or task.horizon)


def is_full_protocol(task: Task, episodes: int, max_steps: int | None) -> bool:
    """Whether `task` got the protocol's episodes for its family and its whole horizon."""
    return episodes == EPISODES_PER_FAMILY[task.family] and allowed_steps(task, max_steps) == task.horizon


def describe_protocol(tasks: list[Task], episodes: int | None, max_steps: int | None) -> dict[str, Any]:
    """results.json's "protocol": whether every task got the protocol's episodes and its whole horizon, and
    if not, one sentence saying how this evaluation differs."""
    families = list(dict.fromkeys(task.family for task in tasks))
    differences = []
    other_counts = [family for family in families if episodes is not None and episodes != EPISODES_PER_FAMILY[family]]
    if other_counts:
        protocol = ", ".join(f"{FAMILY_NAMES[family]} {EPISODES_PER_FAMILY[family]}" for family in other_counts)
        differences.append(f"{episodes} episode(s) per task instead of the protocol's ({protocol})")
    cut = [task for task in tasks if allowed_steps(task, max_steps) < task.horizon]
    if cut:
        horizons = "/".join(str(horizon) for horizon in sorted({task.horizon for task in cut}))
        scoring = []
        if any(task.family != "metaworld" for task in cut):
            scoring.append(f"returns of cut episodes scaled by horizon / {max_steps} before normalisation, an "
                           "extrapolation that is high where reward comes early, as in a task that starts balanced")
        if any(task.family == "metaworld" for task in cut):
            scoring.append(f"Meta-World success within {max_steps} steps")
        differences.append(f"episodes cut at {max_steps} of {horizons} steps ({'; '.join(scoring)})")
    note = f"Not the full evaluation protocol: {'; '.join(differences)}." if differences else None
    return {"full": not differences, "episodes": episodes, "max_steps": max_steps, "note": note}


def summarise(rollouts: list[Rollout], outcome: dict[str, np.ndarray], max_steps: int | None) -> dict:
    """Per-task scores (the protocol's normalisation), per-family and total unweighted means over tasks."""
    per_task: dict[str, dict] = {}
    for name in dict.fromkeys(rollout.task.name for rollout in rollouts):
        indices = [i for i, rollout in enumerate(rollouts) if rollout.task.name == name]
        task = rollouts[indices[0]].task
        returns = outcome["returns"][indices].tolist()
        successes = outcome["success"][indices].tolist()
        steps = allowed_steps(task, max_steps)
        full_returns = [full_episode_return(outcome["returns"][i], int(outcome["steps"][i]), task.horizon,
                                            bool(outcome["ended"][i])) for i in indices]
        per_task[name] = {
            "family": task.family,
            "score": task_score(task, full_returns, successes),
            "return_mean": float(np.mean(returns)),
            "success_rate": float(np.mean(successes)) if task.family == "metaworld" else None,
            "episodes": len(indices),
            "max_steps": steps,
            "full_protocol": is_full_protocol(task, len(indices), max_steps),
            "steps_mean": float(outcome["steps"][indices].mean()),
            "reference_score": task.single_task_score,
            # per episode: its return, its steps, whether the env ended it (then its return is not scaled)
            "episode_returns": [float(outcome["returns"][i]) for i in indices],
            "episode_steps": [int(outcome["steps"][i]) for i in indices],
            "episode_ended": [bool(outcome["ended"][i]) for i in indices],
        }
    families = {}
    for family in dict.fromkeys([*FAMILIES, *(row["family"] for row in per_task.values())]):
        scores = [row["score"] for row in per_task.values() if row["family"] == family]
        references = [row["reference_score"] for row in per_task.values() if row["family"] == family]
        if scores:
            families[family] = {"score": float(np.mean(scores)), "reference_score": mean_reference(references),
                                "tasks": len(scores)}
    total = float(np.mean([row["score"] for row in per_task.values()]))
    reference_total = mean_reference([row["reference_score"] for row in per_task.values()])
    return {"tasks": per_task, "families": families, "total": {"score": total, "reference_score": reference_total,
                                                               "tasks": len(per_task)}}


def describe_method(results: dict) -> str:
    """'M3DT (gradient grouping, 48 experts)', 'Prompt-DT', ..."""
    if results["grouping"] is None:
        return results["method"]
    return f"{results['method']} ({results['grouping']} grouping, {results['num_experts']} experts)"


def describe_settings(results: dict, family: str | None = None) -> str:
    """What was evaluated, and how: the first lines of table.md and the plots' titles (with `family`: of that
    family's tasks only, as its plot shows them)."""
    protocol = results["protocol"]
    rows = [row for row in results["tasks"].values() if family in (None, row["family"])]
    counts = sorted({row["episodes"] for row in rows})
    episodes = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    episodes += " episode(s)/task" + (" (the protocol's)" if protocol["episodes"] is None else "")
    steps = "full horizons" if protocol["max_steps"] is None else f"at most {protocol['max_steps']} steps"
    context = "" if results.get("method_id") == "random" else f", context actions {results['context_actions']}"
    return (f"run {Path(results['run_dir']).name}, {len(rows)} task(s), {episodes}, {steps}, "
            f"seed {results['seed']}{context}")  # the random policy reads no context


def mean_reference(references: list[float | None]) -> float | None:
    """The mean single-task reference score, or None when a task has none (a user's own task)."""
    return None if None in references else float(np.mean(references))


def reference_text(reference: float | None) -> str:
    """The paper's single-task DT score as a table cell ("-" for a task it does not score)."""
    return "-" if reference is None else f"{reference:.2f}"


def reference_label(task_names: list[str], own_tasks: set[str]) -> str:
    """What the reference score beside ours over `task_names` is: the paper's single-task DT for MT160 tasks,
    the single_task_score column of the task table for tasks of one's own (`own_tasks`, of any family)."""
    own = [name in own_tasks for name in task_names]
    if all(own):
        return "single-task score (your task table's)"
    return "single-task DT (paper, full protocol" + ("; own tasks: your task table's)" if any(own) else ")")


def own_task_names(results: dict) -> set[str]:
    """The tasks of one's own (`--task_table`) among an evaluation's: those its `user_tasks` defines, and its
    gymnasium tasks (results written before evaluations recorded `user_tasks` have only those)."""
    return ({row["task"] for row in results.get("user_tasks", [])}
            | {name for name, row in results["tasks"].items() if row["family"] == GYMNASIUM})


def markdown_table(results: dict) -> str:
    """table.md of an evaluation: what was evaluated and how, whether it was the full protocol, and the
    mean score per family beside the paper's single-task DT."""
    protocol = results["protocol"]
    status = "Full evaluation protocol." if protocol["full"] else (
        f"**{protocol['note']}** These scores are not comparable with the paper's.")
    method = results["method"] + ("" if protocol["full"] else " (not full protocol)")
    memorised = memorised_goals(results.get("shared_goals"))
    if memorised:
        status += f" **{memorised}: these scores measure memorisation.**"
    lines = [f"{describe_method(results)}: {describe_settings(results)}.", "", status, "",
             f"| family | tasks | {method}: score | {reference_label(list(results['tasks']), own_task_names(results))} |", "|---|---|---|---|"]
    for family, row in results["families"].items():
        lines.append(f"| {family} | {row['tasks']} | {row['score']:.2f} | {reference_text(row['reference_score'])} |")
    total = results["total"]
    reference = reference_text(total["reference_score"])
    lines.append(f"| **total** | {total['tasks']} | **{total['score']:.2f}** | {reference} |")
    lines += ["", score_note(results)]
    if results.get("videos"):
        lines += ["", "Videos: " + ", ".join(f"[{Path(path).stem}]({path})" for paths in results["videos"].values()
                                            for path in paths)]
    return "\n".join(lines)


def score_note(results: dict) -> str:
    """What the scores of `results` are: per family, the scale of a task's score, and the seed."""
    return ("Scores (per task, averaged over its episodes): " + "; ".join(
        f"{family}: {SCORE_AXIS[family]}" for family in results["families"]) + "; a family's and the total "
        f"score: the mean over tasks. Seed {results['seed']}.")


def write_results(out_dir: Path, results: dict) -> None:
    """Write an evaluation's results.json, results.csv (one row per task: score, mean return, success rate
    as a fraction, episodes, steps per episode, whether it was the full protocol, the paper's single-task DT
    score, the evaluation seed), table.md and the per-family plots. results.json comes last: where it stands, the
    other outputs are whole (a grid takes it as the evaluation done)."""
    columns = ["task", "family", "score", "return_mean", "success_rate", "episodes", "max_steps", "full_protocol",
               "reference_score", "seed"]
    with atomic_path(out_dir / "results.csv") as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            for name, row in results["tasks"].items():
                writer.writerow([name, row["family"], f"{row['score']:.4f}", f"{row['return_mean']:.4f}",
                                 "" if row["success_rate"] is None else f"{row['success_rate']:.4f}",
                                 row["episodes"], row["max_steps"], row["full_protocol"],
                                 "" if row["reference_score"] is None else row["reference_score"], results["seed"]])
    with atomic_path(out_dir / "table.md") as temporary:
        temporary.write_text(markdown_table(results) + "\n")
    plot_families(out_dir, results)
    write_json(out_dir / "results.json", results)


def plot_families(out_dir: Path, results: dict) -> None:
    """One bar chart per family: our score per task, with the single-task reference as a marker; the title
    names the method, run and settings, and says when the evaluation was not the full protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = results["protocol"]["full"]
    for family in results["families"]:
        rows = [(name, row) for name, row in results["tasks"].items() if row["family"] == family]
        figure, axes = plt.subplots(figsize=(max(7.0, 0.32 * len(rows) + 2), 4.6))
        positions = np.arange(len(rows))
        scores = [row["score"] for _, row in rows]
        axes.bar(positions, scores, color="tab:blue" if full else "tab:orange",
                 label=results["method"] + ("" if full else " (not full protocol)"))
        referenced = [(position, row["reference_score"]) for position, (_, row) in zip(positions, rows)
                      if row["reference_score"] is not None]
        if referenced:
            axes.scatter(*zip(*referenced), color="black", marker="_", s=200,
                         label=reference_label([name for name, _ in rows], own_task_names(results)), zorder=3)
        axes.set_xticks(positions, [name for name, _ in rows], rotation=75, ha="right", fontsize=7)
        axes.set_xlim(-0.6, len(rows) - 0.4)
        bottom, top = score_axis_limits(scores + [score for _, score in referenced])
        axes.set_ylim(bottom, top * 1.25)  # the band above 100 holds the legend, clear of the markers at 100
        axes.set_yticks(np.arange(20 * np.floor(bottom / 20), top + 1, 20))
        if bottom < 0:
            axes.axhline(0, color="black", linewidth=0.8)
        cut = results["protocol"]["max_steps"] is not None and family != "metaworld"
        axes.set_ylabel(SCORE_AXIS[family] + ("\n(a cut episode: return x horizon / steps)" if cut else ""))
        axes.grid(axis="y", alpha=0.3)
        settings = textwrap.fill(describe_settings(results, family), width=int(figure.get_figwidth() * 14))
        axes.set_title(f"{describe_method(results)} on {FAMILY_NAMES[family]}: mean "
                       f"{results['families'][family]['score']:.1f}\n{settings}", fontsize=9)
        if not full:
            figure.text(0.5, 0.005, "NOT the full evaluation protocol: not comparable with the paper's numbers",
                        ha="center", va="bottom", color="tab:red", fontsize=9)
        axes.legend(fontsize=8, loc="upper center", ncol=2, framealpha=0.9)
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        with atomic_path(out_dir / f"scores_{family}.png") as temporary:
            figure.savefig(temporary, format="png", dpi=120)
        plt.close(figure)


# ------------------------------------------------------------------------------------------ what is evaluated
def check_options(episodes: int | None, max_steps: int | None, workers: int | None, max_rollouts: int | None,
                  seed: int | None, context_actions: str, eval_rows: int | None = None) -> None:
    """The evaluation's numbers and choices, before anything is read or started."""
    for name, value, minimum in (("episodes", episodes, 1), ("max_steps", max_steps, 1), ("workers", workers, 0),
                                 ("max_rollouts", max_rollouts, 1), ("seed", seed, 0), ("eval_rows", eval_rows, 1)):
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} must be at least {minimum}, got {value}")
    if seed is not None and seed >= 2**32:
        raise ConfigError(f"--seed must be below 2**32 (it seeds numpy and Meta-World), got {seed}")
    if context_actions not in CHOICES["context_actions"]:
        raise ConfigError(f"--context_actions must be one of {', '.join(CHOICES['context_actions'])}, "
                          f"got {context_actions!r}")


def check_episodes(task_names: list[str], episodes: int | None) -> None:
    """Families with a limited set of evaluation episodes (Meta-World: the 50 goals of a seeded MT1)."""
    for family, limit in MAX_EPISODES_PER_FAMILY.items():
        over = [name for name in task_names if get_task(name).family == family]
        if episodes is not None and episodes > limit and over:
            raise ConfigError(f"--episodes {episodes}: {FAMILY_NAMES[family]} evaluation has {limit} goals per task "
                              f"and seed (metaworld.MT1; {over[0]}); use at most {limit}, or another --seed for others")


def open_run(run_dir: str, method: str, grouping: str, expert_num: int) -> tuple[RunDir, dict, Path]:
    """The run directory, the manifest of what `method` evaluates (the task list and the data it was trained
    on) and the data statistics that go with it."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ArtifactError(f"{run.root}: run directory does not exist")
    artifact, statistics_file, what = method_files(run, method, grouping, expert_num)
    return run, read_manifest(artifact, what), statistics_file


def register_run_tasks(run_dir: str, method: str, grouping: str, expert_num: int) -> int:
    """Make a run's own tasks (README "Your own tasks") known by name, from the manifest of the artifact that
    `method` evaluates (stage 1's and every comparison method's record them; a stage-3 model was trained
    on its stage-1 backbone's tasks), and return the run's training seed that manifest records. Nothing
    (seed 0) when that manifest is absent: open_run then says so."""
    run = RunDir(run_dir)
    artifact, _, what = method_files(run, method, grouping, expert_num)
    if method == "m3dt":
        artifact, what = run.backbone, "stage-1 backbone"
    path = manifest_path(artifact)
    if not path.is_file():
        return 0
    manifest = read_json(path, f"manifest of the {what}")
    register_task_rows(manifest.get("user_tasks", []), str(path))
    return manifest.get("config", {}).get("seed", 0)


def shared_training_goals(trained_manifest: dict, rollouts: list[Rollout], seed: int) -> dict | None:
    """How many Meta-World evaluation goals are also goals of the run's training data, from the collect.json
    (m3dt.collect) of the data the model was trained on: its "mt1_goals" blocks say that the data holds goals 0..n-1 of
    metaworld.MT1(task, seed=s), and evaluation episode e uses goal e of MT1(task, seed=--seed). None when
    the data has no collect.json recording them (a dataset from elsewhere, or an older collection). The
    other families share their goal with the data by design (ant-dir's direction, cheetah-vel's velocity
    are the task; a DMC task has none)."""
    summary_path = Path(trained_manifest.get("config", {}).get("data_path", "")) / "collect.json"
    if not summary_path.is_file():
        return None
    try:
        summary = read_json(summary_path, "collection summary")
    except ArtifactError:
        return None
    episodes = {}
    for rollout in rollouts:
        if rollout.task.family == "metaworld":
            episodes[rollout.task.name] = episodes.get(rollout.task.name, 0) + 1
    recorded = {name: summary[name]["mt1_goals"] for name in episodes if "mt1_goals" in summary.get(name, {})}
    if not recorded:
        return None
    shared = {name: sum(min(block["goals"], episodes[name]) for block in blocks if block["seed"] == seed)
              for name, blocks in recorded.items()}
    return {"collect_json": str(summary_path), "evaluation_goals": sum(episodes[name] for name in recorded),
            "shared": sum(shared.values()), "tasks": {name: count for name, count in shared.items() if count}}


def memorised_goals(shared: dict | None) -> str:
    """What shared_training_goals found, in words ("" when no evaluation goal was a goal of the training data):
    the console's warning, table.md and the report say it."""
    if not shared or not shared.get("shared"):
        return ""
    return f"{shared['shared']} of {shared['evaluation_goals']} Meta-World evaluation goals are goals of the training data"


def checkpoint_identity(run: RunDir, artifact: Path) -> dict[str, str]:
    """The evaluated checkpoint's path in the run directory and its sha256 (results.json's record of it)."""
    return {"path": str(artifact.relative_to(run.root)), "sha256": file_hash(artifact)}


def subset_name(chosen: list[str], trained: list[str], prefix_name: str | None, tasks: str | None) -> str:
    """How an evaluation's folder names the tasks it covers: "" for the run's own task list, the suite's name
    (`--prefix_name mt10`) for an official suite, else "tasks{N}-{hash of the names}"."""
    if chosen == trained:
        return ""
    if prefix_name and not tasks:
        return prefix_name
    return f"tasks{len(chosen)}-{names_hash(chosen)}"


def output_label(method: str, grouping: str, expert_num: int, protocol: dict, context_actions: str, seed: int,
                 run_seed: int, tasks: str = "") -> str:
    """The folder under eval/: the method, then what differs from the protocol, the faithful defaults, the
    run's own tasks (`tasks`: "" for all of them, else what names the subset) and the run's own seed
    (`run_seed`, its training seed), so that a quick check, an evaluation of some of the tasks or one with
    another --seed never overwrites the evaluation of the protocol."""
    label = {"prompt-dt": "stage1", "m3dt": f"stage3_{grouping}_{expert_num}"}.get(method, method)
    if tasks:
        label += f"_{tasks}"
    if not protocol["full"]:
        label += "".join(f"_{name}{protocol[name]}" for name in ("episodes", "max_steps") if protocol[name] is not None)
    if context_actions != "full":
        label += f"_context-{context_actions}"
    if seed != run_seed:
        label += f"_seed{seed}"
    return label.replace("max_steps", "steps")


# ------------------------------------------------------------------------------------------ CLI
@dataclass
class EvaluatedPolicy:
    """What an evaluation rolls out: a trained model on its device, or the random policy (`model` None)."""

    model: torch.nn.Module | None = None
    device: torch.device | None = None
    context_length: int = 0
    eval_rows: int | None = None  # rollouts per forward (--eval_rows, or sized to the device's free memory)
    num_experts: int = 0
    checkpoint: dict[str, str] | None = None  # checkpoint_identity of the evaluated artifact

    def for_wave(self, wave: list[Rollout], statistics: Statistics, seed: int) -> ModelPolicy | RandomPolicy:
        """The policy acting for one wave of rollouts."""
        if self.model is None:
            return RandomPolicy(seed)
        return ModelPolicy(self.model, statistics, wave, self.context_length, self.device, eval_rows=self.eval_rows)


def check_video_envs(tasks: list[Task]) -> None:
    """--video renders the MuJoCo scene of each env: a gymnasium task whose env is not a MuJoCo one stops the
    evaluation here (TaskError), before its folder is made and anything runs. MT160's envs are all MuJoCo."""
    from m3dt.envs import make_env

    for task in (task for task in tasks if task.env_id is not None):
        env = make_env(task)
        try:
            env.physics()
        finally:
            env.close()


def load_evaluated_policy(run: RunDir, method: str, grouping: str, expert_num: int, device: str, chosen: list[str],
                          statistics: Statistics, eval_rows: int | None) -> EvaluatedPolicy:
    """Load `method`'s trained model onto `device` (nothing for "random"), check that its timestep table
    covers the `chosen` tasks' horizons and size its forwards. Raises ConfigError for an unusable device,
    ArtifactError for a missing or mismatched artifact."""
    if method == "random":
        return EvaluatedPolicy()
    torch_device = resolve_device(device)
    model, manifest = load_policy(run, method, grouping, expert_num)
    check_timesteps(manifest["config"]["max_timestep"], chosen)
    model.to(torch_device)
    context_length = manifest["config"]["context_length"]
    if isinstance(model, PromptDecisionTransformer) and not eval_rows:
        prompt_length = statistics.prompts["timesteps"].shape[1]
        eval_rows = evaluation_rows(model, context_length, prompt_length, free_memory(torch_device)[0])
    return EvaluatedPolicy(model, torch_device, context_length, eval_rows, manifest.get("num_experts", 0),
                           checkpoint_identity(run, run.root / manifest["artifact"]))


def evaluate(run_dir: str, method: str, grouping: str = "gradient", expert_num: int = 48, prefix_name: str | None = None,
             tasks: str | None = None, episodes: int | None = None, max_steps: int | None = None, workers: int | None = None,
             seed: int | None = None, device: str = "auto", max_rollouts: int | None = None, context_actions: str = "full",
             eval_rows: int | None = None, video: int = 0) -> dict:
    """Evaluate `method` (one of METHODS, or a --stage value: "1" Prompt-DT, "3" M3DT, "random"); write and
    return the results.
    Every input is checked (ConfigError, TaskError, ArtifactError) before an env is built; a failing env
    raises EnvFailure. `seed` None: the run's training seed (from the evaluated artifact's manifest), as the
    protocol evaluates a run. `video` K > 0 records the first K episodes of every task as MP4 files
    (m3dt/video.py; VideoError when nothing renders here)."""
    check_options(episodes, max_steps, workers, max_rollouts, seed, context_actions, eval_rows)
    if video < 0:
        raise ConfigError(f"--video must be at least 0, got {video}")
    method = STAGE_METHODS.get(method, method)
    training_seed = register_run_tasks(run_dir, method, grouping, expert_num)
    seed = training_seed if seed is None else seed  # the protocol evaluates a run with its own seed
    try:
        asked = resolve_tasks(prefix_name, tasks, seed) if (prefix_name or tasks) else None
    except UnknownTask as error:  # a typo in --tasks: say which tasks the model knows, when the run is there
        with contextlib.suppress(ArtifactError):
            manifest = open_run(run_dir, method, grouping, expert_num)[1]
            trained = manifest["tasks"]
            shown = ", ".join(trained[:8]) + (f" and {len(trained) - 8} more" if len(trained) > 8 else "")
            raise TaskError(f"unknown task '{error.name}': {Path(run_dir) / manifest['artifact']} was trained on "
                            f"{len(trained)} tasks: {shown}") from None
        raise
    check_episodes(asked or [], episodes)
    run, trained_manifest, statistics_file = open_run(run_dir, method, grouping, expert_num)
    trained = trained_manifest["tasks"]
    chosen = asked or trained
    check_episodes(chosen, episodes)
    untrained = [name for name in chosen if name not in trained]
    if untrained:
        shown = ", ".join(untrained[:3]) + (f" and {len(untrained) - 3} more" if len(untrained) > 3 else "")
        raise ArtifactError(f"{trained_manifest['artifact']}: the model was not trained on {len(untrained)} of the "
                            f"{len(chosen)} tasks asked for: {shown}")
    protocol = describe_protocol([get_task(name) for name in chosen], episodes, max_steps)
    if video:
        check_video_envs([get_task(name) for name in chosen])
    out_dir = run.root / "eval" / output_label(method, grouping, expert_num, protocol, context_actions, seed,
                                               training_seed, subset_name(chosen, trained, prefix_name, tasks))
    make_folder(out_dir, "evaluation folder")  # before the rollouts, whose results it is to hold
    rollouts = [Rollout(get_task(name), trained.index(name), episode,
                        video_path(out_dir / "videos", name, episode) if episode < video else None)
                for name in chosen
                for episode in range(episodes or EPISODES_PER_FAMILY[get_task(name).family])]
    statistics = load_statistics(run if statistics_file == run.data_stats else statistics_file)
    if len(statistics.state_mean) != len(trained):
        raise ArtifactError(f"{statistics_file}: holds {len(statistics.state_mean)} tasks, the model {len(trained)}")
    policy = load_evaluated_policy(run, method, grouping, expert_num, device, chosen, statistics, eval_rows)
    if policy.model is not None:
        print(f"evaluation forwards of at most {min(policy.eval_rows or len(rollouts), len(rollouts))} of the "
              f"{len(rollouts)} rollouts (--eval_rows)")
    shared = shared_training_goals(trained_manifest, rollouts, seed)
    memorised = memorised_goals(shared)
    if memorised:
        print(f"warning: {memorised} ({len(shared['tasks'])} task(s), {shared['collect_json']}): the "
              "scores measure memorisation; evaluate with another --seed or collect the data with another seed",
              file=sys.stderr)

    if video:
        from m3dt.video import choose_gl_backend

        print(f"videos: MuJoCo renders with MUJOCO_GL={choose_gl_backend(gpu=torch.cuda.is_available())}")

    started = time.perf_counter()
    workers = os.cpu_count() if workers is None else workers
    # Waves bound memory (a Meta-World env holds 20-40 MB); within a wave every rollout advances in lockstep.
    wave_size = max_rollouts or len(rollouts)
    waves = [rollouts[start : start + wave_size] for start in range(0, len(rollouts), wave_size)]
    outcomes = [run_rollouts(policy.for_wave(wave, statistics, seed), statistics, wave, seed, workers, max_steps,
                             context_actions) for wave in waves]
    outcome = {key: np.concatenate([part[key] for part in outcomes]) for key in ("returns", "success", "steps", "ended")}
    stage = {"prompt-dt": "1", "m3dt": "3", "random": "random"}.get(method)  # None: a comparison method
    results = {
        "run_dir": str(run.root), "stage": stage, "method": method_name(method), "method_id": method,
        "grouping": grouping if method == "m3dt" else None, "num_experts": policy.num_experts,
        "checkpoint": policy.checkpoint,
        "seed": seed, "training_seed": training_seed, "protocol": protocol, "context_actions": context_actions, "shared_goals": shared,
        "max_steps": max_steps, "seconds": time.perf_counter() - started, **summarise(rollouts, outcome, max_steps),
        "user_tasks": user_task_rows(chosen),  # the definitions of tasks of one's own: the report tells them apart
    }
    if video:  # paths relative to the results' folder, as the tables link them
        results["videos"] = {name: [str(rollout.video.relative_to(out_dir)) for rollout in rollouts
                                    if rollout.task.name == name and rollout.video is not None] for name in chosen}
    write_results(out_dir, results)
    print(markdown_table(results))
    print(f"wrote {out_dir}/results.json, results.csv, table.md and scores_*.png")
    return results


# The options a --config YAML file (the stages' format) can give: Config field -> this command's flag.
CONFIG_OPTIONS = {"run_dir": "run_dir", "grouping": "grouping", "expert_num": "expert_num", "prefix_name": "prefix_name",
                  "tasks": "tasks", "eval_episodes": "episodes", "eval_max_steps": "max_steps", "workers": "workers",
                  "seed": "seed", "device": "device", "context_actions": "context_actions", "debug": "debug"}


def merged_options(config_file: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Config's defaults, then the YAML file, then the flags given; the run dir defaults as the stages' does."""
    values = load_yaml(config_file) if config_file else {}
    values.update({name: flags[flag] for name, flag in CONFIG_OPTIONS.items() if flags.get(flag) is not None})
    config = Config(**values)
    check_values(config)
    options = {flag: getattr(config, name) for name, flag in CONFIG_OPTIONS.items()}
    options["run_dir"] = str(config.resolved_run_dir())
    if "seed" not in values:
        options["seed"] = None  # evaluate: the run's training seed
    return options


@command
def main(argv: list[str] | None = None) -> None:
    comments = field_comments()
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (the stages' format): run_dir, grouping, expert_num, "
                        "prefix_name, tasks, eval_episodes, eval_max_steps, workers, seed, device, context_actions")
    parser.add_argument("--run_dir", help="default: runs/{prefix_name or 'custom'}_seed{seed}, as the stages")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", choices=METHODS,
                       help="prompt-dt: the stage-1 backbone; m3dt: the stage-3 model; random: uniform random actions; "
                            "the others: the comparison methods of python -m m3dt.baselines")
    which.add_argument("--stage", choices=tuple(STAGE_METHODS), help="the same as --method: 1 prompt-dt, 3 m3dt, random")
    parser.add_argument("--grouping", choices=CHOICES["grouping"], help="stage 3: which grouping (default: gradient)")
    parser.add_argument("--expert_num", type=int, help="stage 3: its expert count (default: 48)")
    parser.add_argument("--prefix_name", help="evaluate an official suite (default: every task the run trained on)")
    parser.add_argument("--tasks", help="a,b,c or @file.json")
    parser.add_argument("--episodes", type=int, help="episodes per task (default: the protocol's per family; "
                        f"Meta-World at most {MT1_GOALS}); another count is labelled as not the full protocol")
    parser.add_argument("--max_steps", type=int, help="cut episodes short, for quick checks (labelled as not the full "
                        "protocol; return-based scores are then normalised per allowed step)")
    parser.add_argument("--workers", type=int, help="env worker processes (default: CPU count; 0: in-process)")
    parser.add_argument("--seed", type=int, help="Meta-World goals (those of metaworld.MT1 with this seed), the "
                        "official suite lists of --prefix_name and the random policy (default: the run's training "
                        "seed; another seed's results go to a folder of their own, eval/{label}_seed{N})")
    parser.add_argument("--device", help="auto (default): cuda when available, else cpu")
    parser.add_argument("--max_rollouts", type=int,
                        help="run the rollouts in waves of at most this many (bounds memory; default: all at once)")
    parser.add_argument("--eval_rows", type=int,
                        help="rollouts per model forward at most (default: what fits in half the free device memory)")
    parser.add_argument("--context_actions", choices=CHOICES["context_actions"], help=comments["context_actions"])
    parser.add_argument("--video", type=int, default=0, metavar="K",
                        help="write an MP4 of the first K episodes of each task into eval/{label}/videos/")
    parser.add_argument("--debug", action="store_true", default=None, help="tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    debug = bool(args.debug)
    try:
        options = merged_options(args.config, vars(args))
        debug = options.pop("debug")
        evaluate(method=args.method or args.stage, max_rollouts=args.max_rollouts, eval_rows=args.eval_rows,
                 video=args.video, **options)
    except (*USER_ERRORS, EnvFailure, VideoError) as error:
        exit_with_message(error, debug)

if __name__ == "__main__":
    main()

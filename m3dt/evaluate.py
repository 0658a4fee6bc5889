"""Evaluate a trained model in the real simulators with the protocol of the README's "Evaluation".

    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage 1          # Prompt-DT (the stage-1 backbone)
    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage 3 --grouping gradient --expert_num 48
    python -m m3dt.evaluate --run_dir runs/mt160_seed0 --stage random   # the floor: uniform random actions

All (task, episode) rollouts advance in lockstep: at every env step, one batched model forward over all
live rollouts, then every env steps, spread over worker processes. Rollouts start together, so at step t
every live rollout's context is the same window of steps [t-K+1, t]: the context is plain slicing of one
history array, no per-rollout bookkeeping.

Per rollout: obs zero-padded to 39 and normalised with the task's training statistics; the higher-return
prompt of the task (fixed); return-to-go starting at the task's target / scale and decreased by
reward / scale after each step; the env receives the first act_dim dims of the predicted action.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m3dt.cli import exit_with_message
from m3dt.data import Batch
from m3dt.model import PromptDecisionTransformer
from m3dt.run import ArtifactError, RunDir, atomic_path, load_tensors, read_manifest, write_json
from m3dt.scores import task_score
from m3dt.tasks import (FAMILIES, GYMNASIUM, MAX_ACT_DIM, MAX_OBS_DIM, Task, TaskError, get_task, register_task_rows,
                        resolve_tasks)
from m3dt.video import VideoError, video_path

# A user's gymnasium task (README "Your own tasks") gets 10 episodes, as D4RL-style evaluations do.
EPISODES_PER_FAMILY = {"metaworld": 10, "dmc": 10, "ant_dir": 1, "cheetah_vel": 1, GYMNASIUM: 10}
METHOD_NAMES = {"1": "Prompt-DT", "3": "M3DT", "random": "random policy"}


@dataclass(frozen=True)
class Rollout:
    task: Task
    task_slot: int  # index of the task in the stage-1 statistics
    episode: int
    video: Path | None = None  # where its env worker writes the rollout's MP4 (--video)


# ------------------------------------------------------------------------------------------ environments
def _worker(connection, rollouts: list[tuple[Task, int, Path | None]], seed: int) -> None:
    """Owns the envs of some rollouts; answers 'reset' and 'step' messages until 'close'."""
    from m3dt.video import make_recorded_env

    envs = [make_recorded_env(task, episode, seed, video) for task, episode, video in rollouts]
    while True:
        command, payload = connection.recv()
        if command == "reset":
            connection.send(np.stack([env.reset() for env in envs]))
        elif command == "step":
            results = [envs[i].step(action) for i, action in payload]
            connection.send([(obs, reward, done, info["success"]) for obs, reward, done, info in results])
        else:
            for env in envs:
                env.close()
            connection.close()
            return


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
            from m3dt.video import make_recorded_env

            self.envs = [make_recorded_env(task, episode, seed, video) for task, episode, video in specs]
            return
        context = multiprocessing.get_context("spawn")  # MuJoCo state must not be forked
        self.connections, self.processes = [], []
        self.owner = np.arange(self.count) * self.workers // self.count  # rollout -> worker
        self.position = np.arange(self.count) - np.searchsorted(self.owner, self.owner)  # index within its worker
        for worker in range(self.workers):
            parent, child = context.Pipe()
            block = [spec for spec, owner in zip(specs, self.owner) if owner == worker]
            process = context.Process(target=_worker, args=(child, block, seed), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)

    def reset(self) -> np.ndarray:
        if self.local:
            return np.stack([env.reset() for env in self.envs])
        for connection in self.connections:
            connection.send(("reset", None))
        observations = np.zeros((self.count, MAX_OBS_DIM), dtype=np.float32)
        for worker, connection in enumerate(self.connections):
            observations[self.owner == worker] = connection.recv()
        return observations

    def step(self, live: np.ndarray, actions: np.ndarray) -> list[tuple[np.ndarray, float, bool, bool]]:
        """Step the rollouts `live` (indices) with `actions` (one per live rollout), in `live` order."""
        if self.local:
            results = [self.envs[r].step(action) for r, action in zip(live, actions)]
            return [(obs, reward, done, info["success"]) for obs, reward, done, info in results]
        messages = [[] for _ in range(self.workers)]
        for rollout, action in zip(live, actions):
            messages[self.owner[rollout]].append((self.position[rollout], action))
        for connection, message in zip(self.connections, messages):
            connection.send(("step", message))
        answers = [iter(connection.recv()) for connection in self.connections]
        return [next(answers[self.owner[rollout]]) for rollout in live]

    def close(self) -> None:
        if self.local:
            for env in self.envs:
                env.close()
            return
        for connection in self.connections:
            connection.send(("close", None))
        for process in self.processes:
            process.join(timeout=30)


# ------------------------------------------------------------------------------------------ model
def load_policy(run: RunDir, stage: int, grouping: str, expert_num: int) -> tuple[PromptDecisionTransformer, dict]:
    """The trained model of a stage, built from what its manifest says."""
    from m3dt.stages import build_model

    artifact = run.backbone if stage == 1 else run.moe(grouping, expert_num)
    manifest = read_manifest(artifact, f"stage-{stage} model")
    config = manifest["config"]
    model = build_model(config, dropout=0.0)
    if stage == 3:
        model.install_experts(manifest["num_experts"], routed=True, top_k=manifest.get("top_k", 0))
    try:
        model.load_state_dict(load_tensors(artifact, f"stage-{stage} model"))
    except RuntimeError as error:
        raise ArtifactError(f"{artifact}: does not fit the model its manifest describes ({str(error).splitlines()[0]})") from None
    return model.eval(), manifest


@dataclass
class Statistics:
    """What evaluation needs from the training data (written by stage 1), indexed by task slot."""

    state_mean: np.ndarray
    state_std: np.ndarray
    prompts: dict[str, torch.Tensor]


def load_statistics(run: RunDir) -> Statistics:
    tensors = load_tensors(run.data_stats, "data statistics")
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
    are masked either way) and each task's fixed higher-return prompt."""

    def __init__(self, model: PromptDecisionTransformer, statistics: Statistics, rollouts: list[Rollout],
                 context_length: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model, self.context_length, self.device, self.dtype = model, context_length, device, dtype
        slots = torch.tensor([rollout.task_slot for rollout in rollouts])
        self.prompt = {key: value[slots].to(device, dtype if value.is_floating_point() else value.dtype)
                       for key, value in statistics.prompts.items()}

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
        live_index = torch.from_numpy(live).to(self.device)
        prompt = {key: value[live_index] for key, value in self.prompt.items()}
        batch = Batch(
            states=window(history.states), actions=window(history.actions),
            returns_to_go=window(history.returns_to_go[..., None]), timesteps=torch.from_numpy(timesteps).to(self.device),
            mask=mask, prompt_states=prompt["states"], prompt_actions=prompt["actions"],
            prompt_returns_to_go=prompt["returns_to_go"], prompt_timesteps=prompt["timesteps"],
            prompt_mask=prompt["mask"], action_mask=torch.ones(rows, 1, MAX_ACT_DIM, device=self.device, dtype=self.dtype),
        )
        return self.model(batch, last_step_only=True)[:, -1].cpu().numpy().astype(np.float32)


class RandomPolicy:
    """Uniform random actions in [-1, 1]: the floor the learned policies are compared against."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, history: History, live: np.ndarray, t: int) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(len(live), MAX_ACT_DIM)).astype(np.float32)


def run_rollouts(policy: Callable[[History, np.ndarray, int], np.ndarray], statistics: Statistics,
                 rollouts: list[Rollout], seed: int, workers: int, max_steps: int | None) -> dict[str, np.ndarray]:
    """All rollouts in lockstep. Returns per rollout: return, success (any step), steps, and the actions."""
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
    alive = np.ones(count, dtype=bool)

    pool = EnvPool(rollouts, seed, workers)
    try:
        history.states[:, 0] = (pool.reset() - mean) / std
        for t in tqdm(range(longest), desc="rollout steps", dynamic_ncols=True):
            live = np.flatnonzero(alive)
            if len(live) == 0:
                break
            predicted = policy(history, live, t)
            predicted[np.arange(MAX_ACT_DIM)[None, :] >= act_dims[live, None]] = 0.0  # as the data pads actions
            history.actions[live, t] = predicted
            results = pool.step(live, [predicted[i, : act_dims[r]] for i, r in enumerate(live)])
            for r, (observation, reward, done, succeeded) in zip(live, results):
                total_return[r] += reward
                success[r] |= succeeded
                steps[r] = t + 1
                if done or t + 1 >= horizons[r]:
                    alive[r] = False
                else:
                    history.states[r, t + 1] = (observation - mean[r]) / std[r]
                    history.returns_to_go[r, t + 1] = history.returns_to_go[r, t] - reward / scales[r]
    finally:
        pool.close()
    return {"returns": total_return, "success": success, "steps": steps, "actions": history.actions}


# ------------------------------------------------------------------------------------------ results
def summarise(rollouts: list[Rollout], outcome: dict[str, np.ndarray]) -> dict:
    """Per-task scores (the protocol's normalisation), per-family and total unweighted means over tasks."""
    per_task: dict[str, dict] = {}
    for name in dict.fromkeys(rollout.task.name for rollout in rollouts):
        indices = [i for i, rollout in enumerate(rollouts) if rollout.task.name == name]
        task = rollouts[indices[0]].task
        returns = outcome["returns"][indices].tolist()
        successes = outcome["success"][indices].tolist()
        per_task[name] = {
            "family": task.family,
            "score": task_score(task, returns, successes),
            "return_mean": float(np.mean(returns)),
            "success_rate": float(np.mean(successes)) if task.family == "metaworld" else None,
            "episodes": len(indices),
            "steps_mean": float(outcome["steps"][indices].mean()),
            "reference_score": task.single_task_score,
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


def mean_reference(references: list[float | None]) -> float | None:
    """The mean single-task reference score, or None when a task has none (a user's own task)."""
    return None if None in references else float(np.mean(references))


def reference_text(reference: float | None) -> str:
    return "-" if reference is None else f"{reference:.2f}"


def markdown_table(results: dict) -> str:
    method = results["method"]
    lines = [f"| family | tasks | {method} | single-task DT (reference) |", "|---|---|---|---|"]
    for family, row in results["families"].items():
        lines.append(f"| {family} | {row['tasks']} | {row['score']:.2f} | {reference_text(row['reference_score'])} |")
    total = results["total"]
    reference = reference_text(total["reference_score"])
    lines.append(f"| **total** | {total['tasks']} | **{total['score']:.2f}** | {reference} |")
    if results.get("videos"):
        lines += ["", "Videos: " + ", ".join(f"[{Path(path).stem}]({path})" for paths in results["videos"].values()
                                            for path in paths)]
    return "\n".join(lines)


def write_results(out_dir: Path, results: dict) -> None:
    write_json(out_dir / "results.json", results)
    with atomic_path(out_dir / "results.csv") as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["task", "family", "score", "return_mean", "success_rate", "episodes", "reference_score"])
            for name, row in results["tasks"].items():
                writer.writerow([name, row["family"], f"{row['score']:.4f}", f"{row['return_mean']:.4f}",
                                 "" if row["success_rate"] is None else f"{row['success_rate']:.4f}",
                                 row["episodes"], "" if row["reference_score"] is None else row["reference_score"]])
    with atomic_path(out_dir / "table.md") as temporary:
        temporary.write_text(markdown_table(results) + "\n")
    plot_families(out_dir, results)


def plot_families(out_dir: Path, results: dict) -> None:
    """One bar chart per family: our score per task, with the single-task reference as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for family in results["families"]:
        rows = [(name, row) for name, row in results["tasks"].items() if row["family"] == family]
        figure, axes = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 4))
        positions = np.arange(len(rows))
        axes.bar(positions, [row["score"] for _, row in rows], color="tab:blue", label=results["method"])
        referenced = [(position, row["reference_score"]) for position, (_, row) in zip(positions, rows)
                      if row["reference_score"] is not None]
        if referenced:
            axes.scatter(*zip(*referenced), color="black", marker="_", s=200, label="single-task DT (paper)", zorder=3)
        axes.set_xticks(positions, [name for name, _ in rows], rotation=75, ha="right", fontsize=7)
        axes.set_ylabel("normalised score")
        axes.set_title(f"{family}: mean {results['families'][family]['score']:.1f}")
        axes.legend(fontsize=8)
        figure.tight_layout()
        with atomic_path(out_dir / f"scores_{family}.png") as temporary:
            figure.savefig(temporary, format="png", dpi=120)
        plt.close(figure)


# ------------------------------------------------------------------------------------------ CLI
def evaluate(run_dir: str, stage: str, grouping: str = "gradient", expert_num: int = 48, prefix_name: str | None = None,
             tasks: str | None = None, episodes: int | None = None, max_steps: int | None = None, workers: int | None = None,
             seed: int = 0, device: str = "auto", max_rollouts: int | None = None, video: int = 0) -> dict:
    """Evaluate stage "1" (Prompt-DT), stage "3" (M3DT) or a "random" policy; write and return the results.
    `video` K > 0 records the first K episodes of every task as MP4 files (m3dt/video.py)."""
    from m3dt.train import resolve_device

    run = RunDir(run_dir)
    backbone_manifest = read_manifest(run.backbone, "stage-1 backbone")
    # A user's own tasks travel in the stage-1 manifest (README "Your own tasks").
    register_task_rows(backbone_manifest.get("user_tasks", []), str(run.backbone))
    trained = backbone_manifest["tasks"]
    chosen = resolve_tasks(prefix_name, tasks, seed) if (prefix_name or tasks) else trained
    untrained = [name for name in chosen if name not in trained]
    if untrained:
        raise TaskError(f"{run.backbone}: the run was not trained on {', '.join(untrained[:3])}")
    label = f"stage3_{grouping}_{expert_num}" if stage == "3" else {"1": "stage1", "random": "random"}[stage]
    out_dir = run.root / "eval" / label
    if video:
        from m3dt.video import choose_gl_backend

        print(f"videos: MuJoCo renders with MUJOCO_GL={choose_gl_backend(gpu=torch.cuda.is_available())}")
    rollouts = [Rollout(get_task(name), trained.index(name), episode,
                        video_path(out_dir / "videos", name, episode) if episode < video else None)
                for name in chosen
                for episode in range(episodes or EPISODES_PER_FAMILY[get_task(name).family])]
    statistics = load_statistics(run)
    num_experts, model = 0, None
    if stage != "random":
        torch_device = resolve_device(device)
        model, manifest = load_policy(run, int(stage), grouping, expert_num)
        model.to(torch_device)
        num_experts = manifest.get("num_experts", 0)

    def make_policy(wave: list[Rollout]):
        if model is None:
            return RandomPolicy(seed)
        return ModelPolicy(model, statistics, wave, manifest["config"]["context_length"], torch_device)

    started = time.perf_counter()
    workers = os.cpu_count() if workers is None else workers
    # Waves bound memory (a Meta-World env holds 20-40 MB); within a wave every rollout advances in lockstep.
    wave_size = max_rollouts or len(rollouts)
    waves = [rollouts[start : start + wave_size] for start in range(0, len(rollouts), wave_size)]
    outcomes = [run_rollouts(make_policy(wave), statistics, wave, seed, workers, max_steps) for wave in waves]
    outcome = {key: np.concatenate([part[key] for part in outcomes]) for key in ("returns", "success", "steps")}
    results = {
        "run_dir": str(run.root), "stage": stage, "method": METHOD_NAMES[stage], "seed": seed,
        "num_experts": num_experts, "grouping": grouping if stage == "3" else None,
        "max_steps": max_steps, "seconds": time.perf_counter() - started, **summarise(rollouts, outcome),
    }
    if video:  # paths relative to the results' folder, as the tables link them
        results["videos"] = {name: [str(rollout.video.relative_to(out_dir)) for rollout in rollouts
                                    if rollout.task.name == name and rollout.video is not None] for name in chosen}
    write_results(out_dir, results)
    print(markdown_table(results))
    print(f"wrote {out_dir}/results.json, results.csv, table.md and scores_*.png")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--stage", choices=("1", "3", "random"), required=True,
                        help="1: the stage-1 backbone (Prompt-DT); 3: the M3DT model; random: uniform random actions")
    parser.add_argument("--grouping", default="gradient", choices=("gradient", "random"))
    parser.add_argument("--expert_num", type=int, default=48)
    parser.add_argument("--prefix_name", help="evaluate an official suite (default: every task the run trained on)")
    parser.add_argument("--tasks", help="a,b,c or @file.json")
    parser.add_argument("--episodes", type=int, help="episodes per task (default: the protocol's per family)")
    parser.add_argument("--max_steps", type=int, help="cut episodes short, for quick checks")
    parser.add_argument("--workers", type=int, help="env worker processes (default: CPU count; 0: in-process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max_rollouts", type=int,
                        help="run the rollouts in waves of at most this many (bounds memory; default: all at once)")
    parser.add_argument("--video", type=int, default=0, metavar="K",
                        help="write an MP4 of the first K episodes of each task into eval/{label}/videos/")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.video < 0:
        parser.error("--video must be at least 0")
    try:
        evaluate(args.run_dir, args.stage, args.grouping, args.expert_num, args.prefix_name, args.tasks, args.episodes,
                 args.max_steps, args.workers, args.seed, args.device, args.max_rollouts, args.video)
    except (ArtifactError, TaskError, VideoError) as error:
        exit_with_message(error, args.debug)


if __name__ == "__main__":
    main()

"""Per-task normalised scores of the evaluation protocol (README "Evaluation")."""

from __future__ import annotations

import numpy as np

from m3dt.tasks import Task


def episode_score(family: str, returns: list[float], successes: list[bool]) -> float:
    """One task's score from its evaluation episodes.

    Meta-World: 100 x success rate (success = info['success'] at any step of the episode).
    DMC: mean return / 10, not clipped.
    ant-dir: clip(mean return / 5, 0, 100).
    cheetah-vel: 0 below a mean return of -100, 100 above -30, linear between.
    """
    mean_return = float(np.mean(returns))
    if family == "metaworld":
        return 100.0 * float(np.mean(successes))
    if family == "dmc":
        return mean_return / 10.0
    if family == "ant_dir":
        return float(np.clip(mean_return / 5.0, 0.0, 100.0))
    if family == "cheetah_vel":
        return float(np.clip((mean_return + 100.0) / 70.0 * 100.0, 0.0, 100.0))
    raise ValueError(f"unknown family '{family}'")


def task_score(task: Task, returns: list[float], successes: list[bool]) -> float:
    """A task's score: its family's rule (`episode_score`), or for a user's gymnasium task
    100 * (mean return - score_min_return) / (score_max_return - score_min_return), not clipped (D4RL's and
    Minari's normalised score)."""
    if task.score_returns is None:
        return episode_score(task.family, returns, successes)
    low, high = task.score_returns
    return 100.0 * (float(np.mean(returns)) - low) / (high - low)

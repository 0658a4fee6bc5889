"""Per-task normalised scores of the evaluation protocol (the README's "Evaluation" section)."""

from __future__ import annotations

import numpy as np

from m3dt.tasks import Task

# What a family's score is, for axis labels and tables; MT160's are numbers in [0, 100] (DMC's rewards are at
# most 1 per simulator step, 1,000 of them per episode); a gymnasium task's leaves it where a return leaves its
# row's [min, max].
SCORE_AXIS = {
    "metaworld": "success rate (%)",
    "dmc": "return / 10",
    "ant_dir": "clip(return / 5, 0, 100)",
    "cheetah_vel": "normalised return (0 at -100, 100 at -30)",
    "gymnasium": "100 (return - min) / (max - min)",  # a task of one's own (README "Your own tasks")
}


def full_episode_return(episode_return: float, steps: int, horizon: int, ended: bool) -> float:
    """An episode's return on the scale of a full episode, which the score thresholds below are for.

    An episode cut short by --max_steps at `steps` < `horizon` is scored by its return per allowed step:
    return x horizon / steps (without it a random policy cut at 20 of cheetah-vel's 200 steps would lose
    about a tenth of its full-episode penalty and score 100). An episode the env `ended` itself (an ant
    that fell, a pendulum that dropped) is complete, and its return counts as it is.
    """
    if ended or steps >= horizon:
        return episode_return
    return episode_return * horizon / steps


def score_axis_limits(values: list[float]) -> tuple[float, float]:
    """The y range of a score plot: [0, 100], where MT160's scores lie, widened with a 5% margin to hold
    `values` (bar tops, error-bar ends): a gymnasium task's score is not clipped, and may be below 0 or above
    100."""
    finite = [float(value) for value in values if np.isfinite(value)]
    low, high = min([0.0, *finite]), max([100.0, *finite])
    margin = 0.05 * (high - low)
    return (low - margin if low < 0 else 0.0), (high + margin if high > 100 else 100.0)


def episode_score(family: str, returns: list[float], successes: list[bool]) -> float:
    """One task's score from its evaluation episodes (returns on the full-episode scale: full_episode_return).

    Meta-World: 100 x success rate (success = info['success'] at any step of the episode; within the allowed
    steps when cut short).
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
    Minari's normalised score); returns on the full-episode scale (full_episode_return)."""
    if task.score_returns is None:
        return episode_score(task.family, returns, successes)
    low, high = task.score_returns
    return 100.0 * (float(np.mean(returns)) - low) / (high - low)

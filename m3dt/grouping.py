"""Task grouping for stage 2: gradient features + K-means, or a random split.

Gradient method (README, "Faithfulness, and options that deviate"; the reference's grouping script): per
task, the mean of 10 full-model gradients of the stage-1 backbone (batch 16 of that task, dropout on, each
gradient clipped to global norm 0.25 first); the feature of task i is (mean gradient over tasks) * g_i
elementwise, in float32 as the reference computes it. K-means (Euclidean, random data points as initial
centroids, <= 100 iterations) is restarted 40 times and the run with the lowest sum of distances to the
nearest centroid wins; that is repeated 40 times and the partition with the smallest variance of group sizes
is kept.

Stopping rule (`--kmeans_stop`):
- `reference` (default): the reference stops when EVERY coordinate of every centroid moved by less than the
  tolerance (1e-4, absolute), and returns the centroids and labels from before that last update; a run's
  score uses those. On gradient-sized features (|value| ~1e-4) this stops after one Lloyd step.
- `relative`: stop when the summed squared centroid shift is at most tolerance x the features' total
  variance (mean squared distance of the points to their mean): scale-free, so it clusters features of any
  size; the updated centroids are kept and the labels reassigned to them.
- `summed`: the same with an absolute threshold (summed squared shift <= tolerance), the project's rule before
  it followed the reference.

The features have ~5M dims, but every centroid is a mean of data points, so K-means runs on the Gram matrix
of the features: centroids are weight vectors over the points and distances come exactly from inner
products. Only the reference's per-coordinate test needs coordinates, and mostly not many:
|shift_kd| <= ||dW_k||_1 max_p |X_pd| (dW_k: the change of centroid k's weights), so only coordinates whose
largest |value| reaches tolerance / ||dW_k||_1 are computed. Empty clusters keep their previous centroid
(the reference's become NaN), and a cluster left empty at the end takes the point farthest from its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from m3dt.config import CHOICES
from m3dt.data import DeviceSampler
from m3dt.model import PromptDecisionTransformer, action_loss

KMEANS_STOPS = CHOICES["kmeans_stop"]
COLUMN_CHUNK = 1 << 16  # feature coordinates per block when computing centroid shifts or the Gram matrix


def task_gradients(model: PromptDecisionTransformer, sampler: DeviceSampler, tasks: list[int], samples: int,
                   max_norm: float, generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """(len(tasks), parameters) float32 on the CPU: per task (dataset index) the mean of `samples` clipped
    gradients of every trainable parameter, flattened in `model.parameters()` order. Batches come from the
    sampler's stream, or from `generator` (which leaves the training stream as it was)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()  # dropout on, as the reference computes them
    generators = None if generator is None else [generator]
    rows = []
    for task in tqdm(tasks, desc="task gradients", unit="task", disable=not progress):
        total = None
        for _ in range(samples):
            batch = sampler.sample(torch.tensor([task]), generators)
            model.zero_grad(set_to_none=True)
            action_loss(model(batch), batch).backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            flat = torch.cat([p.grad.reshape(-1) for p in parameters]).float()
            total = flat if total is None else total + flat
        rows.append((total / samples).cpu())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def gradient_features(gradients: torch.Tensor) -> torch.Tensor:
    """The K-means points, (tasks, parameters) float32: (mean gradient over tasks) * g_i, computed in place in
    `gradients` (MT160's are 3.4 GB). Coordinates that are zero for every task stay zero; the reference drops
    them, which changes no distance, shift or score."""
    return gradients.mul_(gradients.mean(dim=0, keepdim=True))


@dataclass
class KMeansPoints:
    """The points of a K-means problem, as every run needs them: their Gram matrix, and for the reference's
    per-coordinate test the coordinates that can reach the tolerance at all (a centroid's weights change by
    at most 2 in L1 norm, so a coordinate can move by at most 2 max_p |X_pd|). For gradient features
    (|value| ~1e-4 or less) these are a few; for features far above the tolerance, all of them."""

    gram: np.ndarray  # (P, P) float64 inner products of the features
    head: torch.Tensor  # (P, H) float32 the coordinates with 2 max_p |X_pd| >= tolerance, by decreasing max_p |X_pd|
    largest: np.ndarray  # (H,) float64 max_p |X_pd| of those coordinates (non-increasing)

    @classmethod
    def from_features(cls, features: torch.Tensor, tolerance: float) -> "KMeansPoints":
        """`features`: (P, D), float32 or float64."""
        gram = torch.zeros(features.shape[0], features.shape[0], dtype=torch.float64)
        for start in range(0, features.shape[1], COLUMN_CHUNK):
            block = features[:, start : start + COLUMN_CHUNK].double()
            gram += block @ block.T
        largest, order = features.abs().max(dim=0).values.sort(descending=True, stable=True)
        largest = largest.double().numpy()
        # the margin keeps the bound safe against the rounding of the division
        count = int(np.searchsorted(-largest, -tolerance / 2.0 * (1.0 - 1e-9), side="right"))
        return cls(gram.numpy(), features[:, order[:count]], largest[:count])

    @property
    def count(self) -> int:
        """P, the number of points (tasks)."""
        return self.gram.shape[0]

    def total_variance(self) -> float:
        """Mean squared distance of the points to their mean: trace(K)/P - sum(K)/P^2."""
        return float(np.trace(self.gram) / self.count - self.gram.sum() / self.count**2)

    def every_coordinate_moved_less(self, shift: np.ndarray, tolerance: float) -> bool:
        """Whether |(shift @ features)_kd| < tolerance for every centroid k and coordinate d, exactly.
        `shift`: (K, P) change of the centroids' weights. By |shift_kd| <= ||shift_k||_1 max_p |X_pd|,
        coordinates whose largest |feature| is below tolerance / max_k ||shift_k||_1 cannot reach the
        tolerance and are not computed."""
        l1 = np.abs(shift).sum(axis=1).max()
        if l1 == 0.0:
            return True
        needed = int(np.searchsorted(-self.largest, -tolerance / l1 * (1.0 - 1e-9), side="right"))
        shift_tensor = torch.from_numpy(shift)
        for start in range(0, needed, COLUMN_CHUNK):
            moved = shift_tensor @ self.head[:, start : min(start + COLUMN_CHUNK, needed)].double()
            if bool((moved.abs() >= tolerance).any()):
                return False
        return True


@dataclass
class KMeansRun:
    """The result of one K-means run (`kmeans`)."""

    labels: np.ndarray  # (P,) cluster of each point, every cluster non-empty
    weights: np.ndarray  # (K, P) centroid k = weights[k] @ features
    score: float  # sum over points of the distance to the nearest centroid
    steps: int  # Lloyd steps (assignment + update) taken


def kmeans(points: KMeansPoints, clusters: int, rng: np.random.Generator, iterations: int, tolerance: float,
           stop: str = "reference") -> KMeansRun:
    """One K-means run from `clusters` distinct random points as centroids; `stop` as in the module docstring."""
    if stop not in KMEANS_STOPS:
        raise ValueError(f"unknown K-means stopping rule {stop!r}")
    weights = np.zeros((clusters, points.count))
    weights[np.arange(clusters), rng.choice(points.count, size=clusters, replace=False)] = 1.0
    squared_norms = np.diag(points.gram)
    threshold = tolerance * points.total_variance() if stop == "relative" else tolerance
    labels = np.zeros(points.count, dtype=np.int64)
    steps = 0
    for steps in range(1, iterations + 1):
        labels = squared_distances(points.gram, squared_norms, weights).argmin(axis=1)
        new_weights = weights.copy()
        for cluster in range(clusters):
            members = labels == cluster
            if members.any():  # an empty cluster keeps its centroid instead of becoming NaN
                new_weights[cluster] = members / members.sum()
        shift = new_weights - weights
        if stop == "reference":
            if points.every_coordinate_moved_less(shift, tolerance):
                break  # the reference returns the centroids and labels from before this update
            weights = new_weights
        else:
            weights = new_weights
            if np.einsum("kp,pq,kq->", shift, points.gram, shift) <= threshold:
                break
    distances = squared_distances(points.gram, squared_norms, weights)
    if stop != "reference":
        labels = distances.argmin(axis=1)
    # the reference's score: distance to the nearest returned centroid (after 100 steps without
    # convergence its labels are one update behind its centroids)
    score = float(np.sqrt(np.maximum(distances.min(axis=1), 0.0)).sum())
    return KMeansRun(fill_empty_clusters(labels, distances, clusters), weights, score, steps)


def fill_empty_clusters(labels: np.ndarray, distances: np.ndarray, clusters: int) -> np.ndarray:
    """Every expert needs at least one task: move the point farthest from its centroid, taken from a
    cluster with more than one member, into each empty cluster (identical tasks can leave clusters empty)."""
    labels = labels.copy()
    for empty in np.flatnonzero(np.bincount(labels, minlength=clusters) == 0):
        sizes = np.bincount(labels, minlength=clusters)
        movable = np.flatnonzero(sizes[labels] > 1)
        farthest = movable[distances[movable, labels[movable]].argmax()]
        labels[farthest] = empty
    return labels


def squared_distances(gram: np.ndarray, squared_norms: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """|x_i - c_k|^2 = K_ii - 2 (K w_k)_i + w_k^T K w_k, as a (points, clusters) array."""
    cross = gram @ weights.T
    centroid_norms = np.einsum("kp,pq,kq->k", weights, gram, weights)
    return squared_norms[:, None] - 2.0 * cross + centroid_norms[None, :]


@dataclass
class Grouping:
    """The task groups that `gradient_grouping` chose, one per expert, and how many Lloyd steps its runs took."""

    groups: list[list[int]]  # task indices of each group
    lloyd_steps: list[int]  # steps taken by every K-means run, in the order they ran


def gradient_grouping(features: torch.Tensor, groups: int, seed: int, restarts: int, repeats: int, iterations: int,
                      tolerance: float, stop: str = "reference") -> Grouping:
    """Best of `restarts` K-means runs by score, `repeats` times; the most even partition wins (the first
    one on ties, as the reference's strict comparison)."""
    if groups > features.shape[0]:
        raise ValueError(f"cannot make {groups} groups from {features.shape[0]} tasks")
    points = KMeansPoints.from_features(features, tolerance)
    rng = np.random.default_rng(seed)
    best_labels, best_variance, lloyd_steps = None, np.inf, []
    for _ in tqdm(range(repeats), desc=f"k-means, best of {restarts} runs", unit="repeat"):
        runs = [kmeans(points, groups, rng, iterations, tolerance, stop) for _ in range(restarts)]
        lloyd_steps += [run.steps for run in runs]
        labels = min(runs, key=lambda run: run.score).labels
        variance = np.bincount(labels, minlength=groups).var()
        if variance < best_variance:
            best_labels, best_variance = labels, variance
    return Grouping([np.flatnonzero(best_labels == group).tolist() for group in range(groups)], lloyd_steps)


def random_grouping(task_count: int, groups: int, seed: int) -> list[list[int]]:
    """Shuffle, then split into `groups` contiguous near-equal parts; the first task_count % groups get one more."""
    if groups > task_count:
        raise ValueError(f"cannot make {groups} groups from {task_count} tasks")
    order = np.random.default_rng(seed).permutation(task_count)
    base, extra = divmod(task_count, groups)
    sizes = [base + (1 if group < extra else 0) for group in range(groups)]
    bounds = np.cumsum([0, *sizes])
    return [order[bounds[group] : bounds[group + 1]].tolist() for group in range(groups)]


def groups_to_json(groups: list[list[int]], task_names: list[str]) -> dict[str, list[str]]:
    """The reference's group file format: {"expert_0": [task, ...], ...}."""
    return {f"expert_{index}": [task_names[task] for task in group] for index, group in enumerate(groups)}

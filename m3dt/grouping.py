"""Task grouping for stage 2: gradient features + K-means, or a random split.

Gradient method (README, "The MT160 pipeline"; the reference's stage-2 grouping script): per task, the mean of 10 full-model gradients of the stage-1 backbone
(batch 16 of that task, dropout on, each gradient clipped to global norm 0.25 first); coordinates that are
zero for every task are dropped; the feature of task i is (mean gradient over tasks) * g_i elementwise.
K-means (Euclidean, random data points as initial centroids, <= 100 iterations, tol 1e-4) is restarted 40
times and the run with the lowest sum of distances to the nearest centroid wins; that is repeated 40 times
and the partition with the smallest variance of group sizes is kept.

The features have ~5M dims, but every centroid is a mean of data points, so K-means needs only the Gram
matrix of the features: distances and centroid shifts are computed exactly from inner products. That makes
the 1,600 K-means runs take seconds instead of hours. Empty clusters keep their previous centroid.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from m3dt.data import DeviceSampler
from m3dt.model import PromptDecisionTransformer, action_loss


def task_gradients(model: PromptDecisionTransformer, sampler: DeviceSampler, tasks: list[int], samples: int,
                   max_norm: float, generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """(len(tasks), parameters) float32 on the CPU: per task (dataset index) the mean of `samples` clipped
    gradients of every trainable parameter, flattened in `model.parameters()` order. Batches come from the
    sampler's stream, or from `generator` (which leaves the training stream as it was)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()  # dropout on, as the reference computes them
    generators = None if generator is None else [generator]
    rows = []
    for task in tqdm(tasks, desc="task gradients", disable=not progress):
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


def gradient_features_gram(gradients: torch.Tensor, chunk: int = 1 << 20) -> np.ndarray:
    """Gram matrix (tasks x tasks, float64) of the features (mean gradient) * g_i, with all-zero
    coordinates dropped (they add nothing to inner products, so dropping them is implicit here)."""
    tasks = gradients.shape[0]
    gram = torch.zeros(tasks, tasks, dtype=torch.float64)
    for start in range(0, gradients.shape[1], chunk):
        block = gradients[:, start : start + chunk].double()
        features = block * block.mean(dim=0, keepdim=True)
        gram += features @ features.T
    return gram.numpy()


def kmeans_gram(gram: np.ndarray, clusters: int, rng: np.random.Generator, iterations: int,
                tolerance: float) -> tuple[np.ndarray, float]:
    """One K-means run on points given by their Gram matrix. Centroids are kept as weight vectors over
    the points (centroid = weights @ points). Returns (labels, sum of distances to the nearest centroid)."""
    points = gram.shape[0]
    weights = np.zeros((clusters, points))
    weights[np.arange(clusters), rng.choice(points, size=clusters, replace=False)] = 1.0
    squared_norms = np.diag(gram)
    labels = np.zeros(points, dtype=np.int64)
    for _ in range(iterations):
        distances = squared_distances(gram, squared_norms, weights)
        labels = distances.argmin(axis=1)
        new_weights = weights.copy()
        for cluster in range(clusters):
            members = labels == cluster
            if members.any():  # an empty cluster keeps its centroid instead of becoming NaN
                new_weights[cluster] = members / members.sum()
        shift = new_weights - weights
        weights = new_weights
        if np.einsum("kp,pq,kq->", shift, gram, shift) <= tolerance:
            break
    distances = squared_distances(gram, squared_norms, weights)
    labels = fill_empty_clusters(distances.argmin(axis=1), distances, clusters)
    inertia = float(np.sqrt(np.maximum(distances[np.arange(points), labels], 0.0)).sum())
    return labels, inertia


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


def gradient_grouping(gram: np.ndarray, groups: int, seed: int, restarts: int, repeats: int, iterations: int,
                      tolerance: float) -> list[list[int]]:
    """Best of `restarts` K-means runs by sum of distances, `repeats` times; the most even partition wins."""
    if groups > gram.shape[0]:
        raise ValueError(f"cannot make {groups} groups from {gram.shape[0]} tasks")
    rng = np.random.default_rng(seed)
    best_labels, best_variance = None, np.inf
    for _ in tqdm(range(repeats), desc="k-means"):
        runs = [kmeans_gram(gram, groups, rng, iterations, tolerance) for _ in range(restarts)]
        labels = min(runs, key=lambda run: run[1])[0]
        variance = np.bincount(labels, minlength=groups).var()
        if variance < best_variance:
            best_labels, best_variance = labels, variance
    return [np.flatnonzero(best_labels == group).tolist() for group in range(groups)]


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

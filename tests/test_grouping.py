"""Task grouping: K-means in Gram space equals the reference's K-means on the points (its stopping rule
exactly); never NaN, never an empty group."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3dt.grouping import (KMeansPoints, gradient_features, gradient_grouping, groups_to_json, kmeans,
                           random_grouping, squared_distances)


def test_random_grouping_sizes_and_cover():
    groups = random_grouping(160, 48, seed=0)
    sizes = [len(group) for group in groups]
    assert sizes == [4] * (160 % 48) + [3] * (48 - 160 % 48)  # the first 160 % 48 groups get one more
    assert sorted(task for group in groups for task in group) == list(range(160))
    assert groups == random_grouping(160, 48, seed=0) and groups != random_grouping(160, 48, seed=1)


def test_gram_distances_equal_explicit_distances():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(12, 30))
    weights = rng.dirichlet(np.ones(12), size=4)  # any centroid that is a mix of points
    centroids = weights @ points
    explicit = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    gram = points @ points.T
    np.testing.assert_allclose(squared_distances(gram, np.diag(gram), weights), explicit, rtol=1e-9, atol=1e-9)


def test_features_are_mean_gradient_times_task_gradient_and_gram_their_inner_products():
    gradients = torch.randn(5, 70_000)  # more than one block of coordinates
    gradients[:, 100:200] = 0  # coordinates zero for every task (the reference drops them: they change nothing)
    exact = gradients.double()
    expected = exact * exact.mean(dim=0, keepdim=True)
    features = gradient_features(gradients)
    assert features.dtype == torch.float32  # the reference's dtype
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-6)  # float32 rounding
    points = KMeansPoints.from_features(features, 1e-4)  # the Gram matrix in blocks of coordinates
    np.testing.assert_allclose(points.gram, (features.double() @ features.double().T).numpy(), rtol=1e-12)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([center + rng.normal(scale=0.1, size=(5, 2)) for center in centers])
    grouping = gradient_grouping(torch.from_numpy(points), 3, seed=0, restarts=10, repeats=3, iterations=100,
                                 tolerance=1e-4)
    assert sorted(sorted(group) for group in grouping.groups) == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]


def test_more_groups_than_natural_clusters():
    """Two distinct points repeated: 5 groups cannot all be filled by nearest-centroid assignment, yet no
    group is empty and nothing is NaN."""
    points = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 4)
    for stop in ("reference", "relative", "summed"):
        run = kmeans(KMeansPoints.from_features(points, 1e-4), 5, np.random.default_rng(0), 100, 1e-4, stop)
        assert np.isfinite(run.score) and np.isfinite(run.weights).all()
        assert set(run.labels) == set(range(5))
    groups = gradient_grouping(points, 5, seed=0, restarts=4, repeats=4, iterations=100, tolerance=1e-4).groups
    assert all(groups) and sorted(t for g in groups for t in g) == list(range(8))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 20), st.integers(1, 20), st.integers(0, 10_000))
def test_grouping_is_always_a_partition(tasks, groups, seed):
    if groups > tasks:
        with pytest.raises(ValueError):
            random_grouping(tasks, groups, seed)
        return
    points = torch.from_numpy(np.random.default_rng(seed).normal(size=(tasks, 3)).round(0))  # ties and duplicates
    for result in (random_grouping(tasks, groups, seed),
                   *(gradient_grouping(points, groups, seed, 2, 2, 20, 1e-4, stop).groups
                     for stop in ("reference", "relative"))):
        assert len(result) == groups and all(result)
        assert sorted(t for g in result for t in g) == list(range(tasks))


def test_group_file_format():
    assert groups_to_json([[1], [0, 2]], ["a", "b", "c"]) == {"expert_0": ["b"], "expert_1": ["a", "c"]}


# ------------------------------------------------------------------ the reference's K-means, written plainly
def reference_kmeans(points: np.ndarray, initial: np.ndarray, iterations: int, tolerance: float):
    """The reference's loop on explicit points: assign, update, stop when every centroid coordinate moved
    less than the tolerance, returning the centroids and labels from before that update."""
    centroids = points[initial]
    steps = 0
    for steps in range(1, iterations + 1):
        labels = np.sqrt(((points[:, None] - centroids[None]) ** 2).sum(-1)).argmin(axis=1)
        updated = np.stack([points[labels == k].mean(axis=0) for k in range(len(initial))])
        assert np.isfinite(updated).all(), "an empty cluster: the reference would write NaN centroids"
        if np.all(np.abs(updated - centroids) < tolerance):
            break
        centroids = updated
    score = np.sqrt(((points[:, None] - centroids[None]) ** 2).sum(-1)).min(axis=1).sum()
    return centroids, labels, score, steps


def reference_grouping(points: np.ndarray, groups: int, seed: int, restarts: int, repeats: int, iterations: int,
                       tolerance: float) -> list[list[int]]:
    rng = np.random.default_rng(seed)  # initial centroids drawn as the project draws them
    best, best_variance = None, np.inf
    for _ in range(repeats):
        best_score, best_labels = np.inf, None
        for _ in range(restarts):
            initial = rng.choice(len(points), size=groups, replace=False)
            _, labels, score, _ = reference_kmeans(points, initial, iterations, tolerance)
            if score < best_score:
                best_score, best_labels = score, labels
        variance = np.var(np.bincount(best_labels, minlength=groups))
        if variance < best_variance:
            best, best_variance = [np.flatnonzero(best_labels == g).tolist() for g in range(groups)], variance
    return best


def features_of_scale(kind: str, seed: int) -> np.ndarray:
    """24 points in 3 loose clusters: `unit` (several Lloyd steps), `gradient` (|value| ~1e-5, the size of
    real gradient features: one Lloyd step), `mixed` (a few coordinates near the tolerance among thousands
    far below it, so the bound settles most coordinates and the rest are computed)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 40))
    points = np.concatenate([center + 0.8 * rng.normal(size=(8, 40)) for center in centers])
    if kind == "gradient":
        return points * 1e-5
    if kind == "mixed":
        return np.concatenate([points * 2e-4, rng.normal(size=(24, 3000)) * 1e-8], axis=1)
    return points


@pytest.mark.parametrize("kind,iterations", [("unit", 100), ("gradient", 100), ("mixed", 100), ("unit", 2)])
def test_default_kmeans_is_the_references(kind, iterations):
    """Labels, centroids, scores and Lloyd steps of every run, and the chosen partition, equal the plain
    re-implementation; `iterations` 2 also covers runs that end without converging."""
    features = features_of_scale(kind, seed=3)
    points = KMeansPoints.from_features(torch.from_numpy(features), 1e-4)
    ours, theirs = np.random.default_rng(7), np.random.default_rng(7)
    steps = []
    for _ in range(12):
        run = kmeans(points, 3, ours, iterations, 1e-4)
        centroids, labels, score, reference_steps = reference_kmeans(
            features, theirs.choice(24, size=3, replace=False), iterations, 1e-4)
        np.testing.assert_array_equal(run.labels, labels)
        np.testing.assert_allclose(run.weights @ features, centroids, rtol=1e-9, atol=1e-18)
        np.testing.assert_allclose(run.score, score, rtol=1e-7)
        assert run.steps == reference_steps
        steps.append(run.steps)
    if kind == "gradient":
        assert steps == [1] * 12  # the absolute tolerance stops gradient-sized features after one Lloyd step
    elif iterations == 100:
        assert max(steps) > 2
    for seed in range(3):
        assert gradient_grouping(torch.from_numpy(features), 3, seed, 5, 4, iterations, 1e-4).groups == \
            reference_grouping(features, 3, seed, 5, 4, iterations, 1e-4)


def test_relative_rule_is_scale_free_and_the_reference_rule_is_not():
    features = features_of_scale("unit", seed=3)
    grouped = {scale: {stop: gradient_grouping(torch.from_numpy(features * scale), 3, 0, 5, 4, 100, 1e-4, stop)
                       for stop in ("reference", "relative", "summed")}
               for scale in (1.0, 1e-5)}
    assert grouped[1e-5]["relative"].groups == grouped[1.0]["relative"].groups
    assert grouped[1e-5]["relative"].lloyd_steps == grouped[1.0]["relative"].lloyd_steps
    assert set(grouped[1e-5]["reference"].lloyd_steps) == {1} and max(grouped[1.0]["reference"].lloyd_steps) > 2


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-6, 1e-2))
def test_coordinate_test_with_the_bound_equals_computing_every_coordinate(seed, tolerance):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(6, 500)) * 10.0 ** rng.uniform(-7, -2, size=500)  # coordinates of every size
    points = KMeansPoints.from_features(torch.from_numpy(features), tolerance)
    shift = rng.dirichlet(np.ones(6), size=3) - rng.dirichlet(np.ones(6), size=3)
    shift[rng.integers(3)] = 0.0  # an unchanged centroid
    assert points.every_coordinate_moved_less(shift, tolerance) == bool(np.all(np.abs(shift @ features) < tolerance))

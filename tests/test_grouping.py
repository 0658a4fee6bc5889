"""Task grouping: K-means in Gram space equals K-means on the points; never NaN, never an empty group."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3dt.grouping import (gradient_features_gram, gradient_grouping, groups_to_json, kmeans_gram,
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


def test_feature_gram_is_mean_gradient_times_task_gradient():
    gradients = torch.randn(5, 1000)
    gradients[:, 100:200] = 0  # coordinates zero for every task are dropped: they change nothing
    exact = gradients.double()
    features = exact * exact.mean(dim=0, keepdim=True)
    np.testing.assert_allclose(gradient_features_gram(gradients, chunk=64), (features @ features.T).numpy(), rtol=1e-9)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([center + rng.normal(scale=0.1, size=(5, 2)) for center in centers])
    groups = gradient_grouping(points @ points.T, 3, seed=0, restarts=10, repeats=3, iterations=100, tolerance=1e-4)
    assert sorted(sorted(group) for group in groups) == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]


def test_more_groups_than_natural_clusters():
    """Two distinct points repeated: 5 groups cannot all be filled by nearest-centroid assignment, yet no
    group is empty and nothing is NaN."""
    points = np.array([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 4)
    gram = points @ points.T
    labels, inertia = kmeans_gram(gram, 5, np.random.default_rng(0), 100, 1e-4)
    assert np.isfinite(inertia)
    assert set(labels) == set(range(5))
    groups = gradient_grouping(gram, 5, seed=0, restarts=4, repeats=4, iterations=100, tolerance=1e-4)
    assert all(groups) and sorted(t for g in groups for t in g) == list(range(8))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 20), st.integers(1, 20), st.integers(0, 10_000))
def test_grouping_is_always_a_partition(tasks, groups, seed):
    if groups > tasks:
        with pytest.raises(ValueError):
            random_grouping(tasks, groups, seed)
        return
    points = np.random.default_rng(seed).normal(size=(tasks, 3)).round(0)  # ties and duplicates
    gram = points @ points.T
    for result in (random_grouping(tasks, groups, seed),
                   gradient_grouping(gram, groups, seed, restarts=2, repeats=2, iterations=20, tolerance=1e-4)):
        assert len(result) == groups and all(result)
        assert sorted(t for g in result for t in g) == list(range(tasks))


def test_group_file_format():
    assert groups_to_json([[1], [0, 2]], ["a", "b", "c"]) == {"expert_0": ["b"], "expert_1": ["a", "c"]}

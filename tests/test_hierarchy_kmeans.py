"""Balanced hierarchical k-means: recovery of a planted hierarchy, balancing, determinism,
and valid trees for nodes with too few documents."""

import numpy as np
import pytest

from hmem_jax.config import ConfigError, HierarchyConfig
from hmem_jax.hierarchy import ClusterTree, balance_assignments
from hmem_jax.hierarchy.kmeans import fit_hierarchical_kmeans, kmeans_plus_plus

BRANCHING, DEPTH = 4, 3


def planted_hierarchy(seed=0, per_leaf=25, dim=24, spreads=(10.0, 3.0, 1.0), noise=0.12):
    """Points around a planted tree of centres; returns (points, true global id per level)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((1, dim))
    for spread in spreads:
        offsets = rng.standard_normal((len(centres), BRANCHING, dim))
        offsets *= spread / np.linalg.norm(offsets, axis=2, keepdims=True)
        centres = (centres[:, None, :] + offsets).reshape(-1, dim)
    leaves = np.repeat(np.arange(len(centres)), per_leaf)
    points = centres[leaves] + noise * rng.standard_normal((len(leaves), dim)) / np.sqrt(dim)
    truth = np.stack([leaves // BRANCHING ** (DEPTH - 1 - level) for level in range(DEPTH)], 1)
    order = rng.permutation(len(points))
    return points[order].astype(np.float32), truth[order]


def adjusted_rand_index(labels_true, labels_pred):
    """ARI (Hubert & Arabie) from the contingency table."""
    _, true_ids = np.unique(labels_true, return_inverse=True)
    _, pred_ids = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((true_ids.max() + 1, pred_ids.max() + 1))
    np.add.at(table, (true_ids, pred_ids), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index = pairs(table)
    rows, cols, total = pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(true_ids)]))
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    return (index - expected) / (maximum - expected)


def small_config(**overrides):
    values = dict(branching=BRANCHING, depth=DEPTH, em_steps=10, samples_per_step=800, seed=0)
    return HierarchyConfig(**{**values, **overrides})


def test_adjusted_rand_index_reference_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_a_planted_hierarchy_at_every_level(seed):
    points, truth = planted_hierarchy(seed=seed)
    tree = ClusterTree.fit(points, small_config(seed=seed), "synthetic")
    found = tree.block_ids(tree.route(points))
    for level in range(DEPTH):
        ari = adjusted_rand_index(truth[:, level], found[:, level])
        assert ari >= 0.9, f"level {level + 1}: ARI {ari:.3f}"


def test_same_seed_gives_an_identical_tree_and_other_seeds_differ():
    points, _ = planted_hierarchy(seed=3)
    first = ClusterTree.fit(points, small_config(seed=7), "synthetic")
    second = ClusterTree.fit(points, small_config(seed=7), "synthetic")
    other = ClusterTree.fit(points, small_config(seed=8), "synthetic")
    for a, b in zip(first.levels, second.levels):
        np.testing.assert_array_equal(a, b)
    assert first.content_hash == second.content_hash != other.content_hash


def test_tree_does_not_depend_on_the_number_of_worker_threads():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((3000, 16)).astype(np.float32)
    config = small_config(em_steps=5, samples_per_step=500, seed=2)
    one, _ = fit_hierarchical_kmeans(points, config, workers=1)
    two, _ = fit_hierarchical_kmeans(points, config, workers=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_balancing_caps_every_cluster_at_the_threshold():
    rng = np.random.default_rng(0)
    assignment = np.where(rng.random(1000) < 0.8, 3, rng.integers(0, 16, 1000))
    balanced = balance_assignments(assignment.copy(), 16, 0.094, rng)
    assert np.bincount(balanced, minlength=16).max() <= 0.094 * 1000


def test_balancing_splits_the_largest_cluster_with_the_smallest_only():
    rng = np.random.default_rng(1)
    assignment = np.array([0] * 50 + [1] * 30 + [2] * 20)
    balanced = balance_assignments(assignment.copy(), 4, 0.45, rng)
    # Cluster 0 (0.5 > 0.45) is pooled with cluster 3 (empty): 25 / 25; the others are untouched.
    np.testing.assert_array_equal(np.bincount(balanced, minlength=4), [25, 30, 20, 25])
    np.testing.assert_array_equal(balanced[50:], assignment[50:])
    assert set(balanced[:50]) == {0, 3}


def test_balancing_leaves_balanced_assignments_alone():
    rng = np.random.default_rng(2)
    assignment = np.arange(160) % 16
    np.testing.assert_array_equal(
        balance_assignments(assignment.copy(), 16, 0.094, rng), assignment
    )


def test_balancing_stops_when_the_threshold_cannot_be_met():
    """5 samples in 16 clusters: one sample is already 0.2 > 0.094; nothing can improve."""
    rng = np.random.default_rng(3)
    assignment = np.array([0, 0, 0, 1, 2])
    balanced = balance_assignments(assignment.copy(), 16, 0.094, rng)
    assert np.bincount(balanced, minlength=16).max() == 1


def test_balancing_spreads_a_dense_region_over_several_clusters():
    """80% of the points in one dense blob. Without the rule one level-1 cluster takes most of
    the blob; with it, routes stay within 1.5 times the threshold. (The rule bounds each EM step's
    assignments; a blob much tighter than the gaps between centroids can still end up in one
    Voronoi cell, which is why this is a bound on routes, not an equality.)"""
    rng = np.random.default_rng(4)
    blob = 0.6 * rng.standard_normal((4000, 16))
    spread = 3.0 * rng.standard_normal((1000, 16))
    points = np.concatenate([blob, spread]).astype(np.float32)

    def largest_share(threshold):
        config = HierarchyConfig(
            branching=16, depth=1, em_steps=20, samples_per_step=2000, balance_threshold=threshold
        )
        tree = ClusterTree.fit(points, config, "synthetic")
        return np.bincount(tree.route(points)[:, 0], minlength=16).max() / len(points)

    assert largest_share(0.094) <= 1.5 * 0.094
    assert largest_share(1.0) > 0.25


def test_nodes_with_fewer_documents_than_branching_still_give_a_complete_tree():
    rng = np.random.default_rng(5)
    points = rng.standard_normal((6, 8)).astype(np.float32)  # 6 documents, 64 leaves
    tree = ClusterTree.fit(points, small_config(), "synthetic")
    assert tree.num_clusters == (4, 16, 64)
    assert all(np.isfinite(c).all() for c in tree.levels)
    paths = tree.route(points)
    leaves = tree.block_ids(paths)[:, -1]
    assert len(set(leaves.tolist())) == len(points)  # every document has a leaf of its own
    np.testing.assert_allclose(tree.levels[-1][leaves], points, atol=1e-6)
    queries = tree.route(rng.standard_normal((50, 8)).astype(np.float32))
    assert queries.min() >= 0 and queries.max() < BRANCHING
    assert tree.fit_info["levels"][-1]["empty_nodes"] > 0


def test_a_single_document_and_duplicated_documents_give_valid_trees():
    single = np.ones((1, 5), np.float32)
    duplicates = np.tile(np.arange(5, dtype=np.float32), (40, 1))
    for points in (single, duplicates):
        tree = ClusterTree.fit(points, small_config(), "synthetic")
        paths = tree.route(points)
        assert (paths == 0).all()  # ties go to the first (lowest-index) child
        np.testing.assert_allclose(tree.levels[-1][0], points[0], atol=1e-6)


def test_kmeans_plus_plus_returns_only_distinct_points():
    rng = np.random.default_rng(6)
    points = np.repeat(rng.standard_normal((3, 4)).astype(np.float32), 10, axis=0)
    centres = kmeans_plus_plus(points, 16, rng)
    assert len(centres) == 3
    assert len(np.unique(centres, axis=0)) == 3


def test_empty_or_nan_embeddings_cannot_be_fitted():
    with pytest.raises(ValueError, match="empty"):
        ClusterTree.fit(np.zeros((0, 8), np.float32), small_config(), "synthetic")
    bad = np.ones((10, 8), np.float32)
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ClusterTree.fit(bad, small_config(), "synthetic")


def test_balance_threshold_below_a_fair_share_is_a_config_error():
    with pytest.raises(ConfigError, match="1/branching"):
        HierarchyConfig(branching=4, balance_threshold=0.1)
    assert HierarchyConfig().effective_balance_threshold == 0.094
    assert HierarchyConfig(branching=4).effective_balance_threshold == pytest.approx(0.376)

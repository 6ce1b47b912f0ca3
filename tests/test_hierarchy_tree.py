"""ClusterTree: greedy routing, block ids, save/load, and clear errors on bad input."""

import json

import numpy as np
import pytest

from hmem_jax.config import HierarchyConfig
from hmem_jax.hierarchy import ClusterTree, cluster_report, get_embedder

BRANCHING, DEPTH, DIM = 4, 3, 12


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tree(points):
    config = HierarchyConfig(branching=BRANCHING, depth=DEPTH, em_steps=8, samples_per_step=600)
    return ClusterTree.fit(points, config, "hashed")


def brute_force_paths(tree, queries):
    """The definition: at each level, the nearest (float64 L2) of the current node's children."""
    paths = np.zeros((len(queries), tree.depth), np.int32)
    for row, query in enumerate(queries.astype(np.float64)):
        cluster = 0
        for level, centroids in enumerate(tree.levels):
            children = centroids[cluster * tree.branching : (cluster + 1) * tree.branching]
            child = int(np.argmin(((children.astype(np.float64) - query) ** 2).sum(axis=1)))
            paths[row, level] = child
            cluster = cluster * tree.branching + child
    return paths


def test_routing_equals_brute_force_greedy_descent(tree, points):
    rng = np.random.default_rng(1)
    queries = np.concatenate([points[:300], rng.standard_normal((300, DIM)).astype(np.float32)])
    np.testing.assert_array_equal(tree.route(queries), brute_force_paths(tree, queries))


def test_routes_do_not_depend_on_batch_size_or_threads(tree):
    """Large inputs take the threaded, BLAS-limited path; small ones run inline."""
    queries = np.random.default_rng(2).standard_normal((6000, DIM)).astype(np.float32)
    inline = np.concatenate([tree.route(chunk) for chunk in np.array_split(queries, 6)])
    np.testing.assert_array_equal(tree.route(queries, workers=2, batch_size=1500), inline)
    np.testing.assert_array_equal(tree.route(queries, workers=1), inline)
    np.testing.assert_array_equal(inline[:200], brute_force_paths(tree, queries[:200]))


def test_route_shapes_and_ranges(tree, points):
    paths = tree.route(points)
    assert paths.shape == (len(points), DEPTH) and paths.dtype == np.int32
    assert paths.min() >= 0 and paths.max() < BRANCHING
    assert tree.route(np.zeros((0, DIM), np.float32)).shape == (0, DEPTH)
    assert tree.num_clusters == (4, 16, 64)


def test_block_ids_accumulate_the_path_prefix(tree):
    paths = np.array([[0, 0, 0], [3, 3, 3], [1, 2, 3]], np.int32)
    expected = np.array([[0, 0, 0], [3, 15, 63], [1, 1 * 4 + 2, (1 * 4 + 2) * 4 + 3]])
    np.testing.assert_array_equal(tree.block_ids(paths), expected)
    assert tree.block_ids(paths).dtype == np.int32


def test_block_ids_reject_paths_from_another_tree(tree):
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        tree.block_ids(np.array([[0, 5, 0]]))
    with pytest.raises(ValueError, match="shape"):
        tree.block_ids(np.zeros((2, 2), np.int32))


def test_save_then_load_gives_identical_routes_and_hash(tree, points, tmp_path):
    tree.save(tmp_path / "tree")
    loaded = ClusterTree.load(tmp_path / "tree", embedder="hashed")
    assert loaded.content_hash == tree.content_hash
    np.testing.assert_array_equal(loaded.route(points), tree.route(points))
    manifest = json.loads((tmp_path / "tree" / "tree.json").read_text())
    for key in ("embedder", "dim", "branching", "depth", "seed", "content_hash"):
        assert key in manifest
    assert (manifest["embedder"], manifest["dim"], manifest["depth"]) == ("hashed", DIM, DEPTH)


def test_loading_with_another_embedder_names_both_and_the_fix(tree, tmp_path):
    tree.save(tmp_path / "tree")
    with pytest.raises(ValueError) as error:
        ClusterTree.load(tmp_path / "tree", embedder="minilm", dim=384)
    message = str(error.value)
    assert "'hashed'" in message and "'minilm'" in message and "re-fit" in message
    with pytest.raises(ValueError, match=f"dimension {DIM}"):
        ClusterTree.load(tmp_path / "tree", embedder="hashed", dim=384)


def test_route_texts_rejects_an_embedder_of_another_space(tree):
    with pytest.raises(ValueError, match="'hashed' embeddings of dimension 12"):
        tree.route_texts(["a prompt"], get_embedder("hashed"))  # 384-d vs the tree's 12-d


def test_route_texts_embeds_and_routes_like_route():
    embedder = get_embedder("hashed")
    texts = [f"Fact {i}: element {i} has {i % 7} isotopes." for i in range(200)]
    embeddings = embedder.embed(texts)
    tree = ClusterTree.fit(
        embeddings,
        HierarchyConfig(branching=4, depth=2, em_steps=4, samples_per_step=200),
        "hashed",
    )
    np.testing.assert_array_equal(tree.route_texts(texts, embedder), tree.route(embeddings))


def test_a_tree_remembers_the_embedder_version_and_rejects_another(tmp_path):
    embedder = get_embedder("hashed")
    texts = [f"Element {i} was found in Zorvale in the year {1700 + i}." for i in range(64)]
    tree = ClusterTree.fit(embedder.embed(texts), HierarchyConfig(branching=4, depth=1), embedder)
    tree.save(tmp_path)
    loaded = ClusterTree.load(tmp_path, embedder=embedder)
    assert loaded.embedder_version == embedder.version
    reweighted = get_embedder("hashed", group_weights=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="same name, different vectors"):
        loaded.route_texts(texts[:2], reweighted)


def fitted_idf_tree(tmp_path):
    embedder = get_embedder("hashed_idf")
    texts = [
        f"Element Zor{chr(97 + i % 26)}ium {i} was found in the year {1700 + i}." for i in range(64)
    ]
    embedder.fit(texts)
    tree = ClusterTree.fit(
        embedder.embed(texts), HierarchyConfig(branching=4, depth=2, samples_per_step=64), embedder
    )
    tree.save(tmp_path)
    return tree, embedder, texts


def test_a_tree_keeps_its_embedders_statistics_and_routes_with_them(tmp_path):
    tree, embedder, texts = fitted_idf_tree(tmp_path)
    loaded = ClusterTree.load(tmp_path)
    assert loaded.content_hash == tree.content_hash and loaded.embedder_name == "hashed_idf"
    np.testing.assert_array_equal(
        loaded.route_texts(texts, loaded.make_embedder()), tree.route_texts(texts, embedder)
    )
    with pytest.raises(ValueError, match="make_embedder"):
        loaded.route_texts(texts[:2], get_embedder("hashed_idf"))  # no statistics
    refitted = get_embedder("hashed_idf")
    refitted.fit(texts[:10])
    with pytest.raises(ValueError, match="same name, different vectors"):
        loaded.route_texts(texts[:2], refitted)


def test_modified_or_missing_embedder_statistics_are_detected(tmp_path):
    fitted_idf_tree(tmp_path)
    path = tmp_path / "embedder_state.npz"
    with np.load(path) as arrays:
        state = {key: arrays[key] for key in arrays.files}
    state["document_frequencies"][0] += 1
    np.savez(path, **state)
    with pytest.raises(ValueError, match="content hash"):
        ClusterTree.load(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match="is missing"):
        ClusterTree.load(tmp_path)


def test_modified_centroids_on_disk_are_detected(tree, tmp_path):
    tree.save(tmp_path / "tree")
    path = tmp_path / "tree" / "centroids_level2.npy"
    centroids = np.load(path)
    centroids[0, 0] += 1.0
    np.save(path, centroids)
    with pytest.raises(ValueError, match="content hash"):
        ClusterTree.load(tmp_path / "tree")


def test_loading_a_folder_without_a_tree_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tree.json"):
        ClusterTree.load(tmp_path)


def test_nan_and_wrong_dimension_embeddings_are_clear_errors(tree):
    bad = np.zeros((3, DIM), np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 rows \(first: \[1\]\)"):
        tree.route(bad)
    with pytest.raises(ValueError, match=f"dimension 7 but the cluster tree expects {DIM}"):
        tree.route(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        tree.route(np.zeros(DIM, np.float32))


def test_report_counts_every_document_at_every_level(tree, points):
    report = cluster_report(tree, points, tree.route(points))
    assert report["documents"] == len(points)
    for level in report["levels"]:
        assert sum(level["size_histogram"]["counts"]) == level["clusters"]
        assert 0 < level["max_fraction"] <= level["max_fraction_of_parent"] <= 1
        assert level["inertia"] >= 0
    inertia = [level["inertia"] for level in report["levels"]]
    assert inertia == sorted(inertia, reverse=True)  # deeper levels fit tighter

"""Test set-up: 8 fake CPU devices (before jax is imported), offline Hugging Face, small helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers.small import SMALL_CORPUS_PARAMS, SMALL_TREE_PARAMS

# Tests build the same small programs many times (resume = train twice); a
# persistent compilation cache turns the repeats into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("HMEM_TEST_COMPILE_CACHE", "/tmp/hmem_jax_test_compile_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class RandomPackedBatches:
    """Deterministic packed batches: batch(step) is a function of (seed, step) only.

    Each row holds two documents and a little padding, so document masking and
    loss masking are exercised. Slices rows like a multi-process loader would.
    """

    def __init__(
        self,
        vocab: int,
        batch: int,
        length: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        self.vocab, self.batch, self.length, self.seed = vocab, batch, length, seed
        self.rows = slice(
            process_index * batch // process_count, (process_index + 1) * batch // process_count
        )

    def batch_at(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        tokens = rng.integers(1, self.vocab, (self.batch, self.length)).astype(np.int32)
        split = self.length * 5 // 8
        segment_ids = np.ones_like(tokens)
        segment_ids[:, split:] = 2
        segment_ids[:, self.length - 3 :] = 0
        tokens[segment_ids == 0] = 0
        positions = np.concatenate([np.arange(split), np.arange(self.length - split)])
        positions = np.broadcast_to(positions, tokens.shape).astype(np.int32) * (segment_ids > 0)
        full = dict(tokens=tokens, segment_ids=segment_ids, positions=positions.astype(np.int32))
        return {k: v[self.rows] for k, v in full.items()}

    batch_shards = 1  # no memory: no per-shard block lists

    def iterate(self, start_step: int):
        step = start_step
        while True:
            yield step, self.batch_at(step)
            step += 1


@pytest.fixture
def random_batches():
    return RandomPackedBatches


@pytest.fixture(scope="session")
def small_prepared_data(tmp_path_factory):
    """A prepared (tokenized, packed) small embedded corpus, shared by the tests of a session.

    Returns (prepared_dir, gin bindings that reproduce its settings).
    """
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.main.common import load_train_config

    out = str(tmp_path_factory.mktemp("prepared") / "data")
    params = SMALL_CORPUS_PARAMS + (f"DataConfig.prepared_dir = '{out}'",)
    ensure_prepared(load_train_config((), params), out, progress=False)
    return out, params


@pytest.fixture(scope="session")
def small_prepared_tree_data(tmp_path_factory):
    """The small corpus routed by a real 4 x 2 ClusterTree and packed per leaf cluster.

    Returns (prepared_dir, tree_dir, gin bindings that reproduce its settings).
    """
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.hierarchy.corpus import cluster_corpus
    from hmem_jax.main.common import load_train_config

    root = tmp_path_factory.mktemp("prepared_tree")
    out, tree = str(root / "data"), str(root / "tree")
    params = SMALL_TREE_PARAMS + (
        f"DataConfig.prepared_dir = '{out}'",
        f"TrainConfig.tree_dir = '{tree}'",
    )
    cfg = load_train_config((), params)
    cluster_corpus(cfg.data, cfg.hierarchy, tree, verbose=False)
    ensure_prepared(cfg, out, tree, progress=False)
    return out, tree, params


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Gin bindings are global: clear them around each test so none leaks into the next."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()

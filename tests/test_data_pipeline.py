"""prepare + Loader: packing per leaf cluster, exact token accounting, deterministic batches."""

import collections
import json
import os

import numpy as np
import pytest

from hmem_jax.config import DataConfig, HierarchyConfig, TrainConfig
from hmem_jax.data import prepare as prepare_lib
from hmem_jax.data import prepared
from hmem_jax.data.loader import DataMismatchError, Loader
from hmem_jax.data.packing import LeafPacker
from hmem_jax.data.routing import TreeRouter
from hmem_jax.data.sources import read_documents
from hmem_jax.data.tokenizer import TokenizerError, load_tokenizer
from hmem_jax.errors import PreparedDataError
from hmem_jax.hierarchy.embedders import get_embedder
from hmem_jax.hierarchy.tree import ClusterTree

SEQ_LEN = 64
DATA = DataConfig(
    embedded_entities=120,
    embedded_seed=5,
    vocab_size=500,
    prepare_workers=0,
    prepare_chunk_documents=64,
)


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory):
    texts = [d.text for d in read_documents(DATA)]
    embeddings = get_embedder("hashed").embed(texts)
    tree = ClusterTree.fit(
        embeddings,
        HierarchyConfig(branching=3, depth=2, em_steps=3, samples_per_step=400),
        "hashed",
    )
    directory = str(tmp_path_factory.mktemp("tree"))
    tree.save(directory)
    return directory


@pytest.fixture(scope="module")
def routed_dir(tree_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "routed")
    prepare_lib.prepare(DATA, SEQ_LEN, out, tree_dir=tree_dir, progress=False)
    return out


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "plain")
    config = TrainConfig(data=DATA, seq_len=SEQ_LEN, batch_size=8)
    return prepare_lib.ensure_prepared(config, out, progress=False)


def _records(directory):
    """Every record in file order: (leaf, tokens[T], segment_ids[T])."""
    loader = Loader(directory, global_batch_size=1, seq_len=SEQ_LEN, seed=0)
    leaves = np.fromfile(os.path.join(directory, prepared.RECORD_LEAVES_FILE), dtype="<i4")
    token_bytes = SEQ_LEN * np.dtype(loader.manifest["token_dtype"]).itemsize
    for index, raw in enumerate(loader._source.__getitems__(range(loader.num_records))):
        array = np.frombuffer(raw, dtype=np.uint8)
        yield (
            int(leaves[index]),
            array[:token_bytes].view(loader.manifest["token_dtype"]),
            array[token_bytes:].view(loader.manifest["segment_dtype"]),
        )


def _documents_per_leaf(directory, tree_dir):
    """What each leaf must contain: its documents' tokens + EOT, in corpus order."""
    tokenizer = load_tokenizer(directory)
    documents = list(read_documents(DATA))
    if tree_dir is None:
        keys = [()] * len(documents)
    else:
        router = TreeRouter.load(tree_dir)
        keys = [tuple(p) for p in router.route([d.text for d in documents]).tolist()]
    leaf_paths = (
        np.load(os.path.join(directory, prepared.LEAF_PATHS_FILE)).tolist() if tree_dir else [[]]
    )
    leaf_of = {tuple(path): leaf for leaf, path in enumerate(leaf_paths)}
    expected = collections.defaultdict(list)
    for key, document in zip(keys, documents):
        expected[leaf_of[key]].append(tokenizer.encode(document.text) + [tokenizer.eot_id])
    return expected


def _pieces(document):
    """A document as packing must store it: whole if it fits, else seq_len chunks + the rest."""
    whole = (len(document) - 1) // SEQ_LEN * SEQ_LEN
    return [tuple(document[i : i + SEQ_LEN]) for i in range(0, whole, SEQ_LEN)] + [
        tuple(document[whole:])
    ]


@pytest.mark.parametrize("routed", [True, False])
def test_each_leaf_holds_exactly_its_documents_uncut(routed, routed_dir, plain_dir, tree_dir):
    directory = routed_dir if routed else plain_dir
    found = collections.defaultdict(collections.Counter)
    for leaf, tokens, segment_ids in _records(directory):
        for segment in np.unique(segment_ids[segment_ids > 0]):
            found[leaf][tuple(tokens[segment_ids == segment].tolist())] += 1
    expected = _documents_per_leaf(directory, tree_dir if routed else None)
    assert (
        len(found)
        == len(expected)
        == json.load(open(os.path.join(directory, "manifest.json")))["leaves"]["count"]
    )
    for leaf, documents in expected.items():
        # no token of another cluster, none lost or repeated, and every document that fits
        # in a sequence is one segment (only longer ones are cut, at seq_len)
        assert found[leaf] == collections.Counter(
            piece for document in documents for piece in _pieces(document)
        ), leaf
    if routed:
        assert len(expected) > 3
    assert any(len(d) > SEQ_LEN for documents in expected.values() for d in documents)


def test_packing_fills_first_fit_and_bounds_open_sequences():
    packer = LeafPacker(10, 1, 0, np.dtype("u2"), np.dtype("u2"), open_per_leaf=2)
    completed = []
    for leaf, length in [(0, 5), (0, 6), (1, 3), (0, 3), (0, 4), (0, 7), (0, 8)]:
        completed += packer.add(leaf, np.arange(2, 2 + length))
    completed += packer.finish()
    rows = [(leaf, tokens.tolist(), segments.tolist()) for leaf, tokens, segments in completed]
    # leaf 0: 6 opens A; 7 opens B; 4 fills A exactly (completed); 5 opens D; 8 and 9 each
    # open a third sequence, so the fullest (the new one) is completed; B and D are left
    assert rows[0] == (0, [2, 3, 4, 5, 6, 1, 2, 3, 4, 1], [1] * 6 + [2] * 4)
    assert [leaf for leaf, _, _ in rows] == [0, 0, 0, 0, 0, 1]
    assert [sum(s > 0 for s in segments) for _, _, segments in rows] == [10, 8, 9, 7, 5, 4]
    for _, tokens, segments in rows:
        assert len(tokens) == 10
        for segment in set(segments) - {0}:
            piece = [t for t, s in zip(tokens, segments) if s == segment]
            assert piece[-1] == 1 and 1 not in piece[:-1]  # every document whole, EOT last
    with pytest.raises(ValueError, match="open_per_leaf"):
        LeafPacker(10, 1, 0, np.dtype("u2"), np.dtype("u2"), open_per_leaf=0)


def test_segments_positions_and_eot_are_consistent(routed_dir):
    loader = Loader(routed_dir, global_batch_size=16, seq_len=SEQ_LEN, seed=0)
    eot = loader.tokenizer.eot_id
    batch = loader.batch(0)
    for tokens, segments, positions in zip(
        batch["tokens"], batch["segment_ids"], batch["positions"]
    ):
        used = segments > 0
        assert np.all(used[: used.sum()])  # padding only at the end
        ids = segments[used]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for segment in np.unique(ids):
            where = np.flatnonzero(segments == segment)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            # only a segment's last token may be EOT; a segment cut by the sequence end has none
            assert np.all(tokens[where[:-1]] != eot)
            if where[-1] < used.sum() - 1:
                assert tokens[where[-1]] == eot
        assert np.all(positions[~used] == 0) and np.all(tokens[~used] == loader.tokenizer.pad_id)


def test_one_epoch_reads_every_record_once_and_counts_every_token(routed_dir, tree_dir):
    batch_size = 8
    loader = Loader(routed_dir, batch_size, SEQ_LEN, seed=3)
    steps = -(-loader.num_records // batch_size)
    rows = np.concatenate([loader.record_indices(s) for s in range(steps)])[: loader.num_records]
    assert sorted(rows.tolist()) == list(range(loader.num_records))
    counted = collections.Counter()
    delivered = 0
    for step in range(steps):
        batch = loader.batch(step)
        keep = min(batch_size, loader.num_records - step * batch_size)
        tokens, segments = batch["tokens"][:keep], batch["segment_ids"][:keep]
        counted.update(tokens[segments > 0].tolist())
        delivered += keep
    expected = collections.Counter()
    for documents in _documents_per_leaf(routed_dir, tree_dir).values():
        for document in documents:
            expected.update(document)
    assert delivered == loader.num_records
    assert counted == expected
    assert sum(expected.values()) == loader.manifest["num_tokens"]


def test_epochs_are_reshuffled_and_seeds_differ(routed_dir):
    loader = Loader(routed_dir, 8, SEQ_LEN, seed=3)
    n = loader.num_records
    first = [loader._order[g] for g in range(n)]
    second = [loader._order[g] for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    other = Loader(routed_dir, 8, SEQ_LEN, seed=4)
    assert [other._order[g] for g in range(n)] != first


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_is_a_pure_function_of_seed_and_step(routed_dir):
    one = Loader(routed_dir, 8, SEQ_LEN, seed=11)
    two = Loader(routed_dir, 8, SEQ_LEN, seed=11)
    for step in (0, 5, 1234):
        _assert_batches_equal(one.batch(step), two.batch(step))


def test_resume_is_a_jump_with_prefetch(routed_dir):
    loader = Loader(routed_dir, 8, SEQ_LEN, seed=11, worker_count=2, prefetch=3)
    iterator = loader.iterate(start_step=40)
    for expected_step in range(40, 46):
        step, batch = next(iterator)
        assert step == expected_step
        _assert_batches_equal(batch, Loader(routed_dir, 8, SEQ_LEN, seed=11).batch(step))
    iterator.close()


def test_two_process_slices_union_to_the_one_process_batch(routed_dir):
    whole = Loader(routed_dir, 8, SEQ_LEN, seed=2, batch_shards=2).batch(7)
    halves = [
        Loader(routed_dir, 8, SEQ_LEN, seed=2, process_index=p, process_count=2).batch(7)
        for p in range(2)
    ]
    for key in whole:
        if key.startswith("block_union"):  # the global batch's distinct ids: the same everywhere
            for half in halves:
                np.testing.assert_array_equal(half[key], whole[key])
        else:  # rows, and the per-shard block lists, split by process
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


@pytest.mark.parametrize("shards", [1, 4])
def test_per_shard_ids_and_slots_reconstruct_every_path(routed_dir, tree_dir, shards):
    tree = ClusterTree.load(tree_dir)
    loader = Loader(routed_dir, 8, SEQ_LEN, seed=9, batch_shards=shards)
    per_shard = 8 // shards
    assert loader.block_capacity == [min(3, per_shard), per_shard]  # min(shard batch, clusters)
    for step in range(6):
        batch = loader.batch(step)
        expected_ids = tree.block_ids(batch["paths"])
        for level in (1, 2):
            ids, slots = batch[f"block_ids_l{level}"], batch[f"block_slots_l{level}"]
            union = batch[f"block_union_l{level}"]
            padding = tree.num_clusters[level - 1]
            assert ids.shape == (shards, loader.block_capacity[level - 1])
            for s in range(shards):
                rows = slice(s * per_shard, (s + 1) * per_shard)
                np.testing.assert_array_equal(ids[s][slots[rows]], expected_ids[rows, level - 1])
                valid = ids[s][ids[s] != padding]
                assert np.all(np.diff(valid) > 0)  # sorted, unique
                assert set(valid) == set(expected_ids[rows, level - 1])
                assert np.all(ids[s][len(valid) :] == padding)
            distinct = np.unique(expected_ids[:, level - 1])
            np.testing.assert_array_equal(union[: len(distinct)], distinct)
            assert np.all(union[len(distinct) :] == padding)


def test_plain_data_has_no_paths(plain_dir):
    batch = Loader(plain_dir, 4, SEQ_LEN, seed=0).batch(0)
    assert set(batch) == {"tokens", "segment_ids", "positions"}


def test_wrong_seq_len_and_batch_split_are_clear_errors(routed_dir):
    with pytest.raises(DataMismatchError, match="TrainConfig.seq_len = 128"):
        Loader(routed_dir, 8, 128, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        Loader(routed_dir, 8, SEQ_LEN, seed=0, process_count=3)


def test_resuming_on_changed_tokenizer_or_tree_is_a_clear_error(routed_dir, plain_dir):
    saved = Loader(routed_dir, 8, SEQ_LEN, seed=0).fingerprint
    with pytest.raises(DataMismatchError, match="tokenizer_sha256: the run started with"):
        Loader(routed_dir, 8, SEQ_LEN, seed=0, expect={**saved, "tokenizer_sha256": "0" * 64})
    with pytest.raises(DataMismatchError, match="tree_hash"):
        Loader(plain_dir, 8, SEQ_LEN, seed=0, expect=saved)
    with pytest.raises(DataMismatchError, match="was routed with"):
        Loader(routed_dir, 8, SEQ_LEN, seed=0, tree_hash="another-tree")


def test_swapped_tokenizer_file_is_refused(plain_dir, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(plain_dir, copy)
    with open(os.path.join(copy, "tokenizer.model"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(TokenizerError, match="does not match"):
        Loader(copy, 4, SEQ_LEN, seed=0)


def test_ensure_prepared_reuses_matching_and_names_mismatches(plain_dir, tree_dir):
    config = TrainConfig(data=DATA, seq_len=SEQ_LEN, batch_size=8)
    before = os.path.getmtime(os.path.join(plain_dir, "manifest.json"))
    assert prepare_lib.ensure_prepared(config, plain_dir) == plain_dir
    assert os.path.getmtime(os.path.join(plain_dir, "manifest.json")) == before
    with pytest.raises(PreparedDataError, match="seq_len: requested 32, prepared 64"):
        prepare_lib.ensure_prepared(TrainConfig(data=DATA, seq_len=32), plain_dir)
    with pytest.raises(PreparedDataError, match="tree_hash: requested '[0-9a-f]+'"):
        prepare_lib.ensure_prepared(config, plain_dir, tree_dir=tree_dir)


def test_incomplete_directory_is_never_reused_or_touched(tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "shard-00000.array_record").write_bytes(b"half written")
    with pytest.raises(PreparedDataError, match="no manifest.json"):
        prepare_lib.ensure_prepared(TrainConfig(data=DATA, seq_len=SEQ_LEN), str(stale))
    assert os.listdir(stale) == ["shard-00000.array_record"]


def test_a_crash_mid_prepare_leaves_nothing_that_looks_prepared(tmp_path, tree_dir):
    class FailingRouter(TreeRouter):
        calls = 0

        def route(self, texts):
            FailingRouter.calls += 1
            if FailingRouter.calls == 3:
                raise RuntimeError("simulated crash")
            return super().route(texts)

    router = FailingRouter(ClusterTree.load(tree_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_lib.prepare(DATA, SEQ_LEN, str(tmp_path / "out"), router=router, progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_documents_are_reported_in_the_manifest(tmp_path):
    path = tmp_path / "docs.jsonl"
    good = [{"text": f"Document number {i} talks about rivers and cities."} for i in range(30)]
    lines = [json.dumps(g) for g in good] + ['{"text": ""}', "garbage"]
    path.write_bytes(
        "\n".join(lines).encode()
        + b'\n{"text": "bad \xff byte"}\n'
        + json.dumps({"text": "long " * 400}).encode()
        + b"\n"
    )
    data = DataConfig(
        source="jsonl", path=str(path), vocab_size=300, prepare_workers=2, max_document_chars=500
    )
    manifest = prepare_lib.prepare(data, 32, str(tmp_path / "out"), progress=False)
    assert manifest["corpus"]["empty_skipped"] == 1
    assert manifest["corpus"]["malformed_skipped"] == 1
    assert manifest["corpus"]["non_utf8_replaced"] == 1
    assert manifest["corpus"]["huge_split"] == 1
    assert manifest["num_documents"] == 30 + 1 + 4  # 2,000 chars -> 4 pieces of 500
    batch = Loader(str(tmp_path / "out"), 2, 32, seed=0).batch(0)
    assert batch["tokens"].shape == (2, 32)


def test_prepare_reports_documents_per_second_files_and_an_eta_in_a_log(tmp_path, capsys):
    """Not on a terminal (a job's log): a line every interval and one at the end, with the
    files read of all and an ETA from them."""
    import io

    from hmem_jax.data.progress import PrepareProgress

    for number in range(3):
        rows = [json.dumps({"text": f"file {number} line {i} about rivers"}) for i in range(20)]
        (tmp_path / f"part-{number}.jsonl").write_text("\n".join(rows) + "\n")
    data = DataConfig(source="jsonl", path=str(tmp_path), vocab_size=300)
    prepare_lib.prepare(data, 32, str(tmp_path / "out"), progress=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("prepare: 60 documents, ") and "documents/s" in last
    assert last.endswith("file 3/3, ETA 0:00:00")

    log = io.StringIO()
    report = PrepareProgress(4, interval_s=0.0, stream=log)
    report.add_documents(10)
    assert log.getvalue().splitlines()[-1].endswith("file 0/4, ETA unknown")
    report.file_done()
    assert report.eta_seconds() is not None and report.eta_seconds() >= 0
    assert "file 1/4, ETA " in log.getvalue().splitlines()[-1]


def test_embedded_preparation_writes_probes(plain_dir):
    manifest = prepared.read_manifest(plain_dir)
    assert manifest["probes"]["count"] == DATA.embedded_entities
    with open(os.path.join(plain_dir, manifest["probes"]["file"])) as handle:
        first = json.loads(handle.readline())
    assert set(first) >= {"prompt", "answer", "entity", "bucket"}

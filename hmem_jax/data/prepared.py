"""The prepared-data format: file names, record dtypes and the manifest; all a reader needs.

A prepared directory holds (written by `data/prepare.py`, read by `data/loader.py`):
- `shard-NNNNN.array_record`: one record per sequence, `tokens` then
  `segment_ids`, each `seq_len` little-endian integers of the manifest's dtypes;
  written with `group_size:1` so grain reads any record directly;
- `record_leaves.bin`: int32[num_records], the leaf index of every record, so a
  loader knows the cluster path of every sequence of a batch without reading it;
- `leaf_paths.npy` / `leaf_block_ids.npy`: int32[num_leaves, depth], per leaf its
  child index and its global block id at each level (absent without a tree);
- `tokenizer.model` or `tokenizer.json`; `probes.jsonl` (embedded source only);
- `element_counts.json`: how often each chemical element's name occurs in the
  corpus (hmem_jax/data/elements.py), which buckets the atomic-number probe;
- `manifest.json`: written last. A directory is complete iff it has one.

Prepared data may live on an object store (uploaded with the manifest last);
grain reads ArrayRecord shards from local files only, so each host reads a
copy on its own disk (`local_copy`, made once per manifest and reused).

The manifest's `settings` (`requested_settings`) are what the data was made
from; equal settings mean the data can be reused, and `settings_mismatches`
names every difference when they are not.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from hmem_jax import paths
from hmem_jax.config import DataConfig
from hmem_jax.data import tokenizer as tokenizer_lib
from hmem_jax.data.sources import describe_source
from hmem_jax.errors import PreparedDataError

FORMAT_VERSION = 1
PACKING = "first_fit"  # packing.LeafPacker; recorded so data packed otherwise is not reused
MANIFEST_FILE = "manifest.json"
RECORD_LEAVES_FILE = "record_leaves.bin"
LEAF_PATHS_FILE = "leaf_paths.npy"
LEAF_BLOCK_IDS_FILE = "leaf_block_ids.npy"
PROBES_FILE = "probes.jsonl"
SHARD_PATTERN = "shard-{:05d}.array_record"


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def segment_dtype_for(seq_len: int) -> np.dtype:
    return np.dtype(np.uint16 if seq_len < 1 << 16 else np.int32)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requested_settings(data: DataConfig, seq_len: int, tree_hash: str | None) -> dict[str, Any]:
    """The inputs that determine a prepared dataset; equal settings mean reusable data."""
    given = (
        tokenizer_lib.tokenizer_file(data.tokenizer, data.tokenizer_path)
        if data.tokenizer_path
        else None
    )
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "packing": PACKING,
        "tokenizer": {
            "kind": data.tokenizer,
            "requested_vocab_size": data.vocab_size,
            "from_file_sha256": _file_sha256(given) if given else None,
            "train_chars": None if data.tokenizer_path else data.tokenizer_train_chars,
        },
        "tree_hash": tree_hash,
        "source": describe_source(data),
    }


def read_manifest(prepared_dir: str) -> dict[str, Any]:
    path = paths.join(prepared_dir, MANIFEST_FILE)
    if not paths.isfile(path):
        raise PreparedDataError(
            f"{prepared_dir!r} holds no {MANIFEST_FILE}, so it is not a complete prepared "
            "dataset. Run `python -m hmem_jax.main.prepare --out=DIR` (or let training "
            "prepare the embedded corpus)."
        )
    manifest = json.loads(paths.read_text(path))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{prepared_dir!r} has prepared-data format {manifest.get('format_version')!r}; this "
            f"code reads format {FORMAT_VERSION}. Prepare the data again."
        )
    return manifest


def settings_mismatches(
    expected: dict[str, Any], found: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Human-readable differences between two settings dicts, one line per leaf field."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        want, have = expected.get(key), found.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            lines += settings_mismatches(want, have, f"{prefix}{key}.")
        elif want != have:
            lines.append(f"{prefix}{key}: requested {want!r}, prepared {have!r}")
    return lines


def local_copy(prepared_dir: str) -> str:
    """`prepared_dir` itself when it is local; for a gs:// or s3:// URL a copy of it on this
    host's disk (`paths.cache_dir('prepared')`), made on first use and reused while the remote
    manifest is unchanged. A copy is downloaded into a scratch folder and renamed into place
    whole, so a killed download is never taken for a complete copy, and of processes of one
    host racing to make it, one rename wins and the others use it."""
    if not paths.is_remote(prepared_dir):
        return prepared_dir
    import shutil
    import tempfile

    manifest_text = paths.read_text(paths.join(prepared_dir, MANIFEST_FILE))
    key = hashlib.sha256(f"{prepared_dir}\n{manifest_text}".encode()).hexdigest()[:20]
    parent = paths.cache_dir("prepared")
    target = os.path.join(parent, key)
    if os.path.isfile(os.path.join(target, MANIFEST_FILE)):
        return target
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{key}.", dir=parent)
    try:
        paths.download_tree(prepared_dir, scratch)
        with open(os.path.join(scratch, MANIFEST_FILE), encoding="utf-8") as handle:
            if handle.read() != manifest_text:
                raise PreparedDataError(
                    f"{prepared_dir!r} changed while it was being copied to {target}; "
                    "is another job preparing it? Start again once it is complete."
                )
        try:
            os.rename(scratch, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, MANIFEST_FILE)):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target

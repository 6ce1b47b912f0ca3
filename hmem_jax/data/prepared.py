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
    if data.tokenizer_path:
        tokenizer_lib.check_tokenizer_path(data.tokenizer_path)
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "packing": PACKING,
        "tokenizer": {
            "kind": data.tokenizer,
            "requested_vocab_size": data.vocab_size,
            "from_file_sha256": (
                _file_sha256(data.tokenizer_path) if data.tokenizer_path else None
            ),
            "train_chars": None if data.tokenizer_path else data.tokenizer_train_chars,
        },
        "tree_hash": tree_hash,
        "source": describe_source(data),
    }


def read_manifest(prepared_dir: str) -> dict[str, Any]:
    path = os.path.join(prepared_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise PreparedDataError(
            f"{prepared_dir!r} holds no {MANIFEST_FILE}, so it is not a complete prepared "
            "dataset. Run `python -m hmem_jax.main.prepare --out=DIR` (or let training "
            "prepare the embedded corpus)."
        )
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
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

"""Create, inspect, copy and export a streamed memory bank (docs/bank.md).

    python -m hmem_jax.main.bank create  --store=PATH_OR_URL [--gin_file=...] [--gin_param=...]
    python -m hmem_jax.main.bank inspect --store=... [--bank_version=STEP] [--norm_blocks=64]
    python -m hmem_jax.main.bank copy    --store=... --copy_to=PATH_OR_URL [--bank_version=STEP]
    python -m hmem_jax.main.bank export  --store=... --export_dir=DIR [--bank_version=STEP]
    python -m hmem_jax.main.bank merge   --subtree_runs=RUN0,RUN1,... --merged_workdir=DIR

The bank's geometry comes from the gin config (model, hierarchy and memory
sizes), exactly as for training, and must match the store's manifest.
`--store` takes what `MemoryConfig.bank_store` takes (a path, a kvstore URL
such as gs://bucket/bank/ or memory://x/, or a JSON spec); default: that field,
or WORKDIR/bank with --bank_workdir=WORKDIR. `copy` writes the chosen version's stored
blocks into a new store as one version of the same step (untouched blocks stay
lazy), with the destination's layout from the config (`MemoryConfig.blocks_per_shard`,
`MemoryConfig.store_splits`: e.g. re-cut a bank for a run with more
processes). `export` writes every level's parameters, untouched blocks
materialised, as `.npy` files `<export_dir>/<level>/<matrix>.npy` [clusters, layers, ...].
`merge` combines the banks of subtree-parallel frozen-anchor jobs (runs with
`TrainConfig.subtree` = 0, 1, ...) into one run folder (hmem_jax/bank/merge.py).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from hmem_jax.main import common

STORE = flags.DEFINE_string("store", "", "The bank: path, kvstore URL or JSON spec.")
WORKDIR = flags.DEFINE_string("bank_workdir", "", "A run folder; its bank is WORKDIR/bank.")
TO = flags.DEFINE_string("copy_to", "", "copy: the destination store (path, URL or JSON spec).")
OUT = flags.DEFINE_string("export_dir", "", "export: output folder for .npy files.")
VERSION = flags.DEFINE_integer(
    "bank_version", None, "Bank version (checkpoint step); default latest."
)
NORM_BLOCKS = flags.DEFINE_integer(
    "norm_blocks", 64, "inspect: touched blocks per level read for parameter norms (0 = none)."
)
SUBTREE_RUNS = flags.DEFINE_list("subtree_runs", [], "merge: the subtree jobs' run folders.")
MERGED = flags.DEFINE_string("merged_workdir", "", "merge: the new run folder to write.")
OVERWRITE = common.overwrite_flag()
RECOVER_UID = flags.DEFINE_string(
    "recover_uid",
    "",
    "create: rewrite a lost manifest.json of a store that holds data, with this uid (the "
    "bank_uid of the run's checkpoint record) and the layout the config gives.",
)
BATCH_BLOCKS = 16


def open_store(location: str, create: bool, writer: bool, recover_uid: str = ""):
    from hmem_jax.bank.layout import kvstore_spec
    from hmem_jax.bank.store import BankStore
    from hmem_jax.train.memory import MemoryPlan

    cfg = common.config_from_flags()
    plan = MemoryPlan.from_config(cfg)
    if plan is None:
        common.fail("MemoryConfig.kind = 'none' has no bank; give the run's gin config.")
    spec = kvstore_spec(location or cfg.memory.bank_store, WORKDIR.value or os.getcwd())
    return BankStore(
        spec,
        plan.geometry,
        plan.with_generic,
        cfg.memory.bank_dtype,
        cfg.memory.moment_dtype,
        cfg.memory.init_seed,
        cfg.memory.blocks_per_shard,
        create=create,
        writer=writer,
        splits=cfg.memory.store_splits or 1,
        recover_uid=recover_uid,
    )


def at_version(store, version: int | None) -> int | None:
    versions = store.versions()
    if version is None:
        version = versions[-1] if versions else None
    elif version not in versions:
        common.fail(f"--bank_version={version}: the bank at {store.where} holds {versions}.")
    if version is not None:
        store.restore(version)
    return version


def inspect(store, version: int | None, norm_blocks: int) -> dict:
    """Sizes, touched fraction and parameter norms per level (JSON-able)."""
    report = {
        "store": store.where,
        "uid": store.uid,
        "version": version,
        "versions": store.versions(),
        "manifest": store.manifest,
        "levels": {},
    }
    for key, layout in store.layouts.items():
        touched = np.nonzero(store.touched(key))[0]
        level = {
            "clusters": layout.clusters,
            "rank": layout.rank,
            "block_bytes": layout.block_bytes,
            "param_bytes_per_block": layout.param_bytes,
            "level_bytes": layout.block_bytes * layout.clusters,
            "touched_blocks": int(len(touched)),
            "touched_fraction": len(touched) / layout.clusters,
            "stored_bytes": layout.block_bytes * len(touched),
        }
        sample = touched[:norm_blocks] if len(touched) else np.arange(min(norm_blocks, 1))
        if norm_blocks and len(sample):
            rows = store.read(key, sample)
            level["mean_norms"] = {
                f: float(
                    np.mean(np.linalg.norm(v.reshape(len(sample), -1).astype(np.float32), axis=1))
                )
                for f, v in rows.items()
                if f.startswith("params/")
            }
            level["mean_updates"] = float(np.mean(rows["count"]))
        report["levels"][key] = level
    return report


def copy(store, target, version: int) -> int:
    """Copy the version's stored blocks into `target` and seal them there as `version`."""
    blocks = 0
    for key in store.layouts:
        touched = np.nonzero(store.touched(key))[0]
        for start in range(0, len(touched), BATCH_BLOCKS):
            ids = touched[start : start + BATCH_BLOCKS]
            target.write(key, ids, store.read(key, ids))
            blocks += len(ids)
    target.seal(version)
    return blocks


def export(store, out: str) -> list[str]:
    """Every level's parameters as .npy [clusters, layers, ...], untouched blocks materialised."""
    written = []
    for key, layout in store.layouts.items():
        os.makedirs(os.path.join(out, key), exist_ok=True)
        arrays = {
            f: np.lib.format.open_memmap(
                os.path.join(out, key, f[len("params/") :] + ".npy"),
                mode="w+",
                dtype=dtype,
                shape=(layout.clusters,) + shape,
            )
            for f, (shape, dtype) in layout.fields.items()
            if f.startswith("params/")
        }
        for start in range(0, layout.clusters, BATCH_BLOCKS):
            ids = np.arange(start, min(start + BATCH_BLOCKS, layout.clusters))
            rows = store.read(key, ids)
            for f, array in arrays.items():
                array[ids] = rows[f]
        for array in arrays.values():
            array.flush()
            assert array.filename is not None
            written.append(array.filename)
    return written


def main(argv: list[str]) -> None:
    commands = ("create", "inspect", "copy", "export", "merge")
    if len(argv) != 2 or argv[1] not in commands:
        common.fail(
            f"Give one command of {commands}, e.g. python -m hmem_jax.main.bank inspect "
            "--store=DIR --gin_file=..."
        )
    command = argv[1]
    if command == "merge":
        if not SUBTREE_RUNS.value or not MERGED.value:
            common.fail("merge needs --subtree_runs=RUN0,RUN1,... and --merged_workdir=DIR.")
        from hmem_jax.bank.merge import merge_subtree_runs

        out = merge_subtree_runs(SUBTREE_RUNS.value, MERGED.value)
        print(f"merged {len(SUBTREE_RUNS.value)} subtree jobs into {out}")
        return
    if RECOVER_UID.value and command != "create":
        common.fail("--recover_uid goes with the create command.")
    store = open_store(
        STORE.value,
        create=command == "create",
        writer=False,
        recover_uid=RECOVER_UID.value if command == "create" else "",
    )
    if command == "create":
        stored = f"versions {store.versions()}" if store.versions() else "nothing stored yet"
        print(
            f"bank {store.uid} at {store.where}: "
            f"{store.geometry.bank_params:,} parameters, {stored}"
        )
        return
    version = at_version(store, VERSION.value)
    if command == "inspect":
        print(json.dumps(inspect(store, version, NORM_BLOCKS.value), indent=1))
    elif command == "copy":
        if not TO.value:
            common.fail("copy needs --copy_to=DESTINATION.")
        if version is None:
            common.fail(f"The bank at {store.where} holds no version to copy.")
        target = open_store(TO.value, create=True, writer=True)
        print(
            f"copied {copy(store, target, version)} blocks of version {version} to {target.where}"
        )
    else:
        if not OUT.value:
            common.fail("export needs --export_dir=DIR.")
        common.refuse_to_overwrite(OUT.value, "--export_dir", OVERWRITE.value)
        for path in export(store, OUT.value):
            print(path)


def run() -> None:
    """The command line entry point."""
    common.run(main, positional=True)


if __name__ == "__main__":
    run()

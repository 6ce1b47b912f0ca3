"""Two processes on loopback (jax.distributed, started by launch/local.sh) train together and
agree with one process."""

import json
import os

import numpy as np
import pytest
from helpers.launch import run_local, train_flags

pytestmark = pytest.mark.multiprocess


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([r["train/loss"] for r in rows]), [r["step"] for r in rows]


# (2 processes x 4 devices against 1 x 8 without a memory bank: tests/test_launch.py,
# test_local_two_processes_train_like_one_process.)


LOGGED_TRAIN = """
import json, os, sys
import jax
import numpy as np
from hmem_jax.bank import store as store_lib
from hmem_jax.main import train as train_main

original_read, original_write = store_lib.BankStore.read, store_lib.BankStore.write_pieces

def log(entry):
    with open(os.environ["STORE_LOG"] + f".{jax.process_index()}", "a") as out:
        out.write(json.dumps({"process": jax.process_index(), **entry}) + "\\n")

def logged_read(self, key, ids, boxes=None):
    rows = original_read(self, key, ids, boxes)
    log({"op": "read", "level": key, "ids": np.asarray(ids).tolist(),
         "boxes": {f: [list(r) for r in boxes[f]] for f in rows} if boxes else None,
         "bytes": {f: int(v.nbytes) for f, v in rows.items()}})
    return rows

def logged_write(self, key, pieces):
    pieces = list(pieces)
    for field, ids, _, box in pieces:
        log({"op": "write", "generation": self.current_gen, "level": key, "field": field,
             "ids": np.asarray(ids).tolist(), "box": [list(r) for r in box]})
    return original_write(self, key, pieces)

store_lib.BankStore.read, store_lib.BankStore.write_pieces = logged_read, logged_write
train_main.run()
"""


def _store_log(prefix, pid):
    return [json.loads(line) for line in open(f"{prefix}.{pid}")]


def _final_bank(workdir):
    """level -> field -> value of every block in the run's latest bank version."""
    import gin
    from helpers.bank import streamed_bank

    from hmem_jax.main.common import load_train_config

    gin.clear_config()
    cfg = load_train_config((os.path.join(workdir, "config.gin"),), ())
    return streamed_bank(cfg, {"driver": "file", "path": os.path.join(workdir, "bank") + "/"})


def test_two_processes_stream_one_bank_each_reading_and_writing_only_its_half(
    tmp_path, small_prepared_tree_data
):
    """Streamed bank, 2 processes: each reads and writes only the half of every block its
    devices hold (the store keeps one chunk per half), every piece of every updated block is
    written exactly once, and losses and final bank equal one process's."""
    prepared, _, params = small_prepared_tree_data
    params = params + (
        "TrainConfig.steps = 6",
        "TrainConfig.batch_size = 8",
        "TrainConfig.log_every = 1",
        "TrainConfig.checkpoint_every = 3",
        "MeshConfig.data = 2",
        "MeshConfig.fsdp = -1",
        "MemoryConfig.kind = 'ffn'",
        "MemoryConfig.level_sizes = (8, 4)",
        "MemoryConfig.lr = 1e-2",
        "MemoryConfig.warmup_steps = 1",
        "MemoryConfig.bank_tier = 'streaming'",
        "MemoryConfig.prefetch_steps = 1",
    )

    # The trainer with its bank store's reads and writes logged (per process), as a module
    # local.sh can start.
    (tmp_path / "logged_train.py").write_text(LOGGED_TRAIN)

    def launch(processes, workdir, store_log):
        env = dict(os.environ, STORE_LOG=str(tmp_path / store_log))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        devices = f"--devices_per_process={8 // processes}"
        done = run_local(
            processes, devices, "--module=logged_train", *train_flags(workdir, params), env=env
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

    single, multi = tmp_path / "single", tmp_path / "multi"
    launch(1, single, "s1")
    launch(2, multi, "s2")

    single_losses, steps = _losses(single)
    multi_losses, _ = _losses(multi)
    assert steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)

    # Reads: the same blocks as one process, but only half of every matrix (moments too).
    def read_bytes(entries):
        out = {}
        for e in entries:
            if e["op"] == "read":
                for field, n in e["bytes"].items():
                    out[(e["level"], field)] = out.get((e["level"], field), 0) + n
        return out

    whole = read_bytes(_store_log(tmp_path / "s1", 0))
    halves = {}
    for pid in (0, 1):
        entries = _store_log(tmp_path / "s2", pid)
        assert all(e["process"] == pid for e in entries)
        got = read_bytes(entries)
        assert set(got) == set(whole)
        for (level, field), n in got.items():
            want = whole[(level, field)] if field == "count" else whole[(level, field)] // 2
            assert n == want, (pid, level, field, n, whole[(level, field)])
        for e in entries:
            if e["op"] == "read":
                for field, box in e["boxes"].items():
                    halves.setdefault((e["level"], field), {}).setdefault(pid, box)
                    assert box == halves[(e["level"], field)][pid]  # always its own half
    for (level, field), boxes in halves.items():
        if field != "count":
            assert boxes[0] != boxes[1], (level, field)

    # Writes: each piece of a block is written by one process only, the one holding it (a
    # block updated again after its write-back is written again, by the same process).
    pieces = {}  # (generation, level, field, block) -> [(box, process)]
    for pid in (0, 1):
        for e in _store_log(tmp_path / "s2", pid):
            if e["op"] == "write":
                if e["field"] != "count":
                    assert e["box"] == halves[(e["level"], e["field"])][pid], e
                for block in e["ids"]:
                    pieces.setdefault((e["generation"], e["level"], e["field"], block), []).append(
                        (tuple(map(tuple, e["box"])), pid)
                    )
    assert {p for written in pieces.values() for _, p in written} == {0, 1}
    for where, written in pieces.items():
        writers = {}
        for box, pid in written:
            writers.setdefault(box, set()).add(pid)
        assert all(len(p) == 1 for p in writers.values()), (where, written)
        assert len(writers) == (1 if where[2] == "count" else 2), (where, written)

    want, got = _final_bank(single), _final_bank(multi)
    # Two processes sum gradients in another order than one. Adam divides by sqrt(v), so for a
    # near-zero gradient that rounding becomes a visible share of a step of size lr: bound the
    # difference by a thousandth of the farthest a parameter can move (lr x 6 steps).
    movement = 1e-2 * 6
    for key, fields in want.items():
        touched = np.nonzero(got[key]["count"])[0]
        assert len(touched) and {b for _, level, _, b in pieces if level == key} >= set(touched)
        for field, value in fields.items():
            np.testing.assert_allclose(
                got[key][field].astype(np.float32),
                value.astype(np.float32),
                rtol=1e-4,
                atol=1e-3 * movement if field.startswith("params") else 1e-6,
                err_msg=f"{key} {field}",
            )

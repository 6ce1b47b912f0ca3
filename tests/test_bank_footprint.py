"""`memory_footprint` (and `hmem info --devices`) against what the compiled step really takes."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from hmem_jax import sharding
from hmem_jax.bank.footprint import memory_footprint
from hmem_jax.config import (DataConfig, HierarchyConfig, MemoryConfig, MeshConfig, ModelConfig,
                             OptimConfig, TrainConfig)
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan, ids_key, memory_schedule, slots_key
from hmem_jax.train.optimizer import learning_rate_schedule, make_optimizer
from hmem_jax.train.state import create_state, state_shardings
from hmem_jax.train.step import StepFunctions, compile_train_step

MODEL = ModelConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=2, head_dim=32, d_ff=128)
MEMORY = MemoryConfig(kind="ffn", level_sizes=(8, 4))


def _config(mesh: MeshConfig, memory: MemoryConfig) -> TrainConfig:
    return TrainConfig(model=MODEL, batch_size=8, seq_len=16, steps=4, mesh=mesh, memory=memory,
                       hierarchy=HierarchyConfig(branching=4, depth=2), optim=OptimConfig(),
                       data=DataConfig(vocab_size=512))


def _argument_bytes(cfg: TrainConfig) -> tuple[int, int]:
    """(argument bytes per device of the compiled step, of them the memory's batch keys)."""
    analysis, extra = _compile(cfg)
    return int(analysis.argument_size_in_bytes), extra


def _compile(cfg: TrainConfig):
    """The compiled step's memory analysis on 8 devices, and its memory batch keys' bytes."""
    mesh = sharding.build_mesh(cfg.mesh, jax.devices()[:8])
    rules = sharding.rules_of(cfg.mesh)
    plan = MemoryPlan.from_config(cfg)
    host = plan is not None and cfg.memory.bank_tier == "streaming"
    state_plan = None if host else plan
    model = Transformer(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.steps)
    fns = StepFunctions(model=model, tx=tx, schedule=learning_rate_schedule(cfg.optim, cfg.steps),
                        micro_batches=1, grad_clip=1.0, plan=plan, host_bank=host,
                        memory_schedule=memory_schedule(cfg.memory, cfg.steps) if plan else None)
    state = create_state(model, tx, mesh, rules, 0, state_plan)
    b, t = cfg.batch_size, cfg.seq_len
    local = {"tokens": np.ones((b, t), np.int32), "segment_ids": np.ones((b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
    extra_keys = []
    if plan is not None:
        for level in plan.levels:
            clusters = plan.geometry.clusters(level)
            local[ids_key(level)] = np.arange(min(b, clusters), dtype=np.int32)
            local[slots_key(level)] = np.arange(b, dtype=np.int32) % min(b, clusters)
            extra_keys += [ids_key(level), slots_key(level)]
    batch = sharding.global_batch(local, mesh, rules, replicate=plan.replicated_keys() if plan
                                  else ())
    rows = None
    if host:
        bank = jax.device_put(plan.init_bank(), sharding.replicated(mesh))
        rows = jax.device_put(plan.fetch(bank, batch), sharding.replicated(mesh))
    run = compile_train_step(fns, mesh, rules, state_shardings(model, tx, mesh, rules, state_plan))
    analysis = run.compiled(state, batch, rows).memory_analysis()
    extra = sum(batch[k].addressable_shards[0].data.nbytes for k in extra_keys)
    for ids, _ in (rows or {}).values():  # the rows' own ids; the step passes a buffer once
        if not any(ids is batch[k] for k in extra_keys):
            extra += ids.addressable_shards[0].data.nbytes
    return analysis, extra


_REPLICATED_BANK = tuple(r for r in MeshConfig().rules if r[0] != "memory_blocks") + (
    ("memory_blocks", None),)


@pytest.mark.parametrize("mesh", [MeshConfig(data=2, fsdp=1, memory=4), MeshConfig(data=8, fsdp=1),
                                  MeshConfig(data=8, fsdp=1, rules=_REPLICATED_BANK)],
                         ids=["data2-memory4", "data8", "data8-replicated-bank"])
def test_footprint_matches_the_compiled_steps_arguments(mesh):
    anchor, _ = _argument_bytes(_config(mesh, MemoryConfig()))
    device_cfg = _config(mesh, MEMORY)
    with_bank, device_keys = _argument_bytes(device_cfg)
    streamed_cfg = _config(mesh, dataclasses.replace(MEMORY, bank_tier="streaming"))
    with_rows, streamed_keys = _argument_bytes(streamed_cfg)

    device = memory_footprint(device_cfg, 8)
    assert device.per_device_batch * device.batch_shards == 8
    # The device tier's extra arguments are its resident bank share (plus ids and slots).
    assert with_bank - anchor - device_keys == device.bank_bytes_per_device
    if mesh.rules == _REPLICATED_BANK:
        assert device.bank_bytes_per_device == device.bank_bytes
    else:  # level 2 (16 blocks) splits 8 ways; level 1 (4) and the generic block do not
        assert device.bank_bytes_per_device < device.bank_bytes / 2
    # A streamed step's extra arguments are the rows it fetched, on every device.
    streamed = memory_footprint(streamed_cfg, 8)
    assert streamed.bank_bytes_per_device == 0
    assert with_rows - anchor - streamed_keys == streamed.memory_step_bytes_per_device


def test_a_sharded_bank_is_never_assembled_on_one_device():
    """Gathering a step's rows from row-sharded levels must not all-gather the bank first."""
    memory = MemoryConfig(kind="ffn", level_sizes=(8, 64))
    hierarchy = HierarchyConfig(branching=16, depth=2)
    runs = {}
    for name, mesh in (("sharded", MeshConfig(data=8, fsdp=1)),
                       ("replicated", MeshConfig(data=8, fsdp=1, rules=_REPLICATED_BANK))):
        cfg = dataclasses.replace(_config(mesh, memory), hierarchy=hierarchy)
        runs[name], _ = _compile(cfg)
    bank_saved = (runs["replicated"].argument_size_in_bytes
                  - runs["sharded"].argument_size_in_bytes)
    assert bank_saved > 50e6  # level 2: 256 blocks, split 8 ways
    extra_temp = runs["sharded"].temp_size_in_bytes - runs["replicated"].temp_size_in_bytes
    assert extra_temp < 0.05 * bank_saved, (extra_temp, bank_saved)


def _info(*flags):
    return subprocess.run([sys.executable, "-m", "hmem_jax.main.info", *flags],
                          capture_output=True, text=True, timeout=300)


def test_info_reports_the_footprint_for_any_mesh_size():
    params = ("MemoryConfig.kind = 'ffn'", "HierarchyConfig.depth = 2",
              "MemoryConfig.level_sizes = (8, 4)", "TrainConfig.batch_size = 64")
    done = _info("--devices=64", "--per_device_batch=2", *[f"--gin_param={p}" for p in params])
    assert done.returncode == 0, done.stderr[-2000:]
    footprint = json.loads(done.stdout)["memory_footprint"]
    assert footprint["devices"] == 64 and footprint["global_batch"] == 128
    bad = _info("--devices=0")
    assert bad.returncode != 0 and "--devices" in bad.stderr and "Traceback" not in bad.stderr

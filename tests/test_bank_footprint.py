"""`memory_footprint` (and `hmem info --devices`) against what the compiled step really takes."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from hmem_jax import sharding
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.bank.footprint import memory_footprint
from hmem_jax.config import (
    DataConfig,
    HierarchyConfig,
    MemoryConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from hmem_jax.data.batch import block_ids_key, block_slots_key
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan, memory_schedule
from hmem_jax.train.optimizer import learning_rate_schedule, make_optimizer
from hmem_jax.train.state import create_state, state_shardings
from hmem_jax.train.step import StepFunctions, compile_train_step

MODEL = ModelConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=2, head_dim=32, d_ff=128)
MEMORY = MemoryConfig(kind="ffn", level_sizes=(8, 4))


def _config(mesh: MeshConfig, memory: MemoryConfig) -> TrainConfig:
    return TrainConfig(
        model=MODEL,
        batch_size=8,
        seq_len=16,
        steps=4,
        mesh=mesh,
        memory=memory,
        hierarchy=HierarchyConfig(branching=4, depth=2),
        optim=OptimConfig(),
        data=DataConfig(vocab_size=512),
    )


def _argument_bytes(cfg: TrainConfig) -> tuple[int, int]:
    """(argument bytes per device of the compiled step, of them the memory's batch keys)."""
    analysis, extra, _ = _compile(cfg)
    return int(analysis.argument_size_in_bytes), extra


def _compile(cfg: TrainConfig):
    """The compiled step's memory analysis on 8 devices, its memory batch keys' bytes, and a
    function that runs the step once and returns its metrics."""
    mesh = sharding.build_mesh(cfg.mesh, jax.devices()[:8])
    rules = sharding.rules_of(cfg.mesh)
    plan = MemoryPlan.from_config(cfg)
    host = plan is not None and cfg.memory.bank_tier == "streaming"
    state_plan = None if host else plan
    model = Transformer(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.steps)
    fns = StepFunctions(
        model=model,
        tx=tx,
        schedule=learning_rate_schedule(cfg.optim, cfg.steps),
        micro_batches=1,
        grad_clip=1.0,
        plan=plan,
        host_bank=host,
        memory_schedule=memory_schedule(cfg.memory, cfg.steps) if plan else None,
        exchange=BlockExchange.for_mesh(mesh, rules) if plan else None,
    )
    state = create_state(model, tx, mesh, rules, 0, state_plan)
    b, t = cfg.batch_size, cfg.seq_len
    shards = sharding.batch_shards(mesh, rules)
    local = {
        "tokens": np.ones((b, t), np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }
    extra_keys = []
    if plan is not None:
        for level in plan.levels:
            capacity = min(b // shards, plan.geometry.clusters(level))
            local[block_ids_key(level)] = np.tile(np.arange(capacity, dtype=np.int32), (shards, 1))
            local[block_slots_key(level)] = np.arange(b, dtype=np.int32) % capacity
            extra_keys += [block_ids_key(level), block_slots_key(level)]
    batch = sharding.global_batch(local, mesh, rules)
    rows = None
    if host:
        rows = {}
        for key, level in plan.init_bank().items():
            union = level.count.shape[0] if key == "generic" else min(b, level.count.shape[0])
            ids = (
                batch[block_ids_key(int(key[1:]))]
                if key != "generic"
                else jax.device_put(
                    np.zeros((shards, 1), np.int32), sharding.batch_sharding(mesh, rules, 2)
                )
            )
            view = jax.tree.map(
                lambda x: jax.device_put(
                    x[:union], NamedSharding(mesh, fns.exchange.spec(x.shape))
                ),
                level,
            )
            rows[key] = (
                ids,
                view,
                jax.device_put(np.arange(union, dtype=np.int32), sharding.replicated(mesh)),
            )
    run = compile_train_step(fns, mesh, rules, state_shardings(model, tx, mesh, rules, state_plan))
    analysis = run.compiled(state, batch, rows).memory_analysis()
    extra = sum(batch[k].addressable_shards[0].data.nbytes for k in extra_keys)
    # The rows' block ids only seed a narrow bank's rounding: for this float32 bank the compiled
    # step drops them, so only positions the batch does not already pass count.
    for ids, _, _ in (rows or {}).values():
        if not any(ids is batch[k] for k in extra_keys):
            extra += ids.addressable_shards[0].data.nbytes
    return analysis, extra, lambda: jax.device_get(run(state, batch, rows)[1])


@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param(MeshConfig(data=2, fsdp=1, memory=4), id="data2-memory4"),
        pytest.param(MeshConfig(data=8, fsdp=1), id="data8", marks=pytest.mark.slow),
        pytest.param(MeshConfig(data=2, fsdp=4), id="data2-fsdp4"),
    ],
)
def test_footprint_matches_the_compiled_steps_arguments(mesh):
    anchor, _ = _argument_bytes(_config(mesh, MemoryConfig()))
    device_cfg = _config(mesh, MEMORY)
    with_bank, device_keys = _argument_bytes(device_cfg)
    streamed_cfg = _config(mesh, dataclasses.replace(MEMORY, bank_tier="streaming"))
    with_rows, streamed_keys = _argument_bytes(streamed_cfg)

    device = memory_footprint(device_cfg, 8)
    assert device.per_device_batch * device.batch_shards == 8
    # The device tier's extra arguments are its resident bank share (plus ids and slots):
    # every block split 8 ways along d_model (64), the per-block counts whole.
    assert with_bank - anchor - device_keys == device.bank_bytes_per_device
    counts = 4 * (1 + 4 + 16)
    assert device.bank_bytes_per_device == (device.bank_bytes - counts) // 8 + counts
    # What one device receives per step: its shard's blocks (all distinct and valid here), as
    # the step itself counts them, plus the generic block (fetched_params float32 parameters).
    metrics = _compile(device_cfg)[2]()
    generic = MemoryPlan.from_config(device_cfg).geometry.fetched_params * 4
    assert float(metrics["mem/fetch_bytes"]) + generic == device.memory_step_bytes_per_device
    # A streamed step's extra arguments are the rows it fetched, 1/8 of each on each device.
    streamed = memory_footprint(streamed_cfg, 8)
    assert streamed.bank_bytes_per_device == 0
    assert with_rows - anchor - streamed_keys == streamed.memory_step_bytes_per_device


def test_what_a_step_brings_to_a_device_does_not_grow_with_the_mesh():
    """Weak scaling: at a fixed per-device batch, the blocks a device receives per step stay
    the same from 8 to 256 devices, and its bank share falls as 1/N."""
    memory = MemoryConfig(kind="ffn", level_sizes=(8, 64, 32))
    cfg = dataclasses.replace(
        _config(MeshConfig(data=1, fsdp=-1), memory),
        hierarchy=HierarchyConfig(branching=16, depth=3),
        model=dataclasses.replace(MODEL, d_model=256, head_dim=128),
    )
    small, large = memory_footprint(cfg, 8, 4), memory_footprint(cfg, 256, 4)
    assert small.memory_step_bytes_per_device == large.memory_step_bytes_per_device
    assert large.memory_step_bytes > 10 * small.memory_step_bytes  # the global batch's blocks
    counts = 4 * (16 + 256 + 4096 + 1)
    assert large.bank_bytes_per_device == (large.bank_bytes - counts) // 256 + counts


def test_a_split_bank_is_never_assembled_on_one_device():
    """The step's scratch memory holds a shard's blocks, not the bank: gathering blocks from
    the slices must not all-gather a level first."""
    memory = MemoryConfig(kind="ffn", level_sizes=(8, 64))
    hierarchy = HierarchyConfig(branching=16, depth=2)
    cfg = dataclasses.replace(_config(MeshConfig(data=8, fsdp=1), memory), hierarchy=hierarchy)
    anchor = _compile(_config(MeshConfig(data=8, fsdp=1), MemoryConfig()))[0]
    memory_run = _compile(cfg)[0]
    footprint = memory_footprint(cfg, 8)
    assert footprint.bank_bytes > 70e6  # level 2: 256 blocks of 2 layers x 3 x 64 x 64, x 3
    extra_temp = memory_run.temp_size_in_bytes - anchor.temp_size_in_bytes
    assert extra_temp < 0.05 * footprint.bank_bytes, (extra_temp, footprint.bank_bytes)


def _info(*flags):
    return subprocess.run(
        [sys.executable, "-m", "hmem_jax.main.info", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_info_reports_the_footprint_for_any_mesh_size():
    params = (
        "MemoryConfig.kind = 'ffn'",
        "HierarchyConfig.depth = 2",
        "MemoryConfig.level_sizes = (8, 4)",
        "TrainConfig.batch_size = 64",
    )
    done = _info("--devices=64", "--per_device_batch=2", *[f"--gin_param={p}" for p in params])
    assert done.returncode == 0, done.stderr[-2000:]
    footprint = json.loads(done.stdout)["memory_footprint"]
    assert footprint["devices"] == 64 and footprint["global_batch"] == 128
    bad = _info("--devices=0")
    assert bad.returncode != 0 and "--devices" in bad.stderr and "Traceback" not in bad.stderr

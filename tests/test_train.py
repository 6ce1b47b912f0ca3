"""The training loop: sharding equivalence, resume, accumulation, metrics, errors."""

import json
import os

import jax
import numpy as np
import pytest

from hmem_jax.config import (
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from hmem_jax.train.checkpoint import CheckpointMismatchError
from hmem_jax.train.loop import train

MODEL = ModelConfig(
    vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128
)


def _config(**overrides):
    base = dict(
        model=MODEL,
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=2),
        mesh=MeshConfig(),
        data=DataConfig(vocab_size=512),
        steps=6,
        batch_size=8,
        seq_len=32,
        log_every=2,
        checkpoint_every=3,
        async_checkpointing=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _run(tmp_path, name, cfg, batches, **kwargs):
    source = batches(cfg.model.vocab_size, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    return train(cfg, str(tmp_path / name), source, "data-v1", **kwargs)


def _losses(result):
    return np.array([result.losses[k] for k in sorted(result.losses)])


def test_sharded_training_on_8_devices_matches_one_device(tmp_path, random_batches):
    one = _run(
        tmp_path, "one", _config(mesh=MeshConfig(fsdp=1)), random_batches, devices=jax.devices()[:1]
    )
    eight = _run(
        tmp_path, "eight", _config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)), random_batches
    )
    np.testing.assert_allclose(_losses(one), _losses(eight), rtol=2e-5)
    w = eight.state.params["blocks"]["mlp"]["w_up"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_loss_falls_on_learnable_data(tmp_path, random_batches):
    class Repeating(random_batches):
        def batch_at(self, step):
            return super().batch_at(0)  # one batch over and over: memorisable

    result = _run(tmp_path, "fit", _config(steps=12, checkpoint_every=100), Repeating)
    losses = _losses(result)
    assert losses[-1] < losses[0] - 1.0


def test_stopped_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, random_batches):
    cfg = _config(steps=8)
    full = _run(tmp_path, "full", cfg, random_batches)
    first = _run(tmp_path, "resumed", cfg, random_batches, until_step=5)
    assert sorted(first.losses) == [1, 2, 3, 4, 5]
    second = _run(tmp_path, "resumed", cfg, random_batches)
    assert sorted(second.losses) == [6, 7, 8]
    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # bitwise: data and state depend on the step only
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(second.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoints_keep_only_the_last_n(tmp_path, random_batches):
    cfg = _config(steps=8, checkpoint_every=2, keep_checkpoints=2, async_checkpointing=True)
    _run(tmp_path, "keep", cfg, random_batches)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "keep" / "checkpoints") if d.isdigit())
    assert steps == [6, 8]


def test_gradient_accumulation_equals_the_full_batch(tmp_path, random_batches):
    mesh = MeshConfig(fsdp=2, tensor=4)
    full = _run(tmp_path, "full", _config(mesh=mesh), random_batches)
    accumulated = _run(tmp_path, "accum", _config(mesh=mesh, grad_accum_steps=4), random_batches)
    np.testing.assert_allclose(_losses(full), _losses(accumulated), rtol=2e-5)


def test_metrics_go_to_jsonl_and_tensorboard_with_stable_names(tmp_path, random_batches, capsys):
    _run(tmp_path, "metrics", _config(), random_batches)
    rows = [json.loads(line) for line in open(tmp_path / "metrics" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for name in (
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "perf/step_time_s",
        "perf/tokens_per_s",
        "perf/mfu",
    ):
        assert all(np.isfinite(r[name]) for r in rows), name
    assert os.listdir(tmp_path / "metrics" / "tensorboard")
    out = capsys.readouterr().out
    assert "step 6/6" in out and "tok/s" in out and "eta" in out


def test_resuming_with_another_model_is_refused_naming_the_field(tmp_path, random_batches):
    _run(tmp_path, "run", _config(steps=3), random_batches)
    wider = ModelConfig(**{**MODEL.__dict__, "d_ff": 256})
    with pytest.raises(CheckpointMismatchError, match=r"ModelConfig\.d_ff = 128 \(this run: 256\)"):
        _run(tmp_path, "run", _config(steps=6, model=wider), random_batches)


def test_a_resume_that_changes_only_how_steps_are_computed_follows_the_uninterrupted_run(
    tmp_path, random_batches, capsys
):
    """Remat, mesh, accumulation (compute) and the log cadence (course) change at step 3;
    the run goes on from the checkpoint as the uninterrupted one does and names each change."""
    full = _run(tmp_path, "full", _config(), random_batches, devices=jax.devices()[:1])
    first = _run(tmp_path, "resumed", _config(), random_batches, until_step=3)
    capsys.readouterr()
    changed = _config(
        model=ModelConfig(**{**MODEL.__dict__, "remat": "full"}),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        grad_accum_steps=2,
        log_every=1,
    )
    second = _run(tmp_path, "resumed", changed, random_batches)
    out = capsys.readouterr().out
    assert "ModelConfig.remat 'none' -> 'full'" in out
    assert "MeshConfig.tensor 1 -> 2" in out and "TrainConfig.grad_accum_steps 1 -> 2" in out
    assert "TrainConfig.log_every 2 -> 1" in out
    resumed = {**first.losses, **second.losses}
    assert sorted(resumed) == sorted(full.losses)
    np.testing.assert_allclose([resumed[k] for k in sorted(resumed)], _losses(full), rtol=2e-5)


def test_a_batch_that_does_not_divide_over_the_mesh_is_a_clear_error(tmp_path, random_batches):
    with pytest.raises(ValueError, match="batch shards"):
        _run(
            tmp_path, "bad", _config(batch_size=4, mesh=MeshConfig(data=8, fsdp=1)), random_batches
        )


@pytest.mark.parametrize(
    "mesh, fragment",
    [
        (dict(data=3, fsdp=1), "needs 3 devices"),
        (dict(data=-1, fsdp=-1), "at most one axis"),
        (dict(data=3), "does not divide"),
    ],
)
def test_bad_mesh_shapes_are_clear_errors(tmp_path, random_batches, mesh, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _run(tmp_path, "bad", _config(mesh=MeshConfig(**mesh)), random_batches)


def test_the_result_keeps_a_bounded_history_of_losses(tmp_path, random_batches, monkeypatch):
    from hmem_jax.train import loop

    monkeypatch.setattr(loop, "KEPT_LOSSES", 3)
    result = _run(tmp_path, "run", _config(steps=6), random_batches)
    assert sorted(result.losses) == [4, 5, 6]  # the newest, whatever the run's length

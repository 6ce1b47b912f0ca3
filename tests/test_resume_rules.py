"""Resume rules: what a resumed run may change follows from each config field's role."""

import dataclasses
import re

import pytest

from hmem_jax.config import MemoryConfig, ModelConfig, Role, TrainConfig, settings_of
from hmem_jax.errors import CheckpointMismatchError
from hmem_jax.train.resume import check_resumable, describe_changes, fingerprint, run_record

BASE = TrainConfig(
    model=ModelConfig(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16),
    memory=MemoryConfig(kind="ffn", level_sizes=(0, 8, 16, 32)),
    steps=10,
)


def _replace(cfg, path, value):
    """`cfg` with the field at attribute path `path` (e.g. "model.remat") set to `value`."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)})


@pytest.mark.parametrize(
    "path, value, role",
    [
        ("model.remat", "full", Role.COMPUTE),
        ("model.dtype", "bfloat16", Role.COMPUTE),
        ("model.attention", "chunked", Role.COMPUTE),
        ("mesh.tensor", 2, Role.COMPUTE),
        ("memory.application", "grouped", Role.COMPUTE),
        ("grad_accum_steps", 2, Role.COMPUTE),
        ("steps", 20, Role.COURSE),
        ("optim.peak_lr", 1e-3, Role.COURSE),
        ("memory.bank_store", "/elsewhere/bank", Role.COURSE),
    ],
)
def test_a_change_to_how_steps_are_computed_or_to_the_course_is_allowed_and_named(
    path, value, role
):
    changed = _replace(BASE, path, value)
    allowed = check_resumable(run_record(BASE, "data-1"), changed, "data-1", "ckpt/5")
    assert [(c.setting.path, c.setting.role) for c in allowed] == [(path, role)]
    label = "how the step is computed" if role is Role.COMPUTE else "the course"
    assert describe_changes(allowed).startswith(label)


@pytest.mark.parametrize(
    "path, value, gin_name",
    [
        ("model.d_model", 128, "ModelConfig.d_model"),
        ("model.param_dtype", "bfloat16", "ModelConfig.param_dtype"),
        ("memory.level_sizes", (0, 8, 16, 64), "MemoryConfig.level_sizes"),
        ("memory.bank_dtype", "bfloat16", "MemoryConfig.bank_dtype"),
        ("memory.bank_tier", "streaming", "MemoryConfig.bank_tier"),
        ("batch_size", 32, "TrainConfig.batch_size"),
        ("seed", 1, "TrainConfig.seed"),
        ("hierarchy.depth", 3, "HierarchyConfig.depth"),
    ],
)
def test_a_change_to_what_is_stored_is_refused_naming_the_field_and_both_values(
    path, value, gin_name
):
    changed = _replace(BASE, path, value)
    recorded = next(s.value for s in settings_of(BASE) if s.path == path)
    with pytest.raises(CheckpointMismatchError) as caught:
        check_resumable(run_record(BASE, "data-1"), changed, "data-1", "ckpt/5")
    message = str(caught.value)
    assert f"{gin_name} = " in message and "fresh --workdir" in message and "ckpt/5" in message
    assert repr(list(recorded) if isinstance(recorded, tuple) else recorded) in message


def test_every_stored_difference_is_named_at_once():
    changed = _replace(_replace(BASE, "model.d_model", 128), "seed", 3)
    with pytest.raises(CheckpointMismatchError, match="d_model = 64.*TrainConfig.seed = 0"):
        check_resumable(run_record(BASE, "data-1"), changed, "data-1", "ckpt/5")


def test_other_prepared_data_is_refused():
    with pytest.raises(CheckpointMismatchError, match="other prepared data"):
        check_resumable(run_record(BASE, "data-1"), BASE, "data-2", "ckpt/5")


def test_a_field_the_record_lacks_is_compared_with_its_default():
    """A checkpoint written before a field existed behaved as the field's default."""
    record = run_record(BASE, "data-1")
    del record["config"]["model.qkv_bias"]
    assert check_resumable(record, BASE, "data-1", "ckpt/5") == []
    with pytest.raises(CheckpointMismatchError, match=re.escape("ModelConfig.qkv_bias = False")):
        check_resumable(record, _replace(BASE, "model.qkv_bias", True), "data-1", "ckpt/5")


def test_records_written_before_fields_were_recorded_are_checked_by_their_fingerprints():
    """Such a record held fingerprints of the model config (without the fields added since)
    and of the memory structure."""
    model = dataclasses.asdict(BASE.model)
    for added in ("attention", "attention_block", "attention_max_documents"):
        del model[added]
    memory = dataclasses.asdict(BASE.memory)
    structure = ("kind", "level_sizes", "placement", "placement_layers", "mode")
    structure += ("generic_probability", "init_seed")
    legacy = {
        "model": fingerprint(model),
        "memory": fingerprint({k: memory[k] for k in structure}),
        "data": "data-1",
        "batch_size": BASE.batch_size,
        "seq_len": BASE.seq_len,
        "seed": BASE.seed,
    }
    assert check_resumable(legacy, _replace(BASE, "steps", 99), "data-1", "ckpt/5") == []
    with pytest.raises(CheckpointMismatchError, match="another model configuration"):
        check_resumable(legacy, _replace(BASE, "model.d_ff", 1024), "data-1", "ckpt/5")
    with pytest.raises(CheckpointMismatchError, match="another memory configuration"):
        check_resumable(legacy, _replace(BASE, "memory.init_seed", 4), "data-1", "ckpt/5")


def test_every_leaf_field_has_a_role_and_a_json_value():
    """The record covers the whole config: a new field is recorded (and stored by default)."""
    settings = settings_of(BASE)
    assert len({s.path for s in settings}) == len(settings)
    assert set(run_record(BASE, "d")["config"]) == {s.path for s in settings}
    assert {s.role for s in settings} == set(Role)

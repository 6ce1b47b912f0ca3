"""What a resumed run may change, derived from what each config field shapes.

Every checkpoint carries a record of the run that wrote it: every leaf field
of its `TrainConfig` (by attribute path) and the fingerprint of its prepared
data. A run resuming it is compared field by field, by each field's
`config.Role`:

- `STORED` fields (model shape, memory geometry, bank dtypes, batch size,
  sequence length, seeds, the data's settings) must be equal: the checkpoint's
  arrays, the bank's blocks and the order of batches depend on them. A
  difference is refused, naming each field, its recorded value and the fix.
- `COMPUTE` fields (compute dtype, remat, mesh and sharding rules, gradient
  accumulation, bank rounding, caches) and `COURSE` fields (steps, learning
  rates, log and checkpoint cadence, where inputs are read from) may change;
  the resume names each change.

A field the record lacks (added to the code after the checkpoint was written)
is compared with the field's default, the value the older code behaved as.
Records written before fields were recorded (no `format` key) are checked as
they were then: by fingerprints of the model config and the memory structure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from hmem_jax.config import Role, Setting, TrainConfig, settings_of
from hmem_jax.errors import CheckpointMismatchError

RECORD_FORMAT = 2
_LEGACY_MEMORY_STRUCTURE = (
    "kind",
    "level_sizes",
    "placement",
    "placement_layers",
    "mode",
    "generic_probability",
    "init_seed",
)
# ModelConfig fields added since records hold every field: a legacy model fingerprint lacks them.
_LEGACY_MODEL_ABSENT = ("attention", "attention_block", "attention_max_documents")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, manifests)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _as_json(value: Any) -> Any:
    """`value` as the record holds it (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def run_record(cfg: TrainConfig, data_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records of the run that writes it."""
    return {
        "format": RECORD_FORMAT,
        "config": {s.path: _as_json(s.value) for s in settings_of(cfg)},
        "data": data_fingerprint,
    }


@dataclasses.dataclass(frozen=True)
class Change:
    """One field whose value differs between a checkpoint's run and this one."""

    setting: Setting
    recorded: Any

    def __str__(self) -> str:
        return f"{self.setting.gin_name} {self.recorded!r} -> {_as_json(self.setting.value)!r}"


def changes(record: dict[str, Any], cfg: TrainConfig) -> list[Change]:
    """Every field of `cfg` whose value differs from `record`'s (a format-2 record)."""
    recorded = record["config"]
    found = []
    for setting in settings_of(cfg):
        before = recorded.get(setting.path, _as_json(setting.default))
        if before != _as_json(setting.value):
            found.append(Change(setting, before))
    return found


def check_resumable(
    record: dict[str, Any], cfg: TrainConfig, data_fingerprint: str, where: str
) -> list[Change]:
    """The changes a resume of checkpoint `where` (its `record`) makes, all allowed; raises
    CheckpointMismatchError naming every stored field that differs, or other data."""
    fix = "Resume with the original configuration, or start the new run in a fresh --workdir."
    if record.get("data") != data_fingerprint:
        raise CheckpointMismatchError(
            f"Checkpoint {where} was trained on other prepared data (fingerprint "
            f"{record.get('data')!r}, this run's data {data_fingerprint!r}). {fix}"
        )
    if "format" not in record:
        _check_legacy(record, cfg, where, fix)
        return []
    found = changes(record, cfg)
    refused = [c for c in found if c.setting.role is Role.STORED]
    if refused:
        names = "; ".join(
            f"{c.setting.gin_name} = {c.recorded!r} (this run: {_as_json(c.setting.value)!r})"
            for c in refused
        )
        raise CheckpointMismatchError(
            f"Checkpoint {where} was written with {names}, which shapes what the checkpoint "
            f"stores or the order of its batches. {fix}"
        )
    return found


def describe_changes(found: list[Change]) -> str:
    """One line naming a resume's allowed changes, by role."""
    parts = []
    for role, label in ((Role.COMPUTE, "how the step is computed"), (Role.COURSE, "the course")):
        mine = [str(c) for c in found if c.setting.role is role]
        if mine:
            parts.append(f"{label}: {', '.join(mine)}")
    return "; ".join(parts)


def _check_legacy(record: dict[str, Any], cfg: TrainConfig, where: str, fix: str) -> None:
    """A record written before fields were recorded held these fingerprints and values."""
    memory = dataclasses.asdict(cfg.memory)
    model = {
        k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _LEGACY_MODEL_ABSENT
    }
    expected = {
        "model": fingerprint(model),
        "memory": fingerprint({k: memory[k] for k in _LEGACY_MEMORY_STRUCTURE}),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
    }
    for key, value in expected.items():
        if record.get(key) != value:
            raise CheckpointMismatchError(
                f"Checkpoint {where} was written with another {key} configuration "
                f"({record.get(key)!r}, this run: {value!r}). {fix}"
            )

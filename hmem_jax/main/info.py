"""Describe a configuration without allocating it: `python -m hmem_jax.main.info --gin_file=X`.

Prints JSON: parameter counts (from `jax.eval_shape`, so a 1.4B model costs
nothing), training FLOPs per token, and the run's sizes. With memory, also its
per-device footprint (`hmem_jax.bank.footprint`) on `--devices` devices (default:
the devices present) at `--per_device_batch` sequences per batch shard (default:
the configured batch divided over the batch shards).
"""

from __future__ import annotations

import json

from absl import flags

from hmem_jax.config import TrainConfig
from hmem_jax.main import common

DEVICES = flags.DEFINE_integer("devices", None, "Mesh size to report the memory footprint for.")
PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None, "Sequences per batch shard for the footprint."
)


def describe(
    cfg: TrainConfig, devices: int | None = None, per_device_batch: int | None = None
) -> dict:
    """The configuration's sizes; the memory footprint on `devices` (default: those present)."""
    from hmem_jax.bank.footprint import memory_footprint
    from hmem_jax.bank.geometry import BankGeometry
    from hmem_jax.model import count_params, init_abstract
    from hmem_jax.train.metrics import train_flops_per_token

    anchor = count_params(init_abstract(cfg.model))
    embedding = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
    info = {
        "anchor_params": anchor,
        "anchor_non_embedding_params": anchor - embedding,
        "bank_params": 0,
        "fetched_params": 0,
        "train_flops_per_token": train_flops_per_token(cfg.model, cfg.seq_len),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "total_tokens": cfg.batch_size * cfg.seq_len * cfg.steps,
        "model": dict(cfg.model.__dict__),
    }
    if cfg.memory.enabled:
        geometry = BankGeometry.from_configs(cfg.model, cfg.memory, cfg.hierarchy)
        info.update(
            bank_params=geometry.bank_params,
            fetched_params=geometry.fetched_params,
            fetched_fraction_of_anchor=round(geometry.fetched_params / anchor, 4),
            memory=geometry.describe(),
            training_mode=cfg.memory.mode,
            train_flops_per_token=train_flops_per_token(
                cfg.model, cfg.seq_len, geometry.fetched_params
            ),
        )
        if devices is None:
            import jax

            devices = jax.device_count()
        info["memory_footprint"] = memory_footprint(cfg, devices, per_device_batch).describe()
    return info


def main(argv: list[str]) -> None:
    for flag in (DEVICES, PER_DEVICE_BATCH):
        if flag.value is not None and flag.value < 1:
            common.fail(f"--{flag.name} = {flag.value} must be a positive integer.")
    cfg = common.config_from_flags()
    print(json.dumps(describe(cfg, DEVICES.value, PER_DEVICE_BATCH.value), indent=1))


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="use --gin_file and --gin_param")


if __name__ == "__main__":
    run()

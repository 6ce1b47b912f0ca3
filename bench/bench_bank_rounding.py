"""How much of its updates a bf16 bank keeps: float32 vs bf16 rounded to nearest vs stochastic.

    python bench/bench_bank_rounding.py [--steps=1000]

Runs the bank's lazy AdamW (`hmem_jax.bank.sparse_adamw`) on one level of 64 blocks of
[128, 32] entries initialised like FFN-memory gate/up matrices (truncated normal, std 0.02,
the scale of the paper presets) or sized 0.06-0.12, with noisy but consistent gradients, at the
paper's memory rates (1e-4 peak, 1e-5 end), and prints, per rate and storage: the mean distance
moved, that distance as a share of float32's, and the share of entries an update changes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.bank.sparse_adamw import row_rounding_keys, sparse_adamw
from hmem_jax.config import MemoryConfig

_SHAPE = (64, 128, 32)


def _run(
    start: np.ndarray, dtype, rounding: str, lr: float, steps: int
) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(1)
    direction = rng.normal(size=_SHAPE)
    cfg = MemoryConfig(kind="ffn", level_sizes=(2,), bank_rounding=rounding, weight_decay=0.0)
    rows = {"w": jnp.asarray(start, dtype)}
    mu = nu = {"w": jnp.zeros(_SHAPE, jnp.float32)}
    count, ids = jnp.zeros(_SHAPE[0], jnp.int32), jnp.arange(_SHAPE[0])
    valid = jnp.ones(_SHAPE[0], bool)

    @jax.jit
    def update(rows, grad, mu, nu, count, keys):
        new, mu, nu, count = sparse_adamw(
            rows, grad, mu, nu, count, valid, jnp.float32(lr), cfg, keys
        )
        return new, mu, nu, count, jnp.mean(new["w"] != rows["w"])

    changed = []
    for step in range(steps):
        grad = {"w": jnp.asarray(direction + 0.5 * rng.normal(size=_SHAPE), jnp.float32)}
        rows, mu, nu, count, share = update(
            rows, grad, mu, nu, count, row_rounding_keys(0, jnp.int32(step), 1, ids)
        )
        changed.append(float(share))
    moved = np.asarray(rows["w"], np.float32) - np.asarray(jnp.asarray(start, dtype), np.float32)
    return moved, float(np.mean(changed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    starts = {
        "std 0.02": np.clip(rng.normal(0, 0.02, _SHAPE), -0.04, 0.04),
        "0.06-0.12": rng.uniform(0.06, 0.12, _SHAPE) * rng.choice([-1, 1], _SHAPE),
    }
    print(
        f"{'entries':<10} {'lr':>7} {'storage':<18} {'mean moved':>11} {'of fp32':>8} "
        f"{'changed/step':>13}"
    )
    for label, start in starts.items():
        for lr in (1e-4, 1e-5):
            reference, _ = _run(start, jnp.float32, "nearest", lr, args.steps)
            for name, dtype, rounding in (
                ("float32", jnp.float32, "nearest"),
                ("bf16, nearest", jnp.bfloat16, "nearest"),
                ("bf16, stochastic", jnp.bfloat16, "stochastic"),
            ):
                moved, changed = _run(start, dtype, rounding, lr, args.steps)
                along = np.sum(moved * reference) / np.sum(reference * reference)
                print(
                    f"{label:<10} {lr:>7.0e} {name:<18} {np.abs(moved).mean():>11.2e} "
                    f"{along:>8.3f} {changed:>13.3f}"
                )


if __name__ == "__main__":
    main()

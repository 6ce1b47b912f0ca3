"""The anchor's optimizer: AdamW (β 0.9/0.95) with warmup + cosine.

Global-norm clipping is done by the train step, over the anchor's and the
fetched memory blocks' gradients together (hmem_jax/train/step.py).

Weight decay is decoupled and skips norm gains (`scale` parameters): decaying
a gain towards zero would shrink activations, not regularise.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from hmem_jax.config import OptimConfig


def _warmup(warmup_steps: int, total_steps: int) -> int:
    """The warmup, cut short when the run is shorter than it."""
    return min(warmup_steps, max(total_steps - 1, 0))


def warmup_cosine(peak: float, end: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine to `end` at `total_steps`.

    Shared by the anchor's and the memory bank's schedules.
    """
    warmup = _warmup(warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=end,
    )


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine to `end_lr` at `total_steps` (or constant)."""
    if cfg.schedule == "constant":
        warmup = _warmup(cfg.warmup_steps, total_steps)
        ramp = optax.linear_schedule(0.0, cfg.peak_lr, max(warmup, 1))
        return optax.join_schedules([ramp, optax.constant_schedule(cfg.peak_lr)], [warmup])
    return warmup_cosine(cfg.peak_lr, cfg.end_lr, cfg.warmup_steps, total_steps)


def decay_mask(params: Any) -> Any:
    """True for every parameter that receives weight decay (all but norm gains)."""

    def is_decayed(path: tuple, _: Any) -> bool:
        return getattr(path[-1], "key", None) != "scale"

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, frozen: bool = False
) -> optax.GradientTransformation:
    """AdamW for the anchor; a frozen anchor gets no optimizer state at all."""
    if frozen:
        return optax.set_to_zero()
    schedule = learning_rate_schedule(cfg, total_steps)
    return optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )

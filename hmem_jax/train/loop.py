"""The training loop: data → jitted step → metrics → checkpoints, resumable at any step.

A run is a pure function of (config, workdir): batch s is a function of
(seed, s) only, and a workdir holding checkpoints resumes from the latest,
so a run stopped and restarted reproduces the uninterrupted run's losses.
A step's loss is read after the next step is dispatched, so recording it
does not stall the device; at each log step (`TrainConfig.log_every`) the host
waits for that step's metrics, to time the window and write the line.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
import time
from collections.abc import Iterator
from typing import Any, Protocol

import jax
from jax.experimental import multihost_utils

from hmem_jax import paths, sharding
from hmem_jax.bank.tier import open_tier
from hmem_jax.config import TrainConfig
from hmem_jax.data.batch import MODEL_INPUTS
from hmem_jax.errors import MissingPathError
from hmem_jax.model import Transformer, count_params
from hmem_jax.train import metrics as metrics_lib
from hmem_jax.train.checkpoint import Checkpointer
from hmem_jax.train.memory import MemoryPlan
from hmem_jax.train.optimizer import make_optimizer
from hmem_jax.train.preemption import StopSignals
from hmem_jax.train.profiling import StepProfiler
from hmem_jax.train.resume import Change, check_resumable, describe_changes, run_record
from hmem_jax.train.state import TrainState, abstract_state, create_state, state_shardings
from hmem_jax.train.step import StepFunctions, compile_train_step


class BatchSource(Protocol):
    """What the loop needs from a data loader (see `hmem_jax.data.loader.Loader`)."""

    batch_shards: int  # how many batch shards its per-shard block lists are for

    def iterate(self, start_step: int) -> Any:
        """Yields (step, batch) from `start_step`; batch holds this process's rows."""


KEPT_LOSSES = 10_000  # bounded, so a run of millions of steps keeps no growing history


@dataclasses.dataclass
class TrainResult:
    state: TrainState  # `bank` is None with a streamed bank: it lives in the store
    # step (1-based: after that many updates) -> loss of that step, for the last KEPT_LOSSES
    # steps of this call (metrics.jsonl has the logged ones of the whole run)
    losses: dict[int, float]
    workdir: str
    bank_store: dict[str, Any] | None = None  # kvstore spec of a streamed bank
    stopped_by: str | None = None  # the signal that stopped the run early (it checkpointed)


def _keep_loss(losses: dict[int, float], step: int, metrics: dict) -> None:
    """Record `step`'s loss (a step late: reading it waits for that step), dropping the oldest
    beyond KEPT_LOSSES."""
    losses[step] = float(metrics["train/loss"])
    if len(losses) > KEPT_LOSSES:
        del losses[next(iter(losses))]


def _lookahead(batches: Iterator, depth: int) -> Iterator[tuple[int, dict, list[dict]]]:
    """(step, batch, the next `depth` batches): the loader's future steps are known ahead."""
    window: collections.deque = collections.deque()
    while True:
        while len(window) < depth + 1:
            window.append(next(batches))
        step, batch = window.popleft()
        yield step, batch, [b for _, b in window]


def train(
    cfg: TrainConfig,
    workdir: str,
    loader: BatchSource,
    data_fingerprint: str,
    until_step: int | None = None,
    peak_tflops: float = 0.0,
    devices: list[jax.Device] | None = None,
    profile_steps: tuple[int, int] | None = None,
) -> TrainResult:
    """Train to `cfg.steps` (or stop after `until_step`, as a preempted job would).

    `data_fingerprint` identifies the prepared data (tokenizer, tree, packing);
    it is stored in each checkpoint and must match on resume. `devices`
    restricts the mesh to a subset (default: every device of every process).
    SIGTERM or SIGINT stops the run after the current step, with a checkpoint of it
    (`train/preemption.py`; `TrainResult.stopped_by` names the signal).
    `profile_steps` (START, END) traces those steps into WORKDIR/profile.
    """
    cfg.check_startable()
    mesh = sharding.build_mesh(cfg.mesh, devices)
    rules = sharding.rules_of(cfg.mesh)
    shards = sharding.batch_shards(mesh, rules)
    cfg.check_batch_shards(shards, str(dict(mesh.shape)))

    plan = MemoryPlan.from_config(cfg)
    if plan is not None and loader.batch_shards != shards:
        raise ValueError(
            f"The loader lists blocks for {loader.batch_shards} batch shards but "
            f"the mesh {dict(mesh.shape)} splits the batch {shards} ways; open the "
            "loader with batch_shards = sharding.batch_shards_for(...)."
        )
    frozen = plan is not None and cfg.memory.mode == "frozen_anchor"
    model = Transformer(cfg.model, lora_scale=plan.lora_scale if plan else 1.0)
    tx = make_optimizer(cfg.optim, cfg.steps, frozen=frozen)
    tier = open_tier(cfg, plan, workdir, mesh, rules)
    state_plan = plan if tier.in_state else None
    shardings = state_shardings(model, tx, mesh, rules, state_plan)
    record = run_record(cfg, data_fingerprint)

    snapshot, collect = tier.checkpoint_hooks()
    checkpointer = Checkpointer(
        paths.join(workdir, "checkpoints"),
        cfg.checkpoint_every,
        cfg.keep_checkpoints,
        cfg.async_checkpointing,
        bank_snapshot=snapshot,
        bank_collect=collect,
        every_s=cfg.checkpoint_every_s,
    )
    latest = checkpointer.latest_step()
    if latest is None:
        anchor = restore_anchor(cfg, model, mesh, rules) if cfg.init_from else None
        state = create_state(model, tx, mesh, rules, cfg.seed, state_plan, anchor)
    else:
        allowed: list[Change] = []

        def check(step: int, saved: dict) -> None:
            allowed[:] = check_resumable(
                saved, cfg, data_fingerprint, f"{checkpointer.directory}/{step}"
            )

        latest, state, unreadable = checkpointer.restore_newest(
            abstract_state(model, tx, mesh, rules, state_plan),
            check,
            on_record=lambda step, saved: tier.restore(saved, f"{checkpointer.directory}/{step}"),
        )
        if allowed and jax.process_index() == 0:
            print(f"hmem_jax: resuming with changes to {describe_changes(allowed)}", flush=True)
        if unreadable:
            set_aside_unreadable(checkpointer, unreadable)
    start_step = int(state.step)
    if jax.process_index() == 0:
        what = f"resuming from step {start_step}" if latest is not None else "starting fresh"
        print(
            f"hmem_jax: {count_params(state.params):,} parameters, mesh {dict(mesh.shape)}, "
            f"{jax.process_count()} process(es), {what}",
            flush=True,
        )

    fns = StepFunctions.for_run(cfg, model, tx, plan, mesh, rules, host_bank=not tier.in_state)
    step_fn = compile_train_step(fns, mesh, rules, shardings)
    inputs = MODEL_INPUTS + (plan.batch_keys() if plan else ())
    fetched_params = plan.geometry.fetched_params if plan else 0
    flops_per_step = metrics_lib.train_flops_per_token(cfg.model, cfg.seq_len, fetched_params) * (
        cfg.batch_size * cfg.seq_len
    )
    peak, _ = metrics_lib.peak_flops_per_device(peak_tflops)
    writer = metrics_lib.MetricWriter(workdir, cfg.steps)
    end_step = cfg.steps if until_step is None else min(until_step, cfg.steps)

    losses: dict[int, float] = {}  # insertion order is step order: the oldest is first
    pending: tuple[int, dict] | None = None
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    run_start, timed_steps = None, 0
    batches = loader.iterate(start_step)
    stream = _lookahead(batches, tier.lookahead)
    profiler = StepProfiler(workdir, profile_steps)
    stop = StopSignals().__enter__()  # left in `finally`: the loop must not be cut mid-step
    stopped_at = None
    try:
        for step in range(start_step, end_step):
            profiler.before(step + 1)
            fetch_start = time.perf_counter()
            data_step, local, ahead = next(stream)
            assert data_step == step, (data_step, step)
            batch = sharding.global_batch({k: local[k] for k in inputs}, mesh, rules)
            rows = tier.rows(local)
            data_wait += time.perf_counter() - fetch_start
            state, step_metrics, rows_out = step_fn(state, batch, rows)
            profiler.after(step + 1, step_metrics)
            del batch, rows
            tier.finish(rows_out, ahead)
            del rows_out
            window_steps += 1
            if pending is not None:
                _keep_loss(losses, *pending)
            pending = (step + 1, step_metrics)
            done = step + 1
            stopping = stop.reached(done)
            if done % cfg.log_every == 0 or done == end_step or stopping:
                jax.block_until_ready(step_metrics)
                now = time.perf_counter()
                elapsed = now - window_start
                step_time = elapsed / window_steps
                logged = dict(step_metrics)
                logged.update(
                    {
                        "perf/step_time_s": step_time,
                        "perf/tokens_per_s": cfg.batch_size * cfg.seq_len / step_time,
                        "perf/mfu": flops_per_step / step_time / (peak * jax.device_count()),
                        "perf/data_wait_s": data_wait / window_steps,
                        "ckpt/blocking_s": checkpointer.last_blocking_s,
                    }
                )
                logged.update(tier.metrics(window_steps))
                if run_start is None:
                    run_start, timed_steps = now, 0  # the first window includes compilation
                else:
                    timed_steps += window_steps
                rate = (now - run_start) / timed_steps if timed_steps else step_time
                writer.write(done, logged, eta_s=rate * (end_step - done))
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if checkpointer.save(done, state, record, force=done == end_step or stopping):
                writer.sync()  # an object-store workdir's metrics reach the checkpoint's step
            if stopping:
                stopped_at = done
                break
        if pending is not None:
            _keep_loss(losses, *pending)
    finally:
        stop.__exit__()
        profiler.stop()
        checkpointer.close()
        writer.close()
        tier.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    multihost_utils.sync_global_devices("hmem_jax.train.done")
    if stopped_at is not None and jax.process_index() == 0:
        print(
            f"hmem_jax: stopped by {stop.received} after step {stopped_at} of {cfg.steps}; "
            f"checkpoint {checkpointer.directory}/{stopped_at} saved; run the same command "
            "to resume.",
            flush=True,
        )
    return TrainResult(
        state=state,
        losses=losses,
        workdir=workdir,
        bank_store=tier.store_spec,
        stopped_by=stop.received if stopped_at is not None else None,
    )


def set_aside_unreadable(checkpointer: Checkpointer, steps: list[int]) -> None:
    """Process 0 renames unreadable newer checkpoints (kept, ignored) so the run can save
    those steps again; every process then sees the same checkpoint list."""
    multihost_utils.sync_global_devices("hmem_jax.checkpoint.unreadable")
    if jax.process_index() == 0:
        for name in checkpointer.set_aside(steps):
            print(f"hmem_jax: warning: kept the unreadable checkpoint as {name}", flush=True)
    multihost_utils.sync_global_devices("hmem_jax.checkpoint.set_aside")
    checkpointer.reload()


def restore_anchor(cfg: TrainConfig, model: Transformer, mesh: Any, rules: Any) -> Any:
    """The anchor parameters of the run named by `TrainConfig.init_from` (latest checkpoint,
    or the step folder given), laid out for this run's mesh."""
    source = paths.absolute(cfg.init_from).rstrip("/") or "/"  # gs:// is orbax's own
    step = None
    if posixpath.basename(source).isdigit():
        step, source = int(posixpath.basename(source)), posixpath.dirname(source)
    elif paths.isdir(paths.join(source, "checkpoints")):
        source = paths.join(source, "checkpoints")
    anchor_tx = make_optimizer(cfg.optim, cfg.steps)
    target = abstract_state(model, anchor_tx, mesh, rules).params
    checkpointer = Checkpointer(source, every=1, keep=1 << 30, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(
                f"TrainConfig.init_from = {cfg.init_from!r} holds no checkpoint; point it at an "
                "anchor run's workdir or one of its checkpoints/<step> folders."
            )
        return checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()

"""Train a model: `python -m hmem_jax.main.train --workdir=DIR --gin_file=experiments/X.gin`.

The workdir holds everything a run writes: `config.gin` (the operative gin
config), `config.json`, `checkpoints/`, `metrics.jsonl`, `tensorboard/`, and
`data/` (the prepared corpus, unless `DataConfig.prepared_dir` points
elsewhere). Re-running the same command resumes from the latest checkpoint.
SIGTERM or SIGINT (a preemption, Ctrl-C) stops the run after the current step with a
checkpoint of it, and the command exits with status 0. While it trains, the job holds
`trainer.lock` in the workdir, so a second job on the same workdir stops at once
(hmem_jax/train/lease.py).
"""

from __future__ import annotations

from absl import flags

from hmem_jax import paths
from hmem_jax.main import common

WORKDIR = common.workdir_flag("Run folder (checkpoints, metrics, config).")
UNTIL_STEP = flags.DEFINE_integer(
    "until_step",
    None,
    "Stop after this step (checkpointing it), as a preempted job would; "
    "the schedule still spans TrainConfig.steps.",
)
PROBE_LIMIT = flags.DEFINE_integer(
    "probe_limit",
    500,
    "After training, run the long-tail probe on this many probe prompts of the "
    "prepared data (embedded corpus) and print the per-bucket table; 0 = skip.",
)
PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps",
    "",
    "START,END: write a jax.profiler trace of training steps START..END (1-based) to "
    "WORKDIR/profile (TensorBoard's profile plugin or Perfetto reads it).",
)
PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops",
    0.0,
    "Peak TFLOP/s per device for MFU; 0 = data sheet by device kind, or a "
    "measured matmul peak on CPU.",
)


def main(argv: list[str]) -> None:
    import jax

    from hmem_jax.train.layout import check_paths, check_resume, make_loader, write_run_config
    from hmem_jax.train.lease import WorkdirLease
    from hmem_jax.train.loop import train
    from hmem_jax.train.profiling import parse_profile_steps
    from hmem_jax.train.resume import fingerprint

    cfg = common.config_from_flags()  # user mistakes from here on: one line (common.run)
    profile_steps = parse_profile_steps(PROFILE_STEPS.value)
    workdir = paths.absolute(WORKDIR.value)
    check_paths(cfg, workdir)  # every object store named answers, before anything is written
    with WorkdirLease(workdir):  # before anything is written: one trainer per workdir
        loader = make_loader(cfg, workdir)
        data_fingerprint = fingerprint(loader.fingerprint)
        check_resume(cfg, workdir, data_fingerprint)
        if jax.process_index() == 0:
            write_run_config(cfg, workdir)
        result = train(
            cfg,
            workdir,
            loader,
            data_fingerprint,
            until_step=UNTIL_STEP.value,
            peak_tflops=PEAK_TFLOPS.value,
            profile_steps=profile_steps,
        )
    finished = UNTIL_STEP.value is None and result.stopped_by is None
    if jax.process_index() == 0 and finished and PROBE_LIMIT.value > 0:
        print_probe_table(workdir, PROBE_LIMIT.value)


def print_probe_table(workdir: str, limit: int) -> None:
    """The long-tail probe (docs/method.md) per bucket, for runs on the embedded corpus."""
    from hmem_jax.infer.probe import format_probe_table, probe_workdir

    table = probe_workdir(workdir, limit=limit)
    if table:
        print(
            "long-tail probe (accuracy % by frequency bucket, 0 = rarest):\n"
            + format_probe_table(table),
            flush=True,
        )


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="configure the run with --gin_file and --gin_param", distributed=True)


if __name__ == "__main__":
    run()

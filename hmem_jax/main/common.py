"""What every entry point shares: gin flags, config loading with clear errors, multi-host start-up.

Flags (T5X style): `--gin_file` (repeatable; a path, or a name under
`experiments/` with or without `.gin`) and `--gin_param` (repeatable
`Configurable.field = value`). Multi-host: `jax.distributed.initialize` is
called once, before any other JAX call, when `--coordinator_address` (or the
HMEM_COORDINATOR_ADDRESS / HMEM_NUM_PROCESSES / HMEM_PROCESS_ID environment
variables) is given, or with `--distributed=auto` on clusters JAX detects
itself (SLURM, TPU pods, GKE).
"""

from __future__ import annotations

import logging as logging_lib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from absl import app, flags

from hmem_jax.config import TrainConfig
from hmem_jax.errors import HmemError, missing_extra
from hmem_jax.gin_parsing import EXPERIMENTS_DIR, load_train_config, parse_gin, resolve_gin_file  # noqa: F401

GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file (path or experiments/ name); repeatable, later files win."
)
GIN_PARAMS = flags.DEFINE_multi_string(
    "gin_param", [], "Gin binding, e.g. 'TrainConfig.steps = 100'; repeatable, applied last."
)
VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "On a user mistake, print the traceback below the one-line error (for bug reports).",
)
DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "off",
    ["off", "auto"],
    "'auto': call jax.distributed.initialize() with cluster auto-detection (SLURM, TPU, GKE).",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("HMEM_COORDINATOR_ADDRESS", ""),
    "host:port of process 0 for a multi-process run (also HMEM_COORDINATOR_ADDRESS).",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    int(os.environ.get("HMEM_NUM_PROCESSES", "1")),
    "Number of processes in a multi-process run (also HMEM_NUM_PROCESSES).",
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    int(os.environ.get("HMEM_PROCESS_ID", "0")),
    "This process's index in a multi-process run (also HMEM_PROCESS_ID).",
)

if TYPE_CHECKING:
    from hmem_jax.infer.engine import Engine


def workdir_flag(help_text: str = "The training run's folder.") -> flags.FlagHolder:
    """`--workdir` (required), defined by the entry module that calls this."""
    return flags.DEFINE_string("workdir", None, help_text, required=True)


def step_flag() -> flags.FlagHolder:
    """`--step`: which checkpoint of the run to use."""
    return flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def out_flag(help_text: str, required: bool = False) -> flags.FlagHolder:
    """`--out`: the folder an entry point writes."""
    return flags.DEFINE_string("out", None if required else "", help_text, required=required)


def overwrite_flag() -> flags.FlagHolder:
    """--overwrite, for commands that write into an output folder."""
    return flags.DEFINE_bool(
        "overwrite", False, "Write into an output folder that already holds files."
    )


def refuse_to_overwrite(path: str, flag: str, overwrite: bool) -> None:
    """Stop with one line if `path` is a folder holding files and --overwrite is not given."""
    if overwrite or not os.path.isdir(path):
        return
    held = sorted(os.listdir(path))
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        fail(
            f"{flag}={path} already holds {len(held)} file(s) ({shown}); choose an empty or new "
            "folder, or pass --overwrite to replace what is there."
        )


def config_from_flags() -> TrainConfig:
    quiet_library_logs()
    return load_train_config(GIN_FILES.value, GIN_PARAMS.value)


def quiet_library_logs() -> None:
    """Orbax and grain log every file operation at INFO; keep the console to our own lines.

    An explicit `--verbosity` (or `-v`) still wins.
    """

    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        # Orbax logs a failed (asynchronous) checkpoint write with its traceback from its
        # background threads; the run reports it as one line (CheckpointSaveError) instead.
        logging.get_absl_logger().addFilter(_drop_orbax_background_failures)


def _drop_orbax_background_failures(record: logging_lib.LogRecord) -> bool:
    from_orbax = os.path.join("orbax", "checkpoint") in record.pathname
    return not (record.levelno >= logging_lib.ERROR and from_orbax)


def initialize_distributed() -> None:
    """Start multi-host JAX once, before any computation, if this run has several processes."""
    import jax

    if COORDINATOR.value and NUM_PROCESSES.value > 1:
        jax.distributed.initialize(
            coordinator_address=COORDINATOR.value,
            num_processes=NUM_PROCESSES.value,
            process_id=PROCESS_ID.value,
        )
    elif DISTRIBUTED.value == "auto":
        try:
            jax.distributed.initialize()
        except ValueError as error:  # JAX recognised no cluster: nothing to detect
            reason = str(error).rstrip(".")
            fail(
                "--distributed=auto: JAX found no cluster environment it knows (SLURM, Open MPI, "
                f"a TPU pod, GKE) here ({reason}). Start the processes with launch/ "
                "(launch/README.md), or pass --coordinator_address, --num_processes and "
                "--process_id."
            )


def run(
    main: Callable[[list[str]], None],
    hint: str = "",
    positional: bool = False,
    distributed: bool = False,
) -> None:
    """Run an entry point under absl: refuse stray arguments (unless `positional`), quiet the
    libraries' logs, start multi-host JAX first when `distributed`, then call `main`.

    A user mistake (any `HmemError`, or an optional dependency that is not installed) ends with
    one line on stderr and exit status 2 (`--verbose` adds its traceback); anything else is a
    fault and keeps its traceback.
    `hint` says how to pass what a stray argument probably meant.
    """

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1 and not positional:
            how = hint or "this command takes flags only (--help lists them)"
            fail(f"Unexpected arguments {argv[1:]}; {how}.")
        quiet_library_logs()
        if distributed:
            initialize_distributed()
        try:
            main(argv)
        except HmemError as error:
            _detail()
            fail(str(error))
        except ModuleNotFoundError as error:
            user_error = missing_extra(error)
            if user_error is None:
                raise
            _detail()
            fail(str(user_error))

    app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown or malformed flag as a one-line user error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        command = f"python -m {spec.name}" if spec else os.path.basename(argv[0])
        fail(f"{str(error).rstrip('.')}. `{command} --help` lists the flags.")


def _detail() -> None:
    """With --verbose, the traceback of the error being handled (above its one-line message)."""
    if VERBOSE.value:
        import traceback

        traceback.print_exc(file=sys.stderr)


def check_memory_mode(engine: Engine, mode: str, workdir: str) -> None:
    """`--memory=MODE` is one the run can serve (memory at all; a generic block for 'generic')."""
    if mode != "none" and not engine.has_memory:
        fail(f"--memory={mode}: {workdir} was trained without memory; use --memory=none.")
    if mode == "generic" and not engine.has_generic:
        fail(
            "--memory=generic: this run has no generic memory "
            "(MemoryConfig.generic_probability = 0)."
        )


def fail(message: str) -> NoReturn:
    """Exit with a one-line error (no traceback) for user mistakes."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

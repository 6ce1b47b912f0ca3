"""Gin files and bindings into configs, with errors that name the file or binding.

Flag-free (entry points define `--gin_file` / `--gin_param` in
hmem_jax/main/common.py), so library code such as `load_run` or the recipe
can parse a run's own config. A gin file is a path or a name under
`experiments/`, with or without `.gin`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin

from hmem_jax.config import ConfigError, TrainConfig

EXPERIMENTS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


def resolve_gin_file(name: str) -> str:
    """A gin file path, trying `experiments/NAME[.gin]` when `name` is not a file."""
    candidates = [
        name,
        name + ".gin",
        os.path.join(EXPERIMENTS_DIR, name),
        os.path.join(EXPERIMENTS_DIR, name + ".gin"),
    ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    available = (
        sorted(f[:-4] for f in os.listdir(EXPERIMENTS_DIR) if f.endswith(".gin"))
        if os.path.isdir(EXPERIMENTS_DIR)
        else []
    )
    raise ConfigError(
        f"--gin_file={name!r}: no such file (also looked in {EXPERIMENTS_DIR}). "
        f"Experiments available: {available}."
    )


def parse_gin(files: Sequence[str], params: Sequence[str]) -> None:
    """Parse gin files then bindings; any error names the offending file or binding."""
    gin.clear_config()
    paths = [resolve_gin_file(f) for f in files]
    gin.add_config_file_search_path(EXPERIMENTS_DIR)
    for path in paths:
        gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
    try:
        gin.parse_config_files_and_bindings(paths, list(params), finalize_config=False)
    except (OSError, ValueError, KeyError, SyntaxError) as err:
        raise ConfigError(f"Invalid gin configuration: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    """gin's multi-line parse error as one line: the problem, then where (the file or binding
    line) and the offending text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] + (f" ({'; '.join(lines[1:])})" if len(lines) > 1 else "")


def build_train_config() -> TrainConfig:
    """The TrainConfig of the gin state now parsed; bad values fail here, naming the field."""
    try:
        return TrainConfig()
    except ConfigError as err:
        # gin appends "In call to configurable ..." lines; the message already names the field.
        raise ConfigError(str(err).split("\n  In call to configurable")[0]) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid configuration value: {err}") from err


def load_train_config(files: Sequence[str] = (), params: Sequence[str] = ()) -> TrainConfig:
    """Parse gin and build the TrainConfig; bad values fail here, naming the field."""
    parse_gin(files, params)
    return build_train_config()

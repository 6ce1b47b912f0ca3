"""`hmem COMMAND [--flags]`: one console script for every entry point.

    hmem recipe --workdir=runs/default --gin_file=experiments/default.gin
    hmem train --workdir=runs/x --gin_file=experiments/X.gin
    hmem info --gin_file=experiments/paper_160m.gin
    hmem compile --gin_file=experiments/default.gin --devices=8

Only the chosen command's module is imported: entry points define their own
absl flags (some share names such as --out), and one process holds one set.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": "hmem_jax.main.train",
    "recipe": "hmem_jax.main.recipe",
    "prepare": "hmem_jax.main.prepare",
    "cluster": "hmem_jax.main.cluster",
    "info": "hmem_jax.main.info",
    "compile": "hmem_jax.main.compile",
}
OPTIONAL_COMMANDS = ("generate", "evaluate", "export", "import_hf", "bank")


def available() -> dict[str, str]:
    commands = dict(COMMANDS)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in OPTIONAL_COMMANDS:
        if os.path.isfile(os.path.join(here, f"{name}.py")):
            commands[name] = f"hmem_jax.main.{name}"
    return commands


def run() -> None:
    commands = available()
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        print(
            f"usage: hmem COMMAND [--flags]; got {given!r}. Commands: "
            f"{', '.join(sorted(commands))}. `hmem COMMAND --help` lists a command's flags.",
            file=sys.stderr,
        )
        sys.exit(2)
    module = importlib.import_module(commands[sys.argv[1]])
    sys.argv = [f"hmem {sys.argv[1]}"] + sys.argv[2:]
    module.run()


if __name__ == "__main__":
    run()

"""The files a user hands an inference command (prompts, tasks, documents), read with errors that
name the file and the line: a missing file is a `MissingPathError`, a bad line an
`InputFileError`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hmem_jax.errors import InputFileError, MissingPathError


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, line without its newline) of every non-blank line of a text file.

    `what` names the file in errors, e.g. "--prompts_file".
    """
    if not os.path.isfile(path):
        raise MissingPathError(f"{what}={path}: no such file.")
    try:
        with open(path, encoding="utf-8") as handle:
            return [
                (number, line.rstrip("\n"))
                for number, line in enumerate(handle, start=1)
                if line.strip()
            ]
    except UnicodeDecodeError as error:
        raise InputFileError(
            f"{what}={path} is not UTF-8 text ({error.reason} at byte {error.start})."
        ) from None


def parse_object(path: str, number: int, line: str) -> dict[str, Any]:
    """Line `number` of the jsonl file `path` as a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputFileError(f"{path}:{number}: not JSON ({error.msg}).") from None
    if not isinstance(row, dict):
        raise InputFileError(f"{path}:{number}: expected a JSON object, got {line.strip()[:40]}.")
    return row


def read_jsonl(path: str, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a jsonl file."""
    return [(number, parse_object(path, number, line)) for number, line in read_lines(path, what)]


def read_prompts(path: str, what: str = "--prompts_file") -> list[str]:
    """Prompts of a text file (one a line) or of a jsonl file of {"prompt": ...} objects (when
    its first line is a JSON object)."""
    lines = read_lines(path, what)
    if not lines or not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        row = parse_object(path, number, line)
        if not isinstance(row.get("prompt"), str):
            raise InputFileError(
                f'{path}:{number}: a jsonl prompts file needs a "prompt" string on every line '
                "(or give plain text, one prompt a line)."
            )
        prompts.append(row["prompt"])
    return prompts


def read_documents(path: str, what: str = "--perplexity") -> tuple[list[str], list[int] | None]:
    """(texts, buckets or None) of a jsonl file of {"text", optional "bucket"} objects; buckets
    only when every row has one."""
    rows = read_jsonl(path, what)
    texts: list[str] = []
    buckets: list[int] = []
    for number, row in rows:
        if not isinstance(row.get("text"), str):
            raise InputFileError(f'{path}:{number}: needs a "text" string.')
        texts.append(row["text"])
        if "bucket" in row:
            if not isinstance(row["bucket"], int):
                raise InputFileError(
                    f"{path}:{number}: 'bucket' must be an integer, got {row['bucket']!r}."
                )
            buckets.append(row["bucket"])
    if not texts:
        raise InputFileError(f"{what}={path} holds no documents.")
    return texts, (buckets if len(buckets) == len(texts) else None)

"""Few-shot tasks from local jsonl files: multiple-choice log-likelihood and generation exact match.

One object per line. Multiple choice: {"question" (or "context"), "choices":
[...], "answer": index}. Generation: {"question" (or "prompt"), "answer":
str or [str, ...]}. The first `shots` items are the few-shot examples and are
not scored. As in the paper (docs/method.md), memory is routed from the item's
question alone, never from the few-shot examples. With a retrieval baseline
(`rag`), the nearest training document is prepended to the question instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hmem_jax.errors import InputFileError
from hmem_jax.infer.decode import Sampling
from hmem_jax.infer.engine import Engine
from hmem_jax.infer.inputs import read_jsonl
from hmem_jax.infer.retrieval import select_rows
from hmem_jax.infer.scoring import continuation_logprobs


@dataclasses.dataclass(frozen=True)
class Item:
    query: str
    choices: tuple[str, ...] = ()  # multiple choice
    answer: int = -1  # index of the right choice (multiple choice)
    answers: tuple[str, ...] = ()  # accepted answers (generation)

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)


def read_task(path: str) -> list[Item]:
    """Items of a jsonl task file; every line must be the same kind."""
    items = []
    for number, row in read_jsonl(path, "--task"):
        where = f"{path}:{number}"
        query = row.get("question", row.get("context", row.get("prompt")))
        if query is None:
            raise InputFileError(f"{where}: needs a 'question', 'context' or 'prompt'.")
        if "choices" in row:
            choices = row["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise InputFileError(f"{where}: 'choices' must be a list of at least two answers.")
            answer = _choice_index(row.get("answer"), len(choices))
            if answer is None:
                raise InputFileError(
                    f"{where}: 'answer' must be the index of the right choice, 0 .. "
                    f"{len(choices) - 1}; got {row.get('answer')!r}."
                )
            items.append(Item(str(query), tuple(str(c) for c in choices), answer=answer))
        else:
            answers = row.get("answers", row.get("answer"))
            answers = [answers] if isinstance(answers, (str, int)) else answers
            if not isinstance(answers, list) or not answers:
                raise InputFileError(
                    f"{where}: a generation item needs an 'answer' (a string, or a list of "
                    "accepted strings); a multiple-choice item needs 'choices'."
                )
            items.append(Item(str(query), answers=tuple(str(a) for a in answers)))
    if not items or len({item.is_choice for item in items}) != 1:
        raise InputFileError(
            f"{path}: expected a non-empty file of one kind of item (all multiple "
            "choice, or all generation)."
        )
    return items


def _choice_index(answer: Any, choices: int) -> int | None:
    """`answer` as an index into `choices` choices, or None when it is not one."""
    try:
        index = int(answer)
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < choices else None


def few_shot_prefix(examples: Sequence[Item]) -> str:
    parts = []
    for item in examples:
        answer = item.choices[item.answer] if item.is_choice else item.answers[0]
        parts.append(f"{item.query} {answer}")
    return "".join(part + "\n\n" for part in parts)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def first_line(text: str) -> str:
    """The answer part of a generation: up to the first newline, sentence end or ', '
    (the stop sequences of the usual generation tasks; "3.5" and "1,071" stay whole)."""
    line = text.strip().split("\n")[0]
    return re.split(r"\.(?:\s|$)|,\s", line)[0].strip()


def evaluate_choice(
    engine: Engine,
    items: Sequence[Item],
    prefix: str,
    mode: str,
    rag: Callable[[Sequence[str]], list[str]] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """accuracy (sum log-likelihood) and acc_norm (per-token) over items."""
    queries = [item.query for item in items]
    memory = engine.memory_for(queries, mode)
    documents = rag(queries) if rag else [""] * len(items)
    contexts, continuations, owners = [], [], []
    for index, (item, document) in enumerate(zip(items, documents)):
        context = engine.encode(prefix + (document + "\n\n" if document else "") + item.query)
        for choice in item.choices:
            contexts.append(context)
            continuations.append(engine.run.tokenizer.encode(" " + choice))
            owners.append(index)
    owner = np.array(owners)
    scores = continuation_logprobs(
        engine.model,
        engine.run.params,
        contexts,
        continuations,
        select_rows(memory, owner),
        batch_size,
        max_length=engine.run.cfg.seq_len,
    )
    correct = correct_norm = 0
    for index, item in enumerate(items):
        rows = np.flatnonzero(owner == index)
        correct += int(np.argmax(scores.logprob[rows]) == item.answer)
        correct_norm += int(np.argmax(scores.logprob[rows] / scores.tokens[rows]) == item.answer)
    return {
        "accuracy": correct / len(items),
        "acc_norm": correct_norm / len(items),
        "n": len(items),
    }


def evaluate_generation(
    engine: Engine,
    items: Sequence[Item],
    prefix: str,
    mode: str,
    rag: Callable[[Sequence[str]], list[str]] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> dict[str, Any]:
    """exact match of the generation's answer part (`first_line`, normalised) against any
    accepted answer."""
    correct, outputs = 0, []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        queries = [item.query for item in chunk]
        documents = rag(queries) if rag else [""] * len(chunk)
        prompts = [prefix + (d + "\n\n" if d else "") + q for d, q in zip(documents, queries)]
        texts = engine.generate(
            prompts, mode, Sampling(max_new_tokens=max_new_tokens), route_texts=queries
        )
        for item, text in zip(chunk, texts):
            answer = normalise(first_line(text))
            correct += int(answer in {normalise(a) for a in item.answers})
            outputs.append(first_line(text))
    return {"exact_match": correct / len(items), "n": len(items), "outputs": outputs[:20]}

"""One object per loaded run that routes, fetches and decodes: what the CLIs and the evaluation use.

text ─► embed ─► route (optionally with blocked subtrees) ─► block ids ─► fetch ─► memory
prompt tokens + memory ─► Decoder (KV cache) ─► text
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from hmem_jax.infer import retrieval
from hmem_jax.infer.decode import Decoder, Sampling
from hmem_jax.infer.run import LoadedRun


class Engine:
    """Routing, memory assembly and generation for a LoadedRun (its bank is the block source)."""

    def __init__(
        self, run: LoadedRun, blocks: retrieval.BlockSource | None = None, embedder: Any = None
    ) -> None:
        self.run = run
        self.model = run.model
        if blocks is None and run.bank is not None:
            blocks = retrieval.DeviceBlocks(run.bank)
        elif blocks is None and run.streamed is not None:
            blocks = retrieval.StreamedBlocks(run.streamed)
        self.blocks = blocks
        self._embedder = embedder
        self.decoder = Decoder(self.model, run.params)

    @property
    def has_memory(self) -> bool:
        return self.run.plan is not None

    @property
    def has_generic(self) -> bool:
        plan = self.run.plan
        return plan is not None and plan.with_generic

    @functools.cached_property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = self.run.tree.make_embedder()
        return self._embedder

    def block_ids(
        self, texts: Sequence[str], blocked_level1: Sequence[int] | np.ndarray = ()
    ) -> np.ndarray:
        """int32[N, depth] global block ids of the texts' routes."""
        if not self.has_memory:
            return np.zeros((len(texts), 1), np.int32)
        paths = retrieval.route(self.run.tree, self.embedder, texts, blocked_level1)
        return self.run.tree.block_ids(paths)

    def memory(self, block_ids: np.ndarray, mode: str) -> Any:
        return retrieval.build_memory(self.run.plan, self.blocks, block_ids, mode)

    def memory_for(
        self, route_texts: Sequence[str], mode: str, blocked_level1: Sequence[int] | np.ndarray = ()
    ) -> Any:
        """Memory for inputs routed by `route_texts` (one per input), or None for mode 'none'."""
        if mode == "none":
            return None
        return self.memory(self.block_ids(route_texts, blocked_level1), mode)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; an empty prompt becomes one EOT token (a document start)."""
        ids = self.run.tokenizer.encode(text)
        return ids if ids else [self.run.tokenizer.eot_id]

    def generate(
        self,
        prompts: Sequence[str],
        mode: str = "fetched",
        sampling: Sampling = Sampling(),
        route_texts: Sequence[str] | None = None,
        blocked_level1: Sequence[int] | np.ndarray = (),
        block_ids: np.ndarray | None = None,
        batch_multiple: int = 1,
    ) -> list[str]:
        """Continuations of `prompts`, each with the memory its own route text selects.

        `block_ids` int32[N, depth], when given, is the route itself (e.g. the
        path of a training document) instead of routing `route_texts`.
        `batch_multiple` pads the batch (with copies of the first prompt) to a
        multiple of it, so repeated calls of varying size reuse compiled steps.
        """
        if block_ids is not None and mode != "none":
            memory = self.memory(np.asarray(block_ids, np.int32), mode)
        else:
            memory = self.memory_for(route_texts or prompts, mode, blocked_level1)
        tokenizer = self.run.tokenizer
        stops = sampling.stop_ids or (tokenizer.eot_id,)
        sampling = dataclasses.replace(sampling, stop_ids=tuple(stops))
        encoded = [self.encode(p) for p in prompts]
        rows = -(-len(encoded) // batch_multiple) * batch_multiple
        index = np.minimum(np.arange(rows), len(encoded) - 1)
        out = self.decoder.generate(
            [encoded[i] for i in index],
            sampling,
            retrieval.select_rows(memory, index),
            pad_id=tokenizer.pad_id,
        )
        return [tokenizer.decode(ids) for ids in out[: len(prompts)]]

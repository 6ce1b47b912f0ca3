"""Open a finished (or running) training run for inference: config, anchor, bank, tokenizer, tree.

Everything comes from the workdir the train entry point wrote: the operative
`config.gin`, the latest (or a chosen) orbax checkpoint, the prepared data
(`DataConfig.prepared_dir` or WORKDIR/data, holding the tokenizer and the
probes) and the ClusterTree (`TrainConfig.tree_dir` or WORKDIR/tree). The
state is restored onto one device: inference here is single-host.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax

from hmem_jax import paths, sharding
from hmem_jax.config import MeshConfig, TrainConfig
from hmem_jax.errors import CheckpointMismatchError, RunLayoutError
from hmem_jax.model import Transformer
from hmem_jax.train.layout import prepared_dir_of
from hmem_jax.train.memory import MemoryPlan


@dataclasses.dataclass
class LoadedRun:
    """A run's model and memory, ready for routing, decoding and scoring."""

    cfg: TrainConfig
    workdir: str
    step: int
    params: Any
    bank: Any  # dict level key -> LevelBank (device tier), or None (anchor-only or streamed)
    plan: MemoryPlan | None
    streamed: Any = None  # a read-only StreamedBank when MemoryConfig.bank_tier = 'streaming'
    opt_state: Any = None  # the anchor's optimizer state at that step

    @property
    def model(self) -> Transformer:
        return Transformer(self.cfg.model, lora_scale=self.plan.lora_scale if self.plan else 1.0)

    @property
    def prepared_dir(self) -> str:
        return prepared_dir_of(self.cfg, self.workdir)

    @property
    def tree_dir(self) -> str:
        return self.cfg.tree_dir or paths.join(self.workdir, "tree")

    @functools.cached_property
    def tokenizer(self) -> Any:
        from hmem_jax.data.tokenizer import load_tokenizer

        return load_tokenizer(self.prepared_dir)

    @functools.cached_property
    def tree(self) -> Any:
        from hmem_jax.hierarchy.tree import ClusterTree

        return ClusterTree.load(self.tree_dir)


def load_config(workdir: str) -> TrainConfig:
    """The run's TrainConfig from its operative `config.gin`."""
    from hmem_jax.gin_parsing import load_train_config

    path = paths.join(workdir, "config.gin")
    if not paths.isfile(path):
        raise RunLayoutError(
            f"{workdir!r} has no config.gin; point --workdir at a folder "
            "written by `python -m hmem_jax.main.train`."
        )
    if not paths.is_remote(path):
        return load_train_config([path])
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hmem_config_") as local:  # gin reads local files
        copy = os.path.join(local, "config.gin")
        with open(copy, "w", encoding="utf-8") as handle:
            handle.write(paths.read_text(path))
        return load_train_config([copy])


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """Restore anchor parameters and bank of checkpoint `step` (default: the latest)."""
    from hmem_jax.train.checkpoint import Checkpointer
    from hmem_jax.train.optimizer import make_optimizer
    from hmem_jax.train.state import abstract_state

    workdir = paths.absolute(workdir)
    cfg = load_config(workdir)
    plan = MemoryPlan.from_config(cfg)
    frozen = plan is not None and cfg.memory.mode == "frozen_anchor"
    # One device, whatever the training mesh was (and whatever gin bindings are active).
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, memory=1)
    mesh = sharding.build_mesh(mesh_cfg, jax.devices()[:1])
    rules = sharding.rules_of(mesh_cfg)
    model = Transformer(cfg.model, lora_scale=plan.lora_scale if plan else 1.0)
    streaming = plan is not None and cfg.memory.bank_tier == "streaming"
    target = abstract_state(
        model,
        make_optimizer(cfg.optim, cfg.steps, frozen=frozen),
        mesh,
        rules,
        None if streaming else plan,
    )
    checkpointer = Checkpointer(
        paths.join(workdir, "checkpoints"),
        every=1,
        keep=1 << 30,
        async_save=False,
        this_process_only=True,  # inference is one process's, even inside a training job
    )
    try:
        if checkpointer.latest_step() is None:
            raise RunLayoutError(f"{workdir}/checkpoints holds no checkpoint yet; train first.")
        if step is not None and step not in checkpointer.all_steps():
            raise RunLayoutError(
                f"{workdir}/checkpoints has no step {step}; it holds {checkpointer.all_steps()}: "
                "pass one of those with --step, or leave --step out for the latest."
            )
        # The newest readable checkpoint (or exactly `step`), naming any it skips.
        step, state, _ = checkpointer.restore_newest(target, steps=None if step is None else [step])
        streamed = None
        if plan is not None and streaming:
            streamed = open_streamed(cfg, plan, workdir, checkpointer.read_record(step))
    finally:
        checkpointer.close()
    return LoadedRun(
        cfg=cfg,
        workdir=workdir,
        step=int(step),
        params=state.params,
        bank=state.bank,
        plan=plan,
        streamed=streamed,
        opt_state=state.opt_state,
    )


def open_streamed(cfg: TrainConfig, plan: MemoryPlan, workdir: str, record: dict) -> Any:
    """The run's streamed bank, read-only, at the version the checkpoint recorded."""
    from hmem_jax.bank.layout import kvstore_spec
    from hmem_jax.bank.store import BankStore
    from hmem_jax.bank.streaming import StreamedBank

    if "bank_version" not in record:
        raise CheckpointMismatchError(
            f"The checkpoint of {workdir} records no streamed bank version; was it "
            "trained with MemoryConfig.bank_tier = 'streaming'?"
        )
    memory = cfg.memory
    store = BankStore(
        kvstore_spec(memory.bank_store, workdir),
        plan.geometry,
        plan.with_generic,
        memory.bank_dtype,
        memory.moment_dtype,
        memory.init_seed,
        memory.blocks_per_shard,
        create=False,
        writer=False,
    )
    bank = StreamedBank(store, memory.host_cache_bytes, prefetch_steps=0)
    bank.restore(int(record["bank_version"]))
    return bank

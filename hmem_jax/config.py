"""Typed, frozen configuration for every knob of a run, bindable from gin.

Every dataclass here is registered with gin under its class name, so an
experiment file says `ModelConfig.d_model = 512` or `TrainConfig.steps = 1000`.
Sub-configs are built with `default_factory`, which goes through gin, so a
binding on `ModelConfig` reaches the `TrainConfig.model` field without any
indirection. Values are checked in `__post_init__`: a bad value fails when the
config is built, with a message naming the field and the fix.

The paper's anchors (docs/method.md) are `MODEL_PRESETS`; an experiment picks one
with `TrainConfig.model = @model_preset()` and `model_preset.name = '160m'`.

Every field also says what it shapes (`Role`), which decides what a resumed
run may change (`hmem_jax/train/resume.py`): a plain field is `Role.STORED`;
fields declared with `compute(...)` or `course(...)` may change on resume.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

import gin

from hmem_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")


class Role(enum.Enum):
    """What a config field shapes, and so whether a resumed run may change it."""

    STORED = "stored"
    """What checkpoints, banks and prepared data hold, or which rows each step reads: a
    resume must keep it (the default for a field)."""
    COMPUTE = "compute"
    """How a step is computed (compute dtype, remat, mesh and sharding, accumulation, caches):
    a resume may change it, and says so."""
    COURSE = "course"
    """The run's course (its length, learning rates, log and checkpoint cadence, where inputs
    are read from, each checked by its own fingerprint): a resume may change it, and says so."""


_ROLE = "hmem_role"


def compute(default: Any) -> Any:
    """A field declaration for a `Role.COMPUTE` field with this default."""
    return dataclasses.field(default=default, metadata={_ROLE: Role.COMPUTE})


def course(default: Any) -> Any:
    """A field declaration for a `Role.COURSE` field with this default."""
    return dataclasses.field(default=default, metadata={_ROLE: Role.COURSE})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf field of a nested config: where it is, its gin name, role, value and default."""

    path: str  # attribute path from the root config, e.g. "model.d_model"
    gin_name: str  # how an experiment binds it, e.g. "ModelConfig.d_model"
    role: Role
    value: Any
    default: Any


def settings_of(config: Any, prefix: str = "") -> list[Setting]:
    """Every leaf field of `config`, descending into nested config dataclasses."""
    found = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += settings_of(value, f"{prefix}{field.name}.")
            continue
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        found.append(
            Setting(
                path=prefix + field.name,
                gin_name=f"{type(config).__name__}.{field.name}",
                role=field.metadata.get(_ROLE, Role.STORED),
                value=value,
                default=default,
            )
        )
    return found


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` names (gin gives lists where tuples are declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "ints", float: "numbers", str: "strings", bool: "booleans"}
            return f"a tuple of {plural.get(args[0], _describe(args[0]))}"
        return f"a tuple ({', '.join(_describe(a) for a in args)})"
    return {int: "an int", float: "a number", str: "a string", bool: "True or False"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _check_types(config: Any) -> None:
    """Every field of a config dataclass holds a value of its declared type (named if not)."""
    owner = type(config).__name__
    for name, hint in _field_types(type(config)).items():
        value = getattr(config, name)
        _require(
            value is gin.REQUIRED or _matches(value, hint),
            f"{owner}.{name} = {value!r} must be {_describe(hint)}.",
        )


def check_given(config: Any) -> None:
    """Fail, naming the first, when a field of `config` (or of a config inside it) is still the
    `%gin.REQUIRED` a gin file put there: an experiment that describes itself without the one
    setting each user must give (the paper gins: the corpus and the tokenizer)."""
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        _require(
            value is not gin.REQUIRED,
            f"{owner}.{field.name} must be set: the gin file marks it %gin.REQUIRED (its "
            f'comments say what it takes). Add --gin_param="{owner}.{field.name} = ...".',
        )
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_given(value)


def _check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"{owner}.{name} = {value!r} is not one of {choices}.")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        _require(value > 0, f"{owner}.{name} must be > 0, got {value!r}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The anchor transformer (docs/method.md: OpenLM-style decoder).

    `qk_norm`: 'full' normalises the whole query/key vector (gains of width
    heads*head_dim, the paper's parameter count); 'per_head' normalises each
    head with one shared gain of width head_dim (Qwen3/Gemma3 style); 'none'.
    `remat`: 'none', 'full' (recompute each block in the backward pass) or
    'dots' (save matmul outputs only).
    `param_dtype` is how parameters and the optimizer's state are kept (the
    master copy), `dtype` what the forward and backward passes compute in;
    'auto' is bfloat16 on GPU and TPU and float32 on CPU
    (hmem_jax/model/platform.py). The paper presets keep float32 masters and
    compute in 'auto': bfloat16 matmuls on accelerators with float32 updates,
    so small updates to large weights are not rounded away.
    `qkv_bias`: biases on the query, key and value projections (Qwen2-style
    anchors imported from `transformers`); the paper's anchors have none.
    `rope_llama3`: () for plain RoPE, or Llama 3's frequency rescaling as
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    e.g. (32.0, 1.0, 4.0, 8192) for an imported Llama 3.2.
    `attention`: how training's causal attention within documents is computed
    (hmem_jax/model/attention.py): 'xla' (dense mask and scores, [T, T] per head),
    'chunked' (flash-style in plain JAX, tiles of `attention_block`; any backend),
    'cudnn' (cuDNN flash attention over document tables of `attention_max_documents`
    rows; NVIDIA Hopper+, bfloat16/float16), 'splash' (Pallas, TPU), or 'auto': 'xla' on
    CPU, 'cudnn' on a GPU it supports (else 'chunked'), 'splash' on TPU where the length
    divides into 128-multiple tiles (else 'chunked'). Decoding with a KV cache always
    runs 'xla'.
    """

    vocab_size: int = 2048
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    head_dim: int = 32
    d_ff: int = 512
    tie_embeddings: bool = True
    rope_base: float = 100_000.0
    norm_eps: float = 1e-5
    qk_norm: str = "full"
    param_dtype: str = "float32"
    dtype: str = compute("float32")
    remat: str = compute("none")
    init_std: float = 0.02
    qkv_bias: bool = False
    rope_llama3: tuple[float, ...] = ()
    attention: str = compute("auto")
    attention_block: int = compute(512)
    attention_max_documents: int = compute(64)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive(
            "ModelConfig",
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            d_ff=self.d_ff,
            rope_base=self.rope_base,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            attention_block=self.attention_block,
        )
        kv = self.kv_heads
        _require(
            kv > 0 and self.num_heads % kv == 0,
            f"ModelConfig.num_kv_heads = {self.num_kv_heads} must divide "
            f"num_heads = {self.num_heads} (grouped-query attention).",
        )
        _require(
            self.head_dim % 2 == 0,
            f"ModelConfig.head_dim = {self.head_dim} must be even for rotary embeddings.",
        )
        _check_choice("ModelConfig", "qk_norm", self.qk_norm, ("full", "per_head", "none"))
        _require(
            len(self.rope_llama3) in (0, 4),
            f"ModelConfig.rope_llama3 = {self.rope_llama3} must be () or (factor, "
            "low_freq_factor, high_freq_factor, original_max_position_embeddings).",
        )
        _check_choice("ModelConfig", "param_dtype", self.param_dtype, DTYPES)
        _check_choice("ModelConfig", "dtype", self.dtype, (*DTYPES, "auto"))
        _check_choice("ModelConfig", "remat", self.remat, ("none", "full", "dots"))
        _check_choice("ModelConfig", "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        _require(
            self.attention_max_documents >= 2,
            f"ModelConfig.attention_max_documents = {self.attention_max_documents} must be >= 2 "
            "(cuDNN's packed layout holds at least two documents a row).",
        )

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized anchor for tests and the embedded default run.
    "tiny": dict(
        vocab_size=2048,
        num_layers=4,
        d_model=128,
        num_heads=4,
        head_dim=32,
        d_ff=512,
        tie_embeddings=True,
    ),
    # docs/method.md, vocabulary of the GPT-NeoX tokenizer padded to 50,432.
    "160m": dict(
        vocab_size=50_432,
        num_layers=35,
        d_model=512,
        num_heads=12,
        head_dim=32,
        d_ff=2048,
        tie_embeddings=True,
        dtype="auto",
    ),
    "410m": dict(
        vocab_size=50_432,
        num_layers=24,
        d_model=1024,
        num_heads=16,
        head_dim=64,
        d_ff=2816,
        tie_embeddings=False,
        dtype="auto",
    ),
    "1p4b": dict(
        vocab_size=50_432,
        num_layers=24,
        d_model=2048,
        num_heads=16,
        head_dim=128,
        d_ff=5632,
        tie_embeddings=False,
        dtype="auto",
    ),
}


@gin.configurable
def model_preset(name: str = "tiny", **overrides: Any) -> ModelConfig:
    """A paper anchor by name ('tiny', '160m', '410m', '1p4b'), with field overrides."""
    if name not in MODEL_PRESETS:
        raise ConfigError(
            f"model_preset.name = {name!r} is unknown; choose one of {sorted(MODEL_PRESETS)}."
        )
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 on one axis means "all remaining devices".

    `data`, `fsdp`, `tensor` and `memory` are each axis's parallelism within one
    slice (devices on the fast links: a TPU slice's ICI, a node's NVLink); the
    `dcn_*` fields are its parallelism across slices (the data-centre network
    between TPU slices or GPU nodes). Mesh axis `data` then has `data * dcn_data`
    devices, and so on: the devices of one slice are contiguous on every axis, so
    only the axes given a `dcn_*` > 1 communicate over the slow network. The data
    axis usually goes across (`dcn_data` = the number of slices): its only traffic
    is the gradient reduction. The `dcn_*` sizes multiply to the number of slices
    (`sharding.build_mesh` finds them by the devices' `slice_index`, or by process
    where devices have none); -1 fills the within-slice part only.

    `rules` maps logical axis names (used by the model's parameters and
    activations) to mesh axes; it is the one place sharding is decided. The
    device tier's bank ('memory_blocks') is split over all mesh axes but
    'tensor': by rows where a level's block count divides by that, else along
    its blocks' hidden units where those do (a small level 1 on a big mesh),
    else replicated (`bank.device.bank_logical_axes`).
    """

    data: int = compute(1)
    fsdp: int = compute(-1)
    tensor: int = compute(1)
    memory: int = compute(1)
    dcn_data: int = compute(1)
    dcn_fsdp: int = compute(1)
    dcn_tensor: int = compute(1)
    dcn_memory: int = compute(1)
    rules: tuple[tuple[str, Any], ...] = compute(
        (
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("vocab", "tensor"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("head_dim", None),
            ("q_width", "tensor"),
            ("kv_width", "tensor"),
            ("mlp", "tensor"),
            ("layers", None),
            ("length", None),
            ("norm", None),
            ("memory_blocks", ("data", "fsdp", "memory")),  # bank rows over every device
        )
    )

    def __post_init__(self) -> None:
        _check_types(self)
        sizes = dict(data=self.data, fsdp=self.fsdp, tensor=self.tensor, memory=self.memory)
        auto = [name for name, size in sizes.items() if size == -1]
        _require(len(auto) <= 1, f"MeshConfig: at most one axis may be -1, got {auto}.")
        for name, size in sizes.items():
            _require(size == -1 or size >= 1, f"MeshConfig.{name} = {size} must be >= 1 or -1.")
        for name, size in zip(self.dcn_fields, self.dcn_shape):
            _require(size >= 1, f"MeshConfig.{name} = {size} must be >= 1 (1: within a slice).")

    dcn_fields = ("dcn_data", "dcn_fsdp", "dcn_tensor", "dcn_memory")

    @property
    def dcn_shape(self) -> tuple[int, int, int, int]:
        """Each mesh axis's parallelism across slices, in mesh axis order."""
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor, self.dcn_memory)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a linear-warmup cosine schedule (docs/method.md)."""

    peak_lr: float = course(3e-3)
    end_lr: float = course(3e-5)
    warmup_steps: int = course(50)
    schedule: str = course("cosine")
    b1: float = course(0.9)
    b2: float = course(0.95)
    eps: float = course(1e-8)
    weight_decay: float = course(0.05)
    grad_clip: float = course(1.0)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive("OptimConfig", peak_lr=self.peak_lr, eps=self.eps)
        _require(
            0 <= self.end_lr <= self.peak_lr,
            f"OptimConfig.end_lr = {self.end_lr} must be in [0, peak_lr={self.peak_lr}].",
        )
        _require(self.warmup_steps >= 0, "OptimConfig.warmup_steps must be >= 0.")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "OptimConfig.b1 and b2 must be in [0, 1).")
        _require(self.weight_decay >= 0, "OptimConfig.weight_decay must be >= 0.")
        _require(self.grad_clip >= 0, "OptimConfig.grad_clip must be >= 0 (0 disables clipping).")
        _check_choice("OptimConfig", "schedule", self.schedule, ("cosine", "constant"))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
    """Embedder and balanced hierarchical k-means (docs/method.md; hmem_jax/hierarchy/kmeans.py).

    Level l of the tree has branching**l clusters (16 x 4: 16 / 256 / 4,096 /
    65,536). Each node is fitted with k-means++ and `em_steps` minibatch EM
    steps of `samples_per_step` documents (paper: 20 x 6,400). Balancing: a
    cluster holding more than the balance threshold of a step's assignments is
    split at random with the smallest cluster. The paper's threshold is 0.094
    at branching 16 (~1.5 times a fair share); `balance_threshold = None` (the
    default) means exactly that, scaled to other branchings as
    0.094 * 16 / branching. An explicit value must be >= 1/branching, or no
    clustering could satisfy it. `seed` makes the tree deterministic.

    `fit_sample`: fit on a uniform sample of at most this many documents, drawn
    while the corpus streams past, so neither the documents nor their
    embeddings are ever all in memory (None: fit on every document). A node at
    the last level sees about fit_sample / branching**(depth-1) documents: for
    the paper's tree and full minibatches of 6,400 at every level-4 node, that
    is 4,096 x 6,400 = 26.2M documents (40 GB of float32 MiniLM vectors).
    """

    # 'hashed_idf' (no torch; document frequencies fitted on the corpus), 'hashed', or 'minilm'
    # (the paper's; the `embed` extra).
    embedder: str = "hashed_idf"
    branching: int = 16
    depth: int = 4
    em_steps: int = 20
    samples_per_step: int = 6400
    balance_threshold: float | None = None  # None: 0.094 * 16 / branching (paper at 16: 0.094)
    seed: int = 0
    # Fit on a uniform sample of at most this many documents, streamed (None: all of them).
    fit_sample: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice(
            "HierarchyConfig", "embedder", self.embedder, ("hashed", "hashed_idf", "minilm")
        )
        _require(self.branching >= 2, f"HierarchyConfig.branching = {self.branching} must be >= 2.")
        _require(self.depth >= 1, f"HierarchyConfig.depth = {self.depth} must be >= 1.")
        _require(
            self.branching**self.depth < 2**31,
            f"HierarchyConfig: branching**depth = {self.branching**self.depth} leaves "
            "overflow int32 block ids; lower branching or depth.",
        )
        _check_positive(
            "HierarchyConfig", em_steps=self.em_steps, samples_per_step=self.samples_per_step
        )
        _require(
            self.fit_sample is None or self.fit_sample >= self.branching,
            f"HierarchyConfig.fit_sample = {self.fit_sample} must be None (every document) or "
            f">= branching = {self.branching}.",
        )
        _require(
            self.samples_per_step >= self.branching,
            f"HierarchyConfig.samples_per_step = {self.samples_per_step} must be >= "
            f"branching = {self.branching} so a minibatch can populate every cluster.",
        )
        _require(
            self.balance_threshold is None or 1 / self.branching <= self.balance_threshold <= 1,
            f"HierarchyConfig.balance_threshold = {self.balance_threshold} must be in "
            f"[1/branching = {1 / self.branching:.4g}, 1] or None (the paper's 0.094 at "
            f"branching 16, scaled: {0.094 * 16 / self.branching:.4g} here).",
        )

    @property
    def effective_balance_threshold(self) -> float:
        """The threshold the k-means uses: the explicit value, or 0.094 * 16 / branching."""
        if self.balance_threshold is not None:
            return self.balance_threshold
        return min(1.0, 0.094 * 16 / self.branching)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and where the prepared (tokenized, packed) data lives.

    `source`: 'embedded' (the built-in synthetic encyclopedia), 'jsonl' or
    'text_dir' (then `path` names the file or folder), or 'seqio' (then `path`
    is a seqio Task or Mixture name, registered by importing `seqio_module`).
    `prepared_dir`: the output of `hmem_jax.main.prepare`; empty means
    `WORKDIR/data`, prepared automatically for the embedded corpus.
    `max_document_chars`: longer documents are split into pieces of at most
    this many characters (each piece is routed and packed on its own), so one
    huge document can neither exhaust memory nor dominate a cluster.
    `tokenizer_train_chars`: the tokenizer is trained on the first this-many
    characters of the corpus (a sample keeps training to seconds).
    `prepare_workers`: processes that tokenize during prepare (0 = in-process).
    `worker_count`: loader threads that assemble batches in the background;
    `prefetch`: how many steps ahead the loader reads.
    """

    source: str = "embedded"
    path: str = ""
    prepared_dir: str = course("")
    tokenizer: str = "sentencepiece"  # 'sentencepiece' or 'hf' (a `tokenizers` tokenizer.json)
    tokenizer_path: str = ""  # an existing tokenizer; empty = train one on the corpus
    vocab_size: int = 2048
    embedded_entities: int = 3000
    embedded_seed: int = 0
    seqio_module: str = ""  # module imported before seqio lookup (it registers the Task)
    seqio_split: str = "train"
    seqio_feature: str = "text"
    max_document_chars: int = 200_000
    tokenizer_train_chars: int = 4_000_000
    prepare_workers: int = compute(2)
    prepare_chunk_documents: int = compute(2048)
    worker_count: int = compute(0)
    prefetch: int = compute(2)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice(
            "DataConfig", "source", self.source, ("embedded", "jsonl", "text_dir", "seqio")
        )
        _check_choice("DataConfig", "tokenizer", self.tokenizer, ("sentencepiece", "hf"))
        _require(
            self.source == "embedded" or bool(self.path),
            f"DataConfig.source = {self.source!r} needs DataConfig.path.",
        )
        _check_positive(
            "DataConfig",
            vocab_size=self.vocab_size,
            embedded_entities=self.embedded_entities,
            max_document_chars=self.max_document_chars,
            tokenizer_train_chars=self.tokenizer_train_chars,
            prepare_chunk_documents=self.prepare_chunk_documents,
        )
        _require(
            self.vocab_size >= 300,
            f"DataConfig.vocab_size = {self.vocab_size} is too small: a byte-fallback "
            "tokenizer needs 256 byte pieces plus specials; use >= 300.",
        )
        _require(
            self.worker_count >= 0 and self.prefetch >= 0 and self.prepare_workers >= 0,
            "DataConfig.worker_count, prefetch and prepare_workers must be >= 0.",
        )


MEMORY_KINDS = ("none", "ffn", "lora_qk", "lora_ov", "lora_ffn", "kv")
TRAINING_MODES = ("scratch", "cotrain", "frozen_anchor")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The hierarchical memory bank and how the anchor uses it (docs/method.md).

    `level_sizes` = (r1, ..., r_depth): hidden units (FFN), rank (LoRA) or
    slots (KV) that one cluster at each level contributes per layer; 0 = no
    memory at that level. Its length must equal `HierarchyConfig.depth`.
    `placement`: 'all' layers, or the 'first' / 'last' `placement_layers`.
    `mode`: 'scratch' (anchor and memory from initialisation), 'cotrain'
    (anchor from `TrainConfig.init_from`, both train; the paper's main runs),
    'frozen_anchor' (anchor from `init_from`, frozen; memory only).
    `generic_probability`: chance that a training sequence uses the
    context-independent generic memory instead of its fetched one (paper:
    1/17); 0 disables the generic memory.
    `application`: 'gather' builds each sequence's weights from the step's
    unique blocks; 'grouped' runs one grouped matmul per level over the unique
    blocks (MoE-style dispatch with `jax.lax.ragged_dot`).
    The bank has its own sparse AdamW (see hmem_jax/bank/sparse_adamw.py):
    `lr` warms up over `warmup_steps` and decays by cosine to `end_lr`.
    `bank_dtype` is how the bank's parameters are stored (moments: `moment_dtype`);
    `bank_rounding` is how an update is stored in a narrower `bank_dtype` than
    float32: 'stochastic' (unbiased, so updates below bf16's resolution still
    add up) or 'nearest' (most small updates are lost).

    Bank tier (docs/bank.md): `bank_tier` 'device' keeps
    the whole bank in the train state on the accelerators; 'streaming' keeps
    it in a tensorstore store (`bank_store`: a local path, a kvstore URL such
    as 'gs://bucket/bank/' or 'memory://bank/', or a JSON kvstore spec;
    empty = WORKDIR/bank) behind a host RAM cache of `host_cache_bytes`, and
    reads the blocks of the next `prefetch_steps` steps while a step computes
    (0 = no prefetch). `blocks_per_shard` > 1 groups that many blocks into one
    zarr3 shard file (the sharding codec); `store_splits` cuts every block
    into that many chunks along the axis the mesh splits it (0 = the number of
    processes of the run that creates the store), so each process of a
    multi-host run reads and writes only its own devices' slices. Both only
    apply when a store is created.
    """

    kind: str = "none"
    level_sizes: tuple[int, ...] = ()
    placement: str = "all"
    placement_layers: int = 0
    mode: str = "scratch"
    generic_probability: float = 1.0 / 17.0
    application: str = compute("gather")
    lora_alpha: float = 2.0
    lr: float = course(1e-4)
    end_lr: float = course(1e-5)
    warmup_steps: int = course(100)
    b1: float = course(0.9)
    b2: float = course(0.95)
    eps: float = course(1e-8)
    weight_decay: float = course(1e-3)
    bank_dtype: str = "float32"
    moment_dtype: str = "float32"
    bank_rounding: str = compute("stochastic")
    init_seed: int = 0
    bank_tier: str = "device"
    bank_store: str = course("")
    host_cache_bytes: int = compute(4 << 30)
    prefetch_steps: int = compute(2)
    blocks_per_shard: int = compute(1)
    store_splits: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("MemoryConfig", "kind", self.kind, MEMORY_KINDS)
        _check_choice("MemoryConfig", "bank_tier", self.bank_tier, ("device", "streaming"))
        _require(
            self.host_cache_bytes > 0,
            f"MemoryConfig.host_cache_bytes must be > 0, got {self.host_cache_bytes}; give "
            "the host RAM (bytes) the streamed bank may hold, e.g. 4 << 30.",
        )
        _require(
            self.prefetch_steps >= 0,
            f"MemoryConfig.prefetch_steps must be >= 0 (0 = no prefetch), got "
            f"{self.prefetch_steps}.",
        )
        _require(
            self.blocks_per_shard >= 1,
            f"MemoryConfig.blocks_per_shard must be >= 1 (1 = one file per block), got "
            f"{self.blocks_per_shard}.",
        )
        _require(
            self.store_splits >= 0,
            f"MemoryConfig.store_splits must be >= 0 (0 = one chunk per process of the run "
            f"that creates the store), got {self.store_splits}.",
        )
        _require(
            self.bank_tier == "device" or self.kind != "none" or not self.bank_store,
            "MemoryConfig.bank_store is set but MemoryConfig.kind = 'none' has no bank.",
        )
        _check_choice("MemoryConfig", "placement", self.placement, ("all", "first", "last"))
        _check_choice("MemoryConfig", "mode", self.mode, TRAINING_MODES)
        _check_choice("MemoryConfig", "application", self.application, ("gather", "grouped"))
        _check_choice("MemoryConfig", "bank_dtype", self.bank_dtype, DTYPES)
        _check_choice("MemoryConfig", "moment_dtype", self.moment_dtype, DTYPES)
        _check_choice(
            "MemoryConfig", "bank_rounding", self.bank_rounding, ("stochastic", "nearest")
        )
        _require(
            all(int(r) >= 0 for r in self.level_sizes),
            f"MemoryConfig.level_sizes = {self.level_sizes} must be >= 0 per level.",
        )
        _require(
            self.kind == "none" or sum(self.level_sizes) > 0,
            f"MemoryConfig.kind = {self.kind!r} needs MemoryConfig.level_sizes with at least "
            "one level > 0, e.g. (256, 64, 16, 0).",
        )
        _require(
            self.placement == "all" or self.placement_layers > 0,
            f"MemoryConfig.placement = {self.placement!r} needs placement_layers > 0.",
        )
        _require(
            self.application == "gather" or self.kind == "ffn",
            f"MemoryConfig.application = 'grouped' supports kind 'ffn' only, not "
            f"{self.kind!r}; use application = 'gather'.",
        )
        _require(
            0 <= self.generic_probability < 1, "MemoryConfig.generic_probability must be in [0, 1)."
        )
        _check_positive("MemoryConfig", lr=self.lr, eps=self.eps, lora_alpha=self.lora_alpha)
        _require(0 <= self.end_lr <= self.lr, "MemoryConfig.end_lr must be in [0, lr].")
        _require(
            self.weight_decay >= 0 and self.warmup_steps >= 0,
            "MemoryConfig.weight_decay and warmup_steps must be >= 0.",
        )

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def needs_anchor(self) -> bool:
        """Whether training starts from a pretrained anchor (`TrainConfig.init_from`)."""
        return self.enabled and self.mode != "scratch"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: sizes, schedule, logging and checkpointing, and the sub-configs.

    `init_from` names an earlier run (its workdir, or one `checkpoints/<step>`
    folder) whose anchor parameters start this run: the paper's co-training
    and frozen-anchor modes (which need it: `check_startable`), or, for an
    anchor-only run, continued pretraining. Its optimizer state is not
    carried over.
    `subtree` >= 0 makes this run one job of the paper's subtree-parallel
    frozen-anchor training: it reads only the records routed into that level-1
    cluster, so it touches only that subtree's blocks; `hmem bank merge`
    combines the jobs' banks into one.
    `batch_size` is the global number of sequences per optimizer step; with
    `grad_accum_steps` = k each step runs k micro-batches of batch_size / k.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    hierarchy: HierarchyConfig = dataclasses.field(default_factory=HierarchyConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    init_from: str = course(
        ""
    )  # an anchor run's workdir (or checkpoint step folder) for cotrain / frozen
    tree_dir: str = course(
        ""
    )  # the ClusterTree; empty = WORKDIR/tree, fitted on the corpus if needed
    subtree: int = -1  # >= 0: train only this level-1 subtree's data and blocks (frozen anchor)
    steps: int = course(300)
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    grad_accum_steps: int = compute(1)
    log_every: int = course(10)
    checkpoint_every: int = course(100)
    checkpoint_every_s: int = course(0)  # > 0: also save when this many seconds have passed
    keep_checkpoints: int = course(3)
    async_checkpointing: bool = course(True)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive(
            "TrainConfig",
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            grad_accum_steps=self.grad_accum_steps,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints,
        )
        _require(
            self.checkpoint_every_s >= 0,
            f"TrainConfig.checkpoint_every_s = {self.checkpoint_every_s} must be >= 0 "
            "(0: save by steps only).",
        )
        _require(
            self.batch_size % self.grad_accum_steps == 0,
            f"TrainConfig.batch_size = {self.batch_size} must be divisible by "
            f"grad_accum_steps = {self.grad_accum_steps}.",
        )
        _require(
            not (self.memory.enabled and not self.memory.needs_anchor and self.init_from),
            f"TrainConfig.init_from = {self.init_from!r} is set but MemoryConfig.mode = "
            "'scratch' trains the anchor from initialisation; use mode = 'cotrain' (or "
            "'frozen_anchor'), or leave init_from empty.",
        )
        _require(
            self.model.vocab_size >= self.data.vocab_size,
            f"ModelConfig.vocab_size = {self.model.vocab_size} is smaller than the "
            f"tokenizer's DataConfig.vocab_size = {self.data.vocab_size}; raise the model's.",
        )

        _require(
            self.subtree < 0 or (self.memory.enabled and self.memory.mode == "frozen_anchor"),
            f"TrainConfig.subtree = {self.subtree} trains one level-1 subtree's memory "
            "beside a frozen anchor (the jobs' banks are merged afterwards): set "
            "MemoryConfig.mode = 'frozen_anchor', or subtree = -1.",
        )

    def check_batch_shards(self, shards: int, mesh: str) -> None:
        """The micro-batch divides over the `shards` batch shards of `mesh` (a description)."""
        micro = self.batch_size // self.grad_accum_steps
        _require(
            micro % shards == 0,
            f"TrainConfig.batch_size / grad_accum_steps = {micro} sequences per micro-batch does "
            f"not divide over the {shards} batch shards of the mesh {mesh}; change "
            "batch_size, grad_accum_steps or MeshConfig.",
        )

    def check_startable(self) -> None:
        """What a run needs before its first step, beyond valid values (checked at train time,
        so a config that a recipe completes can still be described by `hmem info`)."""
        check_given(self)
        _require(
            not self.memory.needs_anchor or bool(self.init_from),
            f"MemoryConfig.mode = {self.memory.mode!r} starts from a trained anchor: set "
            "TrainConfig.init_from to that run's workdir (or use mode = 'scratch'), or run "
            "the recipe (`python -m hmem_jax.main.recipe`), which trains the anchor first.",
        )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The paper's two-phase recipe beside its equal-budget baseline (`hmem_jax.main.recipe`).

    baseline: an anchor-only run of `anchor_steps + TrainConfig.steps` steps
      with `anchor_optim` (one warmup-cosine schedule over all its steps);
    memory: the run TrainConfig describes (MemoryConfig, anchor trained with
      `TrainConfig.optim`), started from the baseline's checkpoint at
      `anchor_steps` (the paper's pretrained anchor) for `TrainConfig.steps`;
      MemoryConfig.mode 'scratch' (the default) becomes 'cotrain' there.
    Both runs see the same batches for the first `anchor_steps` steps and the
    same number of tokens in all, so the probe compares a memory model with a
    same-size anchor-only model of the same training budget. `probe_limit`
    probes (0 = all) are scored on both at the end.
    Bind the anchor phase's optimizer with a gin scope:
    `RecipeConfig.anchor_optim = @anchor/OptimConfig()`,
    `anchor/OptimConfig.peak_lr = 3e-3`.
    """

    anchor_steps: int = 300
    anchor_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    probe_limit: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive("RecipeConfig", anchor_steps=self.anchor_steps)
        _require(self.probe_limit >= 0, "RecipeConfig.probe_limit must be >= 0 (0 = all probes).")

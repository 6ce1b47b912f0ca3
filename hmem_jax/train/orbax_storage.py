"""Orbax checkpoints on object stores: gs:// as orbax does it, s3:// via tensorstore's s3 driver.

orbax-checkpoint writes a checkpoint's arrays through tensorstore and its
small files (metadata, the commit marker) through etils.epath. epath reaches
s3:// through fsspec (s3fs), and tensorstore has an `s3` kvstore driver, but
orbax's one function that turns a checkpoint directory into a tensorstore
kvstore spec (`tensorstore_utils.build_kvstore_tspec`) knows only gs:// and
local paths. `enable_s3()` wraps that function: for an s3:// directory it asks
orbax for the spec of the same path on gs:// (so every OCDBT, kvstack and
read-coalescing choice stays orbax's own) and swaps the gcs base kvstore for
the s3 driver, with the endpoint, region and credentials of the AWS_* variables
(`paths.with_environment`). Nothing else in orbax changes.

Object stores have no atomic rename, so a checkpoint there is written in
place and made valid by orbax's commit marker (`commit_success.txt`, written
last): `atomicity_options` says so for every URL. A save killed midway leaves a
step folder without its marker, which orbax does not list as a checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

from hmem_jax import paths
from hmem_jax.errors import HmemError

_GCS_DRIVERS = ("gcs", "gcs_grpc")


class OrbaxVersionError(HmemError, RuntimeError):
    """The installed orbax-checkpoint lacks the function the s3 support wraps."""


def _to_s3(spec: Any, bucket: str) -> Any:
    """`spec` with each gcs kvstore of `bucket` replaced by an s3 kvstore of the same path."""
    if isinstance(spec, dict):
        if spec.get("driver") in _GCS_DRIVERS and spec.get("bucket") == bucket:
            s3 = {"driver": "s3", "bucket": bucket, "path": spec.get("path", "")}
            return paths.with_environment(s3)
        return {key: _to_s3(value, bucket) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_to_s3(value, bucket) for value in spec]
    return spec


@functools.cache
def enable_s3() -> None:
    """Let orbax read and write checkpoints under s3:// URLs (idempotent)."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError as err:
        raise OrbaxVersionError(_version_message()) from err
    original = getattr(tensorstore_utils, "build_kvstore_tspec", None)
    if original is None:
        raise OrbaxVersionError(_version_message())

    @functools.wraps(original)
    def build_kvstore_tspec(directory: Any, name: str | None = None, **kwargs: Any) -> Any:
        text = str(directory)
        if not text.startswith("s3://"):
            return original(directory, name, **kwargs)
        bucket = text[len("s3://") :].split("/", 1)[0]
        return _to_s3(original("gs://" + text[len("s3://") :], name, **kwargs), bucket)

    tensorstore_utils.build_kvstore_tspec = build_kvstore_tspec


def atomicity_options(directory: str) -> Any:
    """Orbax's atomicity options for checkpoints under `directory`: commit markers on object
    stores (no atomic rename there); None (orbax's default, atomic rename) on local disks."""
    from orbax.checkpoint import options

    if paths.is_remote(directory):
        return options.AtomicityOptions(mode=options.AtomicityMode.COMMIT_FILE)
    return None


def prepare(directory: str) -> None:
    """Everything orbax needs before it opens checkpoints under `directory`."""
    if paths.scheme(directory) == "s3":
        enable_s3()
    if paths.is_remote(directory):
        paths.configure_fsspec()


def _version_message() -> str:
    import orbax.checkpoint as ocp

    version = getattr(ocp, "__version__", "?")
    return (
        f"orbax-checkpoint {version} has no tensorstore_utils.build_kvstore_tspec, which s3:// "
        "checkpoints go through; install the version pyproject.toml names "
        "(pip install -e .), or keep the workdir on a local path or gs://."
    )

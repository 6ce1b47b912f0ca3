"""Paths a user gives: local paths, or `gs://` and `s3://` object-store URLs.

Why one module: every place that takes a path from a flag or a config field
(the workdir, `DataConfig.prepared_dir`, `TrainConfig.tree_dir` and
`init_from`, `MemoryConfig.bank_store`, an `--out` folder) asks here whether
it is remote, how to make it absolute, and how to read, write and test it, so
local paths keep plain `os` behaviour byte for byte while URLs go through the
existing engines: etils.epath (fsspec: s3fs, gcsfs) for files, tensorstore's
`s3` and `gcs` kvstore drivers for the bank. No HTTP is written here.

The S3 endpoint is the standard `AWS_ENDPOINT_URL` (a local S3-compatible
server stands in for AWS), the region `AWS_REGION` or `AWS_DEFAULT_REGION`
(default us-east-1), credentials the usual AWS_* variables. Requests to an
object store retry a few times with short delays, so an unreachable endpoint
is one line after seconds, never a hang.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from hmem_jax.errors import HmemError

SCHEMES = ("gs://", "s3://")
# tensorstore's retry resources: a few tries, short delays (its defaults retry for minutes).
_TS_RETRIES = {"max_retries": 3, "initial_delay": "50ms", "max_delay": "1s"}


class ObjectStoreError(HmemError, OSError):
    """An object-store URL cannot be used: the endpoint is unreachable, the bucket is missing,
    the credentials are refused, or the engine that would read the path cannot use URLs."""


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a gs:// or s3:// URL (anything else is a local path)."""
    return bool(path) and str(path).startswith(SCHEMES)


def scheme(path: str) -> str:
    """'gs', 's3' or '' (local)."""
    return str(path).split("://", 1)[0] if is_remote(path) else ""


def absolute(path: str) -> str:
    """A local path made absolute (os.path.abspath); a URL unchanged."""
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    """os.path.join for local paths, '/'-joined for URLs."""
    if is_remote(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def epath_of(path: str) -> Any:
    configure_fsspec()
    from etils import epath

    return epath.Path(path)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    return _remote(path, lambda p: p.exists())


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    return _remote(path, lambda p: p.is_dir())


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    return _remote(path, lambda p: p.is_file())


def makedirs(path: str) -> None:
    """os.makedirs(exist_ok=True); object stores have no folders (nothing to make)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r", **kwargs: Any) -> IO[Any]:
    """open() for local paths (kwargs passed on); epath's open for URLs. Appending to an
    object is not possible ('a' on a URL rewrites it: reading callers should not append)."""
    if not is_remote(path):
        return open(path, mode, **kwargs)
    return _remote(path, lambda p: p.open(mode))


def read_text(path: str) -> str:
    with open_file(path, encoding="utf-8") as handle:
        return handle.read()


def write_text(path: str, text: str) -> None:
    with open_file(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str, data: bytes) -> None:
    with open_file(path, "wb") as handle:
        handle.write(data)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as handle:
        return handle.read()


def remove(path: str) -> None:
    """Delete one file (or object); a missing one is not an error."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    _remote(path, lambda p: p.unlink(missing_ok=True))


def rename(source: str, target: str) -> None:
    """os.rename for local paths; for URLs a copy of every object under `source` to `target`
    and then their deletion (object stores have no rename: not atomic)."""
    if not is_remote(source):
        os.rename(source, target)
        return

    def move(_: Any) -> None:
        fs, root = _filesystem(source)
        fs.mv(root, _filesystem(target)[1], recursive=True)

    _remote(source, move)


def upload_tree(local_dir: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy every file under `local_dir` to the same relative keys under `url`; the files named
    in `last` (relative paths, e.g. a manifest that says the folder is complete) go after all
    others, so an interrupted upload never leaves them beside missing files."""
    names = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            names.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    names.sort(key=lambda relative: (relative in last, relative))
    for relative in names:
        upload_file(os.path.join(local_dir, *relative.split("/")), join(url, relative))


def upload_file(local_file: str, url: str) -> None:
    """Copy one local file to the object `url`."""
    with open(local_file, "rb") as handle:
        data = handle.read()
    _remote(url, lambda p: p.write_bytes(data))


def download_tree(url: str, local_dir: str) -> None:
    """Copy every object under the folder `url` to the same relative paths under `local_dir`."""

    def copy(_: Any) -> None:
        fs, root = _filesystem(url)
        root = root.rstrip("/")
        for key in fs.find(root):
            target = os.path.join(local_dir, *key[len(root) :].lstrip("/").split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(key, target)

    _remote(url, copy)


GLOB_CHARACTERS = "*?["


def has_glob(path: str) -> bool:
    """Whether `path` is a pattern (holds *, ? or [) rather than one file or folder."""
    return any(char in str(path) for char in GLOB_CHARACTERS)


def glob_root(pattern: str) -> str:
    """The folder a pattern's matches lie under: its components before the first wildcard."""
    parts = str(pattern).split("/")
    fixed = next(i for i, part in enumerate(parts) if has_glob(part))
    return "/".join(parts[:fixed]) or ("/" if str(pattern).startswith("/") else ".")


def glob_files(pattern: str) -> list[str]:
    """The files (not folders) matching `pattern`, sorted; `**` matches across folders. A URL
    pattern is matched by its object store's listing and answered as URLs."""
    if not is_remote(pattern):
        import glob

        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))

    def match(_: Any) -> list[str]:
        fs, root = _filesystem(pattern)
        found = fs.glob(root, detail=True)
        return sorted(
            f"{scheme(pattern)}://{key}" for key, info in found.items() if info["type"] == "file"
        )

    return _remote(pattern, match)


def find_files(root: str) -> list[str]:
    """Every file below the folder `root`, recursively, sorted (URLs for a URL root)."""
    if not is_remote(root):
        return sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
        )

    def find(_: Any) -> list[str]:
        fs, key = _filesystem(root)
        return sorted(f"{scheme(root)}://{found}" for found in fs.find(key.rstrip("/")))

    return _remote(root, find)


def remove_tree(path: str) -> None:
    """Delete the folder `path` and everything below it; a missing one is not an error."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return

    def remove_all(_: Any) -> None:
        fs, key = _filesystem(path)
        keys = fs.find(key.rstrip("/"))
        if keys:
            fs.rm(keys)

    _remote(path, remove_all)


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for a URL and the URL's path within it."""
    import fsspec

    configure_fsspec()
    return fsspec.core.url_to_fs(url)


def copy_folder(source: str, target: str) -> None:
    """shutil.copytree(dirs_exist_ok) of a local folder, or download_tree of a URL."""
    if is_remote(source):
        download_tree(source, target)
    else:
        import shutil

        shutil.copytree(source, target, dirs_exist_ok=True)


def cache_dir(name: str) -> str:
    """This host's cache folder `name`: under $HMEM_JAX_CACHE, else ~/.cache/hmem_jax."""
    root = os.environ.get("HMEM_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hmem_jax"
    )
    return os.path.join(root, name)


class LocalMirror:
    """A local folder standing in for the folder `url`, for writers that need local files
    (appending, TensorBoard's event files, profiler traces). For a local `url` it is `url`
    itself and `push`/`pull` do nothing; for a URL it is a fresh temporary folder: `pull` copies
    a file of `url` into it (to append to it), `push` uploads what was written, `close` removes
    the temporary folder."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.remote = is_remote(url)
        self.local = tempfile.mkdtemp(prefix="hmem_mirror_") if self.remote else url

    def path(self, relative: str) -> str:
        return os.path.join(self.local, *relative.split("/"))

    def pull(self, relative: str) -> bool:
        """Copy file `relative` of `url` into the mirror; False if `url` has none."""
        if not self.remote or not isfile(join(self.url, relative)):
            return False
        target = self.path(relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(read_bytes(join(self.url, relative)))
        return True

    def push(self, relative: str) -> None:
        """Upload file or folder `relative` of the mirror to the same place under `url`."""
        if not self.remote:
            return
        source = self.path(relative)
        if os.path.isdir(source):
            upload_tree(source, join(self.url, relative))
        elif os.path.isfile(source):
            upload_file(source, join(self.url, relative))

    def close(self) -> None:
        if self.remote:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def staged(out: str, last: tuple[str, ...] = ()) -> Iterator[str]:
    """A local folder to write an output folder `out` into: `out` itself when local; for a URL a
    temporary folder whose files are uploaded to `out` when the block succeeds (the writers of
    outputs, HF files and plots among them, write local files), those named in `last` after
    the others (`upload_tree`)."""
    if not is_remote(out):
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="hmem_out_") as local:
        yield local
        upload_tree(local, out, last=last)


def configure_fsspec() -> None:
    """s3fs: the endpoint from AWS_ENDPOINT_URL, short connect/read timeouts and few retries
    (an unreachable endpoint fails in seconds). A user's own fsspec config wins."""
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        s3.setdefault("endpoint_url", endpoint)
    s3.setdefault(
        "config_kwargs",
        {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}},
    )


def _remote(path: str, action: Any) -> Any:
    try:
        return action(epath_of(path))
    except HmemError:
        raise
    except Exception as err:  # OSError, ImportError, and botocore's and gcsfs's own classes
        raise explain(err, path) from err


def explain(err: BaseException, where: str) -> ObjectStoreError:
    """One line naming what went wrong with an object-store location and what to check."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    lowered = text.lower()
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if isinstance(err, ImportError):
        return ObjectStoreError(
            f"{where}: the filesystem package for this URL is not installed ({err}); "
            "install s3fs (s3://) or gcsfs (gs://)."
        )
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return ObjectStoreError(
            f"{where}: the bucket does not exist (the server says: {text[:200]}); create it or "
            "fix the URL."
        )
    if any(
        s in lowered
        for s in (
            "could not connect",
            "connect timeout",
            "connection refused",
            "curl error",
            "endpointconnectionerror",
            "cannot connect",
            "failed to connect",
        )
    ):
        return ObjectStoreError(
            f"{where}: the object store cannot be reached ({text[:200]}); check "
            f"AWS_ENDPOINT_URL{f' (= {endpoint})' if endpoint else ''} or the network."
        )
    if any(
        s in lowered
        for s in (
            "accessdenied",
            "access denied",
            "permission_denied",
            "forbidden",
            "403",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "unable to locate credentials",
            "nocredentialserror",
            "unauthenticated",
            "401",
        )
    ):
        return ObjectStoreError(
            f"{where}: the object store refused the credentials ({text[:200]}); set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (s3://) or "
            "GOOGLE_APPLICATION_CREDENTIALS (gs://) for an account that may use the bucket."
        )
    return ObjectStoreError(f"{where}: the object store operation failed ({text[:300]}).")


# ----- tensorstore ---------------------------------------------------------------------------


def with_environment(spec: dict[str, Any]) -> dict[str, Any]:
    """A tensorstore kvstore spec with what the environment says about its service: for `s3`
    the endpoint (AWS_ENDPOINT_URL; without one tensorstore goes to AWS), region and, when
    AWS_ACCESS_KEY_ID is set, credentials from the environment; for s3 and gcs short request
    retries. Values the spec already names are kept."""
    spec = dict(spec)
    driver = spec.get("driver")
    if driver == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec.setdefault("endpoint", endpoint)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        spec.setdefault("aws_region", region or "us-east-1")
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            # Keys in the environment: read only those (the default chain also looks for
            # ~/.aws files and prints an error line for each one missing).
            spec.setdefault("aws_credentials", {"type": "environment"})
    if driver in ("s3", "gcs"):
        context = dict(spec.get("context") or {})
        context.setdefault(f"{driver}_request_retries", dict(_TS_RETRIES))
        spec["context"] = context
    return spec


def kvstore_spec(path: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of a directory (path ending in '/'): a local path -> the
    file driver; gs:// and s3:// -> tensorstore's gcs and s3 drivers, with the environment's
    endpoint, region and retries (`with_environment`)."""
    if is_remote(path):
        import tensorstore as ts

        spec = ts.KvStore.Spec(path).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(path)}
    spec = with_environment(spec)
    if spec.get("path") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec


def check_kvstore(spec: dict[str, Any], where: str) -> None:
    """Fail with one line now, not mid-run, when an object-store kvstore cannot be listed
    (unreachable endpoint, missing bucket, refused credentials). A reading of a missing key in
    a missing bucket answers 'missing' on some servers; a listing does not."""
    if spec.get("driver") not in ("s3", "gcs"):
        return
    if spec.get("driver") == "s3" and "aws_credentials" not in spec:
        _require_aws_credentials(where)
    import tensorstore as ts

    prefix = spec.get("path", "")
    try:
        store = ts.KvStore.open({**spec, "path": ""}).result()
        key = prefix + "manifest.json"
        store.list(ts.KvStore.KeyRange(key, key + "\0")).result()
    except ValueError as err:
        raise explain(err, where) from err


@functools.cache
def _aws_credentials_found() -> bool:
    """Whether AWS's standard chain (environment, ~/.aws files, web identity, container and
    instance roles) yields credentials; botocore asks it quietly and quickly."""
    import botocore.session

    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # a malformed ~/.aws file: let the request report it
        return True


def _require_aws_credentials(where: str) -> None:
    """No credentials at all: one line now (tensorstore would print its whole failed search of
    the chain, then a signed-less request's error)."""
    if not _aws_credentials_found():
        raise ObjectStoreError(
            f"{where}: no AWS credentials were found (no AWS_ACCESS_KEY_ID, no ~/.aws "
            "credentials or AWS_PROFILE, no instance or container role). Set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for an account that "
            "may use the bucket."
        )

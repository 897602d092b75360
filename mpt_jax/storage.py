"""User paths that may be local, `gs://bucket/...` or `s3://bucket/...`: the file operations
the package performs on them, through fsspec (gcsfs, s3fs) for object stores and the os module
for local paths. No client of our own: credentials and endpoints come the usual way
(application default credentials / GOOGLE_APPLICATION_CREDENTIALS / STORAGE_EMULATOR_HOST;
the AWS environment, profile and AWS_ENDPOINT_URL).

Failures become one `StorageError` line naming the object: a missing bucket or object, a
permission error, or a network error that outlived the store library's own retries and ours
(`RETRIES` attempts, exponential backoff). Object stores have no rename and no append, so
`write_atomic` writes the whole object in one upload (readers see the old or the new object,
never a part), and a writer that appends (metrics.jsonl) rewrites its object (`AppendLog`).

What does not speak these paths (the built-in demo corpora, profiler traces) is refused through
`require_local`, one line naming the path and the reason, rather than half-working.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

REMOTE_SCHEMES = ("gs://", "s3://")
# Attempts of one operation on a transient (network) error. gcsfs (6 tries) and s3fs / botocore
# (5) already retry each request with exponential backoff; ours repeats the whole operation once
# more after a short wait, so a store that is down fails in bounded time (about a minute).
RETRIES = 2
BACKOFF_S = 1.0  # first wait; doubled after each failed attempt
# orbax commits a checkpoint directory on an object store (no rename there) by writing this
# object last; a directory without it is unfinished.
ORBAX_COMMIT_MARKER = "commit_success.txt"

T = TypeVar("T")


class StorageError(OSError, ValueError):
    """A storage operation failed or is unsupported; str() is one line naming the path and the
    reason. A ValueError too, so the CLIs' one-line error handling reports it."""


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def _emulator_endpoint_for_tensorstore() -> None:
    # gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST; tensorstore's gcs driver (orbax
    # checkpoints) reads TENSORSTORE_GCS_HTTP_URL instead: point it at the same endpoint.
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL",
                              host if "://" in host else f"http://{host}")


def split_url(path: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = str(path).split("://", 1)[1].partition("/")
    return bucket, key


def tensorstore_kvstore(path: str) -> dict:
    """tensorstore's kvstore spec for `path`: the file driver locally, the gcs or s3 driver on
    a bucket. tensorstore's s3 driver reads the AWS credential chain itself but not
    AWS_ENDPOINT_URL (nor does its s3:// URL form), so the endpoint and region are passed."""
    if not is_remote(path):
        return {"driver": "file", "path": str(path)}
    bucket, key = split_url(path)
    if str(path).startswith("gs://"):
        _emulator_endpoint_for_tensorstore()
        return {"driver": "gcs", "bucket": bucket, "path": key}
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def filesystem(path: str):
    """-> (fsspec filesystem, path inside it) for a remote path."""
    import fsspec

    _emulator_endpoint_for_tensorstore()
    # gcsfs logs every exhausted retry with its traceback; the failure reaches the user as our
    # one line instead (a level set by the user is left alone)
    gcsfs_log = logging.getLogger("gcsfs")
    if gcsfs_log.level == logging.NOTSET:
        gcsfs_log.setLevel(logging.CRITICAL)
    try:
        fs, inner = fsspec.core.url_to_fs(path)
    except ImportError as e:
        raise StorageError(f"{path}: {e} (pip install 'mpt_jax[storage]')") from None
    return fs, inner


def _transient(e: BaseException) -> bool:
    """Network trouble worth another attempt (connection refused or reset, timeouts, 5xx)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                      NotADirectoryError, FileExistsError, ValueError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    name = type(e).__name__
    if name in ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "ResponseStreamingError", "IncompleteRead",
                "ChecksumError"):
        return True
    code = getattr(e, "code", None) or getattr(e, "status", None)
    return isinstance(code, int) and code >= 500


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file, object or bucket"
    if isinstance(e, PermissionError):
        return f"permission denied ({' '.join(str(e).split())[:200] or type(e).__name__})"
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def retrying(path: str, fn: Callable[[], T], *, what: str = "") -> T:
    """fn() with bounded retries (exponential backoff) on transient errors; any failure ->
    one StorageError line naming `path`."""
    wait = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001  (every store library raises its own types)
            if _transient(e) and attempt < RETRIES:
                time.sleep(wait)
                wait *= 2
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise StorageError(f"{path}: {what + ': ' if what else ''}{_reason(e)}{tries}"
                               ) from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def errors(path: str, what: str = "") -> Iterator[None]:
    """Translates any failure inside the block into one StorageError line naming `path`
    (for streaming reads and writes, where a retry would repeat side effects)."""
    try:
        yield
    except (StorageError, ValueError):  # ours already, or a bad-content message of the caller's
        raise
    except Exception as e:
        if not is_remote(path) and not isinstance(e, OSError):
            raise
        raise StorageError(f"{path}: {what + ': ' if what else ''}{_reason(e)}") from None


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
def join(base: str, *parts: str) -> str:
    return posixpath.join(str(base), *parts) if is_remote(base) else os.path.join(base, *parts)


def abspath(path: str) -> str:
    """Local paths made absolute; remote ones without a trailing slash."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def relpath(path: str, start: str) -> str | None:
    """`path` relative to directory `start` (os.path.relpath locally; within one bucket on an
    object store); None when they are on different stores or buckets."""
    if is_remote(path) != is_remote(start):
        return None
    if not is_remote(path):
        return os.path.relpath(path, start)
    (bucket, key), (start_bucket, start_key) = split_url(path), split_url(start)
    if path.split("://")[0] != start.split("://")[0] or bucket != start_bucket:
        return None
    return posixpath.relpath("/" + key, "/" + start_key)


def dirname(path: str) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    p = str(path).rstrip("/") if is_remote(path) else os.path.normpath(path)
    return posixpath.basename(p) if is_remote(path) else os.path.basename(p)


def require_local(path: str, what: str, why: str) -> None:
    """Refuses a remote `path` for a feature that reads or writes local files only."""
    if is_remote(path):
        raise StorageError(f"{what} {path}: {why}; use a local path")


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------
def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return retrying(path, lambda: fs.exists(inner))


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return retrying(path, lambda: fs.isdir(inner))


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    return retrying(path, lambda: fs.isfile(inner))


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, inner = filesystem(path)
    return int(retrying(path, lambda: fs.size(inner)))


def fingerprint(path: str) -> dict:
    """What changes when an object is rewritten: its size and its ETag (or generation)."""
    fs, inner = filesystem(path)
    info = retrying(path, lambda: fs.info(inner))
    tag = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash") if info.get(k)), None)
    return {"bytes": int(info["size"]), "etag": str(tag).strip('"')}


def listdir(path: str) -> list[str]:
    """Names (not paths) directly inside directory `path`, sorted; [] when it does not exist
    (an object store has no empty directories)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, inner = filesystem(path)

    def names():
        try:
            entries = fs.ls(inner, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        root = inner.rstrip("/")
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries
                       if e.rstrip("/") != root})

    return retrying(path, names, what="listing")


def glob(path: str, pattern: str) -> list[str]:
    """Full paths under directory `path` matching `pattern` (fnmatch, '**' recurses), sorted."""
    if not is_remote(path):
        import glob as glob_lib

        return sorted(glob_lib.glob(os.path.join(path, pattern), recursive=True))
    fs, inner = filesystem(path)
    scheme = str(path).split("://", 1)[0] + "://"
    return sorted(scheme + p for p in retrying(
        path, lambda: fs.glob(posixpath.join(inner, pattern)), what="listing"))


# ---------------------------------------------------------------------------------------------
# reads and writes
# ---------------------------------------------------------------------------------------------
def open_file(path: str, mode: str = "rb", **kwargs):
    """A file object for `path` (reads stream with range requests; a remote write becomes
    visible when the file is closed). Opening is retried; later failures surface as the
    library's own errors inside `errors(path)`."""
    if not is_remote(path):
        return open(path, mode, **kwargs)
    fs, inner = filesystem(path)
    return retrying(path, lambda: fs.open(inner, mode, **kwargs),
                    what="reading" if "r" in mode else "writing")


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as fh:
            return fh.read()
    fs, inner = filesystem(path)
    return retrying(path, lambda: fs.cat_file(inner), what="reading")


def read_text(path: str) -> str:
    """UTF-8 text; ValueError naming the file (and the byte) where it is not."""
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def write_atomic(path: str, data: bytes | str) -> None:
    """The whole of `data` at `path`, never a part: locally a temp file renamed into place; on
    an object store one upload, which publishes the object only once it is complete."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not is_remote(path):
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(raw)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, inner = filesystem(path)
    retrying(path, lambda: fs.pipe_file(inner, raw), what="writing")


def upload(local: str, path: str) -> None:
    """Copies local file `local` to `path` (one upload on an object store: published whole
    when complete)."""
    if not is_remote(path):
        shutil.copyfile(local, path)
        return
    fs, inner = filesystem(path)
    retrying(path, lambda: fs.put_file(local, inner), what="uploading")


def makedirs(path: str) -> None:
    """Local: os.makedirs(exist_ok=True). Object stores have no directories: nothing to do."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Removes file `path`; a missing one is not an error."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, inner = filesystem(path)

    def rm():
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(inner)

    retrying(path, rm, what="removing")


def rmtree(path: str) -> None:
    """Removes directory `path` and everything under it; a missing one is not an error."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(path)

    def rm():
        with contextlib.suppress(FileNotFoundError):
            fs.rm(inner, recursive=True)

    retrying(path, rm, what="removing")


class AppendLog:
    """A file that grows record by record (metrics.jsonl lines, TensorBoard events: `binary`).
    Locally: appended and flushed. On an object store, which cannot append: the records are
    kept and the whole object is rewritten on each `flush` (one upload: readers see a complete
    file of the flushed records); the object's earlier records are read back first, so a
    resumed run continues it."""

    def __init__(self, path: str, *, binary: bool = False):
        self.path = path
        self._empty = b"" if binary else ""
        if is_remote(path):
            earlier = (read_bytes(path) if binary else read_text(path)) if exists(path) else None
            self._records = [] if earlier is None else [earlier]
            self._fh = None
        else:
            self._fh = open(path, "ab" if binary else "a")  # noqa: SIM115  (held open)

    def write(self, record) -> None:
        if self._fh is not None:
            self._fh.write(record)
        else:
            self._records.append(record)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
        else:
            write_atomic(self.path, self._empty.join(self._records))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        else:
            self.flush()

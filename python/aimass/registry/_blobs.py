"""Content-addressed artifact stores: ``<root>/blobs/sha256/<hex>``.

``LocalBlobs`` is a folder (temp + fsync + rename + folder fsync); ``FsspecBlobs`` is any fsspec URL
(``s3://``, ``gs://``, ``file://``, ``memory://``): a push uploads to ``<root>/tmp/`` and moves the
object into place, and a fetch downloads into a local cache, both verified against the sha256.
A push first stages the file locally (copy + hash + fsync) so it can be validated as a model before
anything reaches the store.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Tuple

from .._io import fsync_dir
from ._errors import IntegrityError, InvalidArgumentError, RegistryError

CHUNK = 1 << 20
_HEX = re.compile(r"^[0-9a-f]{64}$")


def fault(point: str) -> None:
    """Test hook: SIGKILL this process at `point` when AIMASS_REGISTRY_FAULT names it."""
    if os.environ.get("AIMASS_REGISTRY_FAULT") == point:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
            else _sha256_stream(f)


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def stage_copy(src: str, tmp_dir: Path) -> Tuple[Path, str, int]:
    """Copy `src` to a new file in `tmp_dir` while hashing it; fsynced. Returns (tmp path, sha256, size)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"push-{os.getpid()}-{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            while True:
                chunk = fin.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
                fault("copy")
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size


def _check_hex(sha: str) -> str:
    if not isinstance(sha, str) or not _HEX.match(sha):
        raise InvalidArgumentError(f"not a sha256 hex digest: {sha!r}")
    return sha


class LocalBlobs:
    """Blobs in a local folder."""

    remote = False

    def __init__(self, root):
        self.root = Path(root).expanduser().absolute()
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"

    @property
    def display(self) -> str:
        return str(self.root)

    def path(self, sha: str) -> str:
        return str(self.blob_dir / _check_hex(sha))

    def staging_dir(self) -> Path:
        return self.tmp_dir  # same file system as blob_dir, so the rename is atomic

    def commit(self, staged: Path, sha: str) -> None:
        """Move a staged, fsynced file into place; after this returns the blob is durable."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        final = self.blob_dir / _check_hex(sha)
        os.chmod(staged, 0o444)
        os.replace(staged, final)  # same content if it existed: content-addressed
        fault("rename")
        fsync_dir(self.blob_dir)
        os.utime(final)  # fresh mtime: gc's grace period protects it until the row is committed

    def exists(self, sha: str) -> bool:
        return (self.blob_dir / _check_hex(sha)).is_file()

    def fetch(self, sha: str) -> str:
        """The blob's local path after checking its sha256."""
        p = self.blob_dir / _check_hex(sha)
        if not p.is_file():
            raise IntegrityError(f"registry blob {p} is missing; the store lost an artifact "
                                 "(restore it from a backup, or delete the version)")
        got = sha256_file(p)
        if got != sha:
            raise IntegrityError(f"registry blob {p} is corrupt: its sha256 is {got}, expected {sha}; "
                                 "restore it from a backup or delete the version")
        return str(p)

    def list_blobs(self) -> Iterator[Tuple[str, float, int]]:
        """(sha256, age in seconds, size) of every blob."""
        now = time.time()
        if self.blob_dir.is_dir():
            for e in os.scandir(self.blob_dir):
                if _HEX.match(e.name) and e.is_file():
                    st = e.stat()
                    yield e.name, now - st.st_mtime, st.st_size

    def list_temp(self) -> Iterator[Tuple[str, float, int]]:
        now = time.time()
        for d in (self.tmp_dir, self.blob_dir):
            if d.is_dir():
                for e in os.scandir(d):
                    if e.is_file() and (d == self.tmp_dir or not _HEX.match(e.name)):
                        st = e.stat()
                        yield e.path, now - st.st_mtime, st.st_size

    def remove_blob(self, sha: str) -> None:
        (self.blob_dir / _check_hex(sha)).unlink(missing_ok=True)

    def remove_temp(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)


class FsspecBlobs:
    """Blobs under an fsspec URL; fetched copies are cached (and verified) in `cache_dir`."""

    remote = True

    def __init__(self, url: str, cache_dir: Path, local_tmp: Path):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise RegistryError("blob URLs need fsspec: pip install fsspec") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise InvalidArgumentError(
                f"registry blobs: cannot open {url!r}: {exc} (s3:// needs s3fs, gs:// needs gcsfs)") from None
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self._local_tmp = Path(local_tmp)
        self._local = type(self.fs).__name__ == "LocalFileSystem"

    @property
    def display(self) -> str:
        return self.url

    def _key(self, sha: str) -> str:
        return f"{self.root}/blobs/sha256/{_check_hex(sha)}"

    def path(self, sha: str) -> str:
        return f"{self.url}/blobs/sha256/{_check_hex(sha)}"

    def staging_dir(self) -> Path:
        return self._local_tmp

    def commit(self, staged: Path, sha: str) -> None:
        tmp = f"{self.root}/tmp/push-{os.getpid()}-{uuid.uuid4().hex}.part"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        self.fs.makedirs(f"{self.root}/blobs/sha256", exist_ok=True)
        try:
            self.fs.put_file(str(staged), tmp)
            if self._local:  # file://: make the upload durable before it gets its name
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            fault("upload")
            self.fs.mv(tmp, self._key(sha))
            fault("rename")
            if self._local:
                fsync_dir(Path(self._key(sha)).parent)
        finally:
            Path(staged).unlink(missing_ok=True)

    def exists(self, sha: str) -> bool:
        return self.fs.isfile(self._key(sha))

    def fetch(self, sha: str) -> str:
        cached = self.cache_dir / _check_hex(sha)
        if cached.is_file() and sha256_file(cached) == sha:
            return str(cached)
        if not self.exists(sha):
            raise IntegrityError(f"registry blob {self.path(sha)} is missing; the store lost an artifact "
                                 "(restore it from a backup, or delete the version)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{sha}.{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            self.fs.get_file(self._key(sha), str(tmp))
            got = sha256_file(tmp)
            if got != sha:
                raise IntegrityError(f"registry blob {self.path(sha)} is corrupt: its sha256 is {got}, "
                                     f"expected {sha}; restore it from a backup or delete the version")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return str(cached)

    def _age(self, info: dict, now: float) -> float:
        for k in ("mtime", "LastModified", "updated", "created"):
            v = info.get(k)
            if v is None:
                continue
            if hasattr(v, "timestamp"):
                return now - v.timestamp()
            try:
                return now - float(v)
            except (TypeError, ValueError):
                continue
        return 0.0  # unknown age: treated as new, removed only with grace 0

    def _listing(self, d: str):
        try:
            return self.fs.ls(d, detail=True)
        except FileNotFoundError:
            return []

    def list_blobs(self) -> Iterator[Tuple[str, float, int]]:
        now = time.time()
        for info in self._listing(f"{self.root}/blobs/sha256"):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and _HEX.match(name):
                yield name, self._age(info, now), int(info.get("size") or 0)

    def list_temp(self) -> Iterator[Tuple[str, float, int]]:
        now = time.time()
        for info in self._listing(f"{self.root}/tmp"):
            if info.get("type") == "file":
                yield info["name"], self._age(info, now), int(info.get("size") or 0)
        if self._local_tmp.is_dir():  # staged copies of killed pushes
            for e in os.scandir(self._local_tmp):
                if e.is_file() and e.name.startswith("push-"):
                    st = e.stat()
                    yield e.path, now - st.st_mtime, st.st_size

    def remove_blob(self, sha: str) -> None:
        try:
            self.fs.rm_file(self._key(sha))
        except FileNotFoundError:
            pass
        (self.cache_dir / sha).unlink(missing_ok=True)

    def remove_temp(self, path: str) -> None:
        if path.startswith(str(self._local_tmp)):
            Path(path).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass


def open_blobs(spec: Optional[str], default_root: Optional[Path], cache_dir: Path, local_tmp: Path):
    """A blob store from a folder path or an fsspec URL (None: `default_root`)."""
    if spec is None or spec == "":
        if default_root is None:
            raise InvalidArgumentError(
                "a database-URL registry store needs a blob location: pass blobs=URL (--blobs, or "
                "AIMASS_REGISTRY_BLOBS), e.g. s3://bucket/aimass, gs://bucket/aimass or file:///shared/aimass")
        return LocalBlobs(default_root)
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidArgumentError(f"registry blobs must be a folder or URL string, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if "://" in spec:
        return FsspecBlobs(spec, cache_dir, local_tmp)
    return LocalBlobs(spec)

"""Artifact store over fsspec: local paths and URLs, atomic writes, manifests.

Atomicity: a writer streams into a hidden temporary name beside the target and
renames it into place only after the data is complete (local: fsync +
os.replace; other filesystems: fs.mv, which object stores implement as an
atomic put of the finished object). Listings skip temporary names, so a reader
never sees a half-written file and a killed writer leaves the old file intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import Any, Iterator

from fsspec.core import url_to_fs

from .errors import StoreError

TMP_MARK = ".tmp-"


def is_temporary(name: str) -> bool:
    return TMP_MARK in posixpath.basename(name)


def _fs(url: str):
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"{url}: cannot open this location ({exc})") from None


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/") if url not in ("/",) else url
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


def absolute(url: str) -> str:
    """A local relative path made absolute (worker processes, e.g. Ray Train's, run in other
    directories); URLs and absolute paths are returned unchanged."""
    if not url or "://" in url or os.path.isabs(url):
        return url
    return os.path.abspath(url)


def is_local(url: str) -> bool:
    fs, _ = _fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = _fs(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StoreError(f"{url}: no such file") from None
    except IsADirectoryError:
        raise StoreError(f"{url}: is a directory, expected a file") from None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{url}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def open_read(url: str):
    fs, path = _fs(url)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise StoreError(f"{url}: no such file") from None


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Open `url` for writing; it appears under its name only on clean exit."""
    if "w" not in mode:
        raise ValueError("atomic_open is for writing")
    fs, path = _fs(url)
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{url}: cannot create the folder ({exc.strerror or exc})") from None
    local = _is_local_fs(fs)
    try:
        f = fs.open(tmp, mode)
    except OSError as exc:
        raise StoreError(f"{url}: cannot write ({exc.strerror or exc})") from None
    ok = False
    try:
        with f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(Exception):
                fs.rm(tmp)


def _is_local_fs(fs) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protos or "local" in protos


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under `url`, temporary files excluded, sorted."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if not is_temporary(n))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(url: str) -> None:
    fs, path = _fs(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{url}: cannot create the folder ({exc.strerror or exc})") from None


def check_writable(url: str) -> None:
    """Fail early, before any work, when `url` cannot be written."""
    probe = join(url, f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{url}: cannot write here ({exc})") from None


def sha256_file(url: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_read(url) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


MANIFEST = "manifest.json"


def write_manifest(dir_url: str, info: dict[str, Any], files: list[str] | None = None) -> dict:
    """Write `dir_url/manifest.json`: `info` plus size and sha256 of each file.

    `files` are names relative to `dir_url` (default: every file there)."""
    from . import __version__

    names = files if files is not None else [n for n in listdir(dir_url) if n != MANIFEST]
    entries = {}
    for name in names:
        u = join(dir_url, name)
        fs, path = _fs(u)
        entries[name] = {"bytes": int(fs.size(path)), "sha256": sha256_file(u)}
    manifest = {"engine_version": __version__, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info, "files": entries}
    write_json(join(dir_url, MANIFEST), manifest)
    return manifest


def read_manifest(dir_url: str, verify: bool = False) -> dict:
    url = join(dir_url, MANIFEST)
    if not exists(url):
        raise StoreError(f"{url}: missing manifest (the artifact is incomplete or was not produced)")
    manifest = read_json(url)
    if verify:
        for name, meta in manifest.get("files", {}).items():
            u = join(dir_url, name)
            if not exists(u):
                raise StoreError(f"{u}: listed in the manifest but missing")
            got = sha256_file(u)
            if got != meta["sha256"]:
                raise StoreError(f"{u}: checksum mismatch (manifest {meta['sha256'][:12]}, file {got[:12]})")
    return manifest

"""Run folders, manifests, atomic writes, content fingerprints and run locks.

A stage writes its outputs, then ``manifest.json`` last: a folder without a manifest did not finish.
Every file goes through a temporary name in the same folder, is fsynced, and replaces its target with
``os.replace`` (the folder is fsynced after), so a reader never sees half a file, whenever the writer is
killed, and a power cut does not leave a renamed but empty file. Resume decisions hash file contents
(:func:`content_fingerprint`), never sizes or times, and :class:`RunLock` keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from steerray.errors import SteerrayError

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
DIGEST_CHUNK = 1024**2  # bytes read per step when hashing: constant memory whatever the file size
# Filesystems without flock (some FUSE bucket mounts) answer with one of these.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}

log = logging.getLogger("steerray")


class ManifestError(SteerrayError, RuntimeError):
    """A manifest that exists but cannot be trusted."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary file is fsynced before the rename and the folder after it, so after a crash or power
    cut ``path`` holds either the old content or all of the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files others may read
    try:
        yield Path(tmp)
        _fsync_path(tmp)  # the data reaches the disk before the new name points at it
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)  # and the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_path(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON lines atomically (``ensure_ascii=False``, as NeMo's preprocessors do)."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def package_versions() -> dict[str, str]:
    # Where steerray ran from: an installed package or a checkout (a cluster job must use the installed one).
    versions = {"python": platform.python_version(), "steerray_at": str(Path(__file__).resolve().parent)}
    for name in ("steerray", "torch", "ray", "transformers", "peft", "pyarrow", "deepspeed", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


SECRET_OPTIONS = ("--token", "--api-key", "--password")
SECRET_ENV_WORDS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY")


def redacted_command(argv: Sequence[str]) -> str:
    """The command line as a manifest records it, with secrets replaced by ``***``: the values of
    ``--token``-like options, and any text equal to a secret-looking environment variable's value."""
    secrets = [v for k, v in os.environ.items() if any(w in k.upper() for w in SECRET_ENV_WORDS) and len(v) >= 6]
    words, hide_next = [], False
    for word in argv:
        name, eq, _ = word.partition("=")
        if hide_next:
            word, hide_next = "***", False
        elif word in SECRET_OPTIONS:
            hide_next = True
        elif eq and name in SECRET_OPTIONS:
            word = f"{name}=***"
        for secret in secrets:
            word = word.replace(secret, "***")
        words.append(word)
    return " ".join(words)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel | Mapping[str, Any]) -> str:
    """Stable hash of a resolved config: equal configs, equal hashes (used to skip finished stages)."""
    data = config_to_dict(config) if isinstance(config, BaseModel) else dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(out_dir: str | Path, stage: str, config: BaseModel | Mapping[str, Any], **sections: Any) -> Path:
    """Write ``manifest.json`` (stage, config hash, versions, then whatever sections the stage gives)."""
    config_dict = config_to_dict(config) if isinstance(config, BaseModel) else dict(config)
    manifest = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": config_hash(config_dict),
        "config": config_dict,
        "versions": package_versions(),
        "command": redacted_command(sys.argv),
        **sections,
    }
    return atomic_write_json(Path(out_dir) / MANIFEST, manifest)


def read_manifest(out_dir: str | Path, stage: str | None = None) -> dict[str, Any] | None:
    """The manifest of a finished stage, None if the stage did not finish, ManifestError if corrupt."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is corrupted ({err}); delete it to re-run the stage") from None
    if not isinstance(manifest, dict) or "stage" not in manifest or "config_hash" not in manifest:
        raise ManifestError(f"{path} is not a steerray manifest (no stage/config_hash); delete it to re-run")
    if stage is not None and manifest["stage"] != stage:
        raise ManifestError(f"{path} belongs to stage {manifest['stage']!r}, expected {stage!r}")
    return manifest


def require_manifest(out_dir: str | Path, stage: str) -> dict[str, Any]:
    """Like :func:`read_manifest`, but a missing manifest is an error naming the stage to run first."""
    manifest = read_manifest(out_dir, stage)
    if manifest is None:
        raise ManifestError(f"{out_dir} holds no finished {stage!r} output (no {MANIFEST}); run `steerray {stage}` first")
    return manifest


# --------------------------------------------------------------------------------------------------
# Content fingerprints: what a resume trusts
# --------------------------------------------------------------------------------------------------

def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks (constant memory).

    Always reads the bytes (about 1.7 GiB/s from the page cache here): no size or time is trusted.
    """
    digest = hashlib.sha256()
    buffer = bytearray(DIGEST_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as handle:
            while size := handle.readinto(buffer):
                digest.update(view[:size])
    except OSError as err:
        raise SteerrayError(f"{path}: cannot read it to fingerprint its content ({err.strerror or err})") \
            from None
    return digest.hexdigest()


def content_fingerprint(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One sha256 (hex) over the names and contents of ``paths``; folders count as every file inside.

    Independent of the order ``paths`` come in and of sizes or times: only names and bytes count. A name
    is the path relative to ``root`` when given (the fingerprint then survives moving the folder), else
    the path as given. Inside folders, names starting with ``.`` are skipped (temp files of atomic writes,
    run locks, caches). Each file is hashed once, so the cost is one read of every byte.
    """
    files = {_fingerprint_name(file, root): file for file in _expand_files(paths)}
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{file_digest(files[name])}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _expand_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file()
                              and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            yield path
        else:
            raise SteerrayError(f"{path}: no such file or folder to fingerprint")


def _fingerprint_name(path: Path, root: str | Path | None) -> str:
    if root is None:
        return path.as_posix()
    try:  # absolute, not resolved: a symlink inside root (a hub cache snapshot's files) keeps its own name
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        raise SteerrayError(f"{path} is not inside {root}, the folder its fingerprint is relative to") \
            from None


# --------------------------------------------------------------------------------------------------
# Run locks: one run per folder
# --------------------------------------------------------------------------------------------------

class RunLocked(SteerrayError, RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """Hold an exclusive ``flock`` on ``folder/.lock`` while a run writes into ``folder``.

    The lock file records the holder's PID, host and command, so a second run (in any process) is
    refused with :class:`RunLocked` naming them. The kernel drops a ``flock`` when its holder dies, even
    by SIGKILL, so a lock file left behind by a dead run never blocks the next one; the file itself is
    kept (deleting it would let two runs lock two different files). Not reentrant: taking the lock of a
    folder this process already holds is refused too. Usage: ``with RunLock(out): ...``.
    """

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = " ".join(sys.argv) if command is None else command
        self._fd: int | None = None
        self._locked = False  # False while held on a filesystem without flock

    def acquire(self) -> RunLock:
        """Take the lock now, or raise :class:`RunLocked` naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._locked = True
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error() from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            # Refusing to run at all on such a filesystem would be worse than running unguarded.
            log.warning("cannot lock %s (%s): this filesystem has no flock, so a second run on %s would not "
                        "be stopped", self.path, err.strerror, self.folder)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8", "surrogateescape"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays, marked free); safe to call twice."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file reads as "no holder"
        if self._locked:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd, self._locked = None, False

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (empty when none was recorded)."""
        # The winner writes its record just after taking the lock: a reader racing it may see an empty file.
        for _ in range(20):
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace").strip()
            except FileNotFoundError:
                return {}
            if text:
                try:
                    found = json.loads(text)
                except json.JSONDecodeError:
                    return {"command": text[:200]}
                return found if isinstance(found, dict) else {}
            time.sleep(0.025)
        return {}

    def _locked_error(self) -> RunLocked:
        holder = self.holder()
        pid = holder.get("pid", "unknown")
        who = " (this process)" if pid == os.getpid() else ""
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        return RunLocked(
            f"{self.folder} is in use by another run: PID {pid}{who}{where}, command "
            f"{holder.get('command', '?')!r}, since {holder.get('since', '?')}. Wait for it to finish (or "
            f"stop it), or use another --out/--run; the lock is {self.path}")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

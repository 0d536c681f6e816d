"""Nothing lost, nothing stale: fsynced atomic writes, content fingerprints, run locks across processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steerray.artifacts import (
    LOCK_FILE,
    RunLock,
    RunLocked,
    atomic_path,
    atomic_write_text,
    content_fingerprint,
    file_digest,
)
from steerray.errors import SteerrayError

REPO = Path(__file__).resolve().parents[2]
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# -- atomic writes --------------------------------------------------------------------------------

def _record_syscalls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Watch the real os.fsync / os.replace (they still run): (call, inode, is_directory)."""
    calls: list[tuple[str, int, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append(("replace", os.stat(src).st_ino, False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_path_fsyncs_file_before_rename_and_folder_after(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "out" / "data.jsonl"
    calls = _record_syscalls(monkeypatch)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"a": 1}\n')
        tmp_inode = os.stat(tmp).st_ino
    folder_inode = os.stat(target.parent).st_ino
    assert calls == [("fsync", tmp_inode, False), ("replace", tmp_inode, False),
                     ("fsync", folder_inode, True)]
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n'
    assert os.stat(target).st_ino == tmp_inode  # the fsynced file is the one now under the name
    assert [p.name for p in target.parent.iterdir()] == ["data.jsonl"]  # no temp file left


def test_atomic_path_failure_keeps_old_file_and_syncs_nothing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    target = atomic_write_text(tmp_path / "state.json", "old\n")
    calls = _record_syscalls(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")
    assert calls == []
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# -- content fingerprints --------------------------------------------------------------------------

def test_file_digest_streams_chunks_and_matches_sha256(tmp_path: Path):
    data = os.urandom(5 * 1024**2 // 2)  # 2.5 MiB: several 1 MiB chunks and a partial one
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "empty") == EMPTY_SHA256
    with pytest.raises(SteerrayError, match=r"nope\.jsonl: cannot read it"):
        file_digest(tmp_path / "nope.jsonl")


def _expected(entries: list[tuple[str, bytes]]) -> str:
    """The documented formula: sha256 over sorted "name NUL sha256(content) LF" lines."""
    lines = "".join(f"{name}\0{hashlib.sha256(body).hexdigest()}\n" for name, body in sorted(entries))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_content_fingerprint_covers_names_and_bytes_not_order(tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'{"x": 1}\n')
    b.write_bytes(b'{"x": 2}\n')
    fingerprint = content_fingerprint([b, a])
    assert fingerprint == content_fingerprint([str(a), str(b)])
    assert fingerprint == _expected([(a.as_posix(), b'{"x": 1}\n'), (b.as_posix(), b'{"x": 2}\n')])
    assert content_fingerprint([a]) != fingerprint  # a dropped file counts


def test_content_fingerprint_sees_same_size_edit_with_restored_mtime(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"label": 1}\n')
    before = os.stat(path)
    fingerprint = content_fingerprint([path])
    path.write_bytes(b'{"label": 4}\n')  # same size, then the old times back (as `cp -p` or a restore does)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert content_fingerprint([path]) != fingerprint
    path.write_bytes(b'{"label": 1}\n')
    os.utime(path, ns=(1, 10**18))  # only the times changed now: the fingerprint is the first one again
    assert content_fingerprint([path]) == fingerprint


def test_content_fingerprint_of_folders_relative_to_root(tmp_path: Path):
    one = tmp_path / "one" / "model"
    (one / "sub").mkdir(parents=True)
    (one / "config.json").write_bytes(b"{}")
    (one / "sub" / "w.bin").write_bytes(b"\x00\x01")
    fingerprint = content_fingerprint([one], root=one)
    assert fingerprint == _expected([("config.json", b"{}"), ("sub/w.bin", b"\x00\x01")])
    (one / LOCK_FILE).write_text("123")  # run locks and temp files of atomic writes do not count
    (one / ".w.bin.abc.tmp").write_bytes(b"partial")
    assert content_fingerprint([one], root=one) == fingerprint
    two = tmp_path / "elsewhere" / "model"  # the same files in another place: the same fingerprint
    (two / "sub").mkdir(parents=True)
    (two / "config.json").write_bytes(b"{}")
    (two / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert content_fingerprint([two], root=two) == fingerprint
    assert content_fingerprint([two]) != fingerprint  # without a root the location is part of each name
    (two / "sub" / "w.bin").rename(two / "sub" / "v.bin")
    assert content_fingerprint([two], root=two) != fingerprint
    cache = tmp_path / "hub-cache"  # a hub cache snapshot: its files are symlinks to blobs outside it
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / "b1").write_bytes(b"{}")
    (cache / "blobs" / "b2").write_bytes(b"\x00\x01")
    snapshot = cache / "snapshots" / "rev"
    (snapshot / "sub").mkdir(parents=True)
    (snapshot / "config.json").symlink_to(cache / "blobs" / "b1")
    (snapshot / "sub" / "w.bin").symlink_to(cache / "blobs" / "b2")
    assert content_fingerprint([snapshot], root=snapshot) == fingerprint
    with pytest.raises(SteerrayError, match="missing.jsonl: no such file or folder"):
        content_fingerprint([tmp_path / "missing.jsonl"])
    with pytest.raises(SteerrayError, match="is not inside"):
        content_fingerprint([one / "config.json"], root=two)


# -- run locks ------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from steerray.artifacts import RunLock
    with RunLock(sys.argv[1], command="steerray train-sft --run exp1"):
        print("locked", flush=True)
        time.sleep(120)
""")

CONTENDER = textwrap.dedent("""
    import sys
    from steerray.artifacts import RunLock, RunLocked
    try:
        RunLock(sys.argv[1]).acquire()
    except RunLocked as err:
        print(err)
        sys.exit(3)
    print("acquired")
""")


def _python(code: str, folder: Path, **kwargs: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_run_lock_refuses_a_second_process_and_survives_sigkill_of_the_holder(tmp_path: Path):
    folder = tmp_path / "runs" / "exp1"
    holder = _python(HOLDER, folder)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(RunLocked, match=rf"PID {holder.pid}, command 'steerray train-sft --run exp1'"):
            RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file keeps the dead holder's record
        holder.wait(timeout=30)
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid
    # The kernel freed the dead holder's flock: the next run gets the lock and records itself.
    with RunLock(folder, command="steerray train-sft --run exp1 (again)") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["command"] == "steerray train-sft --run exp1 (again)"
        contender = _python(CONTENDER, folder)
        out, err = contender.communicate(timeout=60)
        assert contender.returncode == 3, err
        assert f"PID {os.getpid()}, command 'steerray train-sft --run exp1 (again)'" in out
    assert (folder / LOCK_FILE).read_text() == ""  # released: the file stays, marked free
    contender = _python(CONTENDER, folder)
    assert contender.communicate(timeout=60)[0].strip() == "acquired"


def test_run_lock_is_not_reentrant_and_release_is_idempotent(tmp_path: Path):
    with RunLock(tmp_path, command="first"):
        with pytest.raises(RunLocked, match=rf"PID {os.getpid()} \(this process\), command 'first'"):
            RunLock(tmp_path, command="second").acquire()
    lock = RunLock(tmp_path).acquire()
    lock.release()
    lock.release()
    assert RunLock(tmp_path).holder() == {}


def test_run_lock_on_a_filesystem_without_flock_warns_and_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):

    def no_flock(fd: int, operation: int) -> None:  # what a FUSE bucket mount without locks answers
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING", logger="steerray"), RunLock(tmp_path, command="unguarded") as lock:
        assert json.loads(lock.path.read_text())["command"] == "unguarded"
    assert lock.path.read_text() == ""  # released without unlocking what was never locked
    assert "this filesystem has no flock" in caplog.text and str(tmp_path / LOCK_FILE) in caplog.text

    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        RunLock(tmp_path).acquire()

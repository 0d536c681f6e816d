"""Run folders, manifests and atomic writes.

A stage writes its outputs, then ``manifest.json`` last: a folder without a manifest did not finish.
Every file goes through a temporary name in the same folder and ``os.replace``, so a reader never sees
half a file, whenever the writer is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from steerray.errors import SteerrayError

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"


class ManifestError(SteerrayError, RuntimeError):
    """A manifest that exists but cannot be trusted."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files others may read
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterator[Mapping[str, Any]] | list[Mapping[str, Any]]) -> int:
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
    versions = {"python": platform.python_version()}
    for name in ("steerray", "torch", "ray", "transformers", "peft", "pyarrow", "deepspeed", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_manifest(out_dir: str | Path, stage: str, config: BaseModel | Mapping[str, Any], **sections: Any) -> Path:
    """Write ``manifest.json`` (stage, config hash, versions, then whatever sections the stage gives)."""
    from steerray.config import config_hash, config_to_dict

    config_dict = config_to_dict(config) if isinstance(config, BaseModel) else dict(config)
    manifest = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": config_hash(config_dict),
        "config": config_dict,
        "versions": package_versions(),
        "command": " ".join(sys.argv),
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

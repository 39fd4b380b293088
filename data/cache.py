"""Cache files: safetensors with a JSON header, written atomically, checked by fingerprint.

A crash (even SIGKILL) at any moment leaves either the old file or the new one, never a torn one: every
write goes to a temp file in the same folder, is fsynced, then `os.replace`d into place. A re-run trusts
an entry only when its stored fingerprint equals the one it would write now.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
META_KEY = "vidlora"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # recipe names -> torch dtypes
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[str], None], only_if_changed: bool = False) -> bool:
    """Run `write(tmp_path)`, fsync, then rename onto `path`; the folder is fsynced so the rename sticks.
    The file gets the mode a plain open() would give it (`file_mode`), not the temp file's 0600.

    only_if_changed: leave `path` (and its mtime) alone when the new bytes equal the old ones.
    Returns whether `path` was written. Temp files are named `.<name>.*.tmp` (see `remove_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if only_if_changed and path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            Path(tmp).unlink()
            return False
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def file_mode() -> int:
    """The mode a plain open() gives a new file (0666 & ~umask). Files must get it, so that another user
    (a ComfyUI service, a teammate) can read them: mkstemp and safetensors create 0600 files."""
    try:
        umask = next(
            int(line.split()[1], 8)
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("Umask:")
        )
    except (OSError, StopIteration):  # no /proc (macOS): read it by setting it (not thread-safe, instant)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def remove_temp_files(folder: str | Path, recursive: bool = True) -> int:
    """Delete the temp files `atomic_write` leaves when a process is killed mid-write (`.<name>.*.tmp`)."""
    removed = 0
    folder = Path(folder)
    for tmp in folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def write_json(path: str | Path, data: Any, only_if_changed: bool = False) -> bool:
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), only_if_changed)


def save_entry(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    """One cache entry: tensors plus vidlora's metadata as JSON under one header key."""
    header = {META_KEY: json.dumps(meta, ensure_ascii=False), "format_version": str(FORMAT_VERSION)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The entry's metadata, or None when the file is missing or unreadable (then it is simply redone)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])
    except Exception:
        return None


def load_entry(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (sorted keys), for deciding whether an entry is current."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_identity(path: str | Path) -> dict[str, Any]:
    """What says a source file changed without reading it: resolved path, size and modification time."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

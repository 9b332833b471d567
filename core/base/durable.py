"""Making a write durable: flush a file, or a directory's entries (its renames), to the disk.

Checkpoints and adapter saves are written beside their target and renamed into place; the
rename survives a power loss only once the directory holding it is flushed too.
"""
import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush ``path`` — a file, or a directory's entries — to the disk."""
    if os.name == "nt" and Path(path).is_dir():  # Windows cannot open a directory to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a file beside it renamed into place: a reader (or a
    kill midway) sees the old content or the new, never half of it."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)

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

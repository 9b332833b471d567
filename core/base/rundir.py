"""Directories a user owns: run names, an exclusive lock per run, replace-only-when-proven.

    --name ─▶ check_name (one plain path component, inside --output-dir)
           ─▶ RunLock(.NAME.lock beside the resolved run directory)  held for the process's life
           ─▶ ... validate every input, load the model ...
           ─▶ Staged(target).commit()         build beside, then swap in

Nothing a user made is deleted before its replacement exists: ``--overwrite`` and
``qpeft export --overwrite`` build the new directory beside the old one and swap it in
(two renames) only once the new one is proven; the old one is removed last.
"""
import errno
import fcntl
import os
import shutil
from pathlib import Path

from qpeft.core.base.errors import QpeftError

_FORBIDDEN = set('/\\:*?"<>|\0')


def check_name(name: str, flag: str = "--name") -> str:
    """``name`` if it is one plain path component, else a one-line error."""
    bad = not name or name in (".", "..") or name.startswith(("-", ".")) \
        or any(c in _FORBIDDEN or ord(c) < 32 for c in name)
    if bad:
        raise QpeftError(f"{flag} '{name}' is not a plain run name (letters, digits, '-', '_', '+', "
                         "'=' ...; no '/', no leading '.' or '-'); pass e.g. --name nf4-lora-try2, "
                         "and --output-dir to choose where runs go")
    return name


def inside(output_dir, name: str) -> Path:
    """``output_dir/name``, refused unless it resolves inside ``output_dir``."""
    root = Path(output_dir).resolve()
    target = (root / check_name(name)).resolve()
    if target.parent != root:
        raise QpeftError(f"run '{name}' resolves to {target}, outside --output-dir {root}; "
                         "pick a plain --name")
    return Path(output_dir) / name


def disk_error(exc: OSError, what: str) -> QpeftError:
    """An OSError while writing, as one line saying what to do."""
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EACCES: "choose a directory you can write with --output-dir",
            errno.EROFS: "choose a writable directory with --output-dir",
            errno.EPERM: "choose a directory you can write with --output-dir"}.get(exc.errno, "check the path")
    return QpeftError(f"cannot write {what}: {exc.strerror or exc}; {hint}")


class RunLock:
    """An exclusive, advisory lock (``flock``) on one run name under ``output_dir``.

    The lock file lives beside the run directory (``.NAME.lock``), so it survives the
    directory being swapped; it records the holder's PID. The kernel drops the lock when
    the process dies, however it dies. It goes by the directory, not the name: a run
    reached through a symlink (``runs/alias → runs/real``) locks ``runs/.real.lock``.
    """

    def __init__(self, output_dir, name: str):
        self.run = Path(output_dir) / name
        real = self.run.resolve()       # symlinks followed: one lock per directory
        self.path = real.parent / f".{real.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise QpeftError(f"{self.run} is in use by process {holder}; wait for it to "
                                     "finish or stop it, or pick another --name") from None
                if self._same_file(fd):  # not unlinked by a releasing holder meanwhile
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            raise disk_error(exc, f"the lock of {self.run}") from None
        self.fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class Staged:
    """A directory built beside ``target`` and swapped in by :meth:`commit`.

    Until ``commit`` nothing at ``target`` is touched; :meth:`discard` (or leaving the
    ``with`` block on an exception) removes the half-built directory.
    """

    def __init__(self, target):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.new-{os.getpid()}")

    def __enter__(self) -> "Staged":
        try:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise disk_error(exc, str(self.target)) from None
        return self

    def commit(self) -> Path:
        """Swap the built directory in; the replaced one is removed only afterwards."""
        aside = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
        try:
            if self.target.exists():
                os.replace(self.target, aside)
            os.replace(self.path, self.target)
        except OSError as exc:
            if aside.exists() and not self.target.exists():
                os.replace(aside, self.target)
            raise disk_error(exc, str(self.target)) from None
        shutil.rmtree(aside, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            self.discard()


def refuse_overlap(out, protected, what: str) -> None:
    """Refuse writing ``out`` when it is, contains or lies inside ``protected``."""
    o, p = Path(out).resolve(), Path(protected).resolve()
    if o == p or p in o.parents or o in p.parents:
        raise QpeftError(f"--out {out} overlaps {what} {protected}; write the export elsewhere, "
                         f"e.g. --out {Path(protected).name}-export")

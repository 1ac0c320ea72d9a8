"""Writing files safely: atomically, following the umask, and never over what is not ours.

Every file and directory colbertkit writes goes through here:

* :func:`atomic_directory` builds a directory in a temporary sibling and renames it into place;
* :func:`atomic_file` / :func:`atomic_write_text` do the same for one file;
* :func:`follow_umask` gives files the mode the user's umask asks for (safetensors and some
  ``tempfile`` helpers create 0600 files, which other users of a shared disk cannot read);
* :func:`check_replaceable` refuses to replace a directory that holds anything colbertkit did
  not write, so ``--overwrite`` / ``--force`` can only ever remove colbertkit's own files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from colbertkit.errors import UsageError

_umask: int | None = None


def current_umask() -> int:
    """The process's umask (read once: reading it means setting it, which is not thread-safe)."""
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def follow_umask(path: Path) -> None:
    """chmod ``path`` (and everything below a directory) to 0666 / 0777 minus the umask."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        mode = 0o777 if item.is_dir() else 0o666
        with contextlib.suppress(OSError):  # not ours to change (another owner): leave it
            os.chmod(item, mode & ~mask)


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}"


def check_replaceable(target: Path, is_ours: Callable[[str], bool], *, what: str, fix: str) -> None:
    """Raise unless ``target`` is missing, empty, or holds only entries ``is_ours`` accepts.

    ``what`` says what colbertkit writes there ("a training run"), ``fix`` what to do instead.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise UsageError(f"{target} is a file, not {what}; {fix}")
    foreign = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in target.iterdir()
        if not is_ours(entry.name)
    )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(foreign[:3]) + more
        raise UsageError(
            f"{target} holds files colbertkit did not write ({shown}), so it is not replaced; {fix}"
        )


def names_of(allowed: Iterable[str]) -> Callable[[str], bool]:
    """An ``is_ours`` test for :func:`check_replaceable`: one of ``allowed`` or a temporary of
    ours (a hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` left by a crash)."""
    allowed = frozenset(allowed)

    def is_ours(name: str) -> bool:
        if name in allowed:
            return True
        if name.startswith("."):
            base = name[1:].split(".tmp", 1)[0].split(".old-", 1)[0]
            return base in allowed or name.endswith(".tmp")
        return False

    return is_ours


def remove_tree(path: Path) -> None:
    """Remove a directory of ours by renaming it aside first: a crash mid-way never leaves a
    half-deleted directory under its own name."""
    if not path.exists():
        return
    aside = _sibling(path, "old")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_siblings(target: Path) -> None:
    """Remove temporaries of ``target`` that a crashed colbertkit left (``.NAME.tmp-*``)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    On any exception the temporary directory is removed and ``target`` is left as it was. File
    modes follow the umask. The caller decides whether ``target`` may be replaced
    (:func:`check_replaceable`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(target, "old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator[IO]:
    """Write ``target`` through a temporary sibling renamed into place only on success."""
    target = Path(target)
    tmp = _sibling(target, "tmp")
    encoding = None if "b" in mode else "utf-8"
    newline = None if "b" in mode else "\n"
    try:
        with open(tmp, mode, encoding=encoding, newline=newline) as handle:
            yield handle
        follow_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_file(target) as handle:
        handle.write(text)

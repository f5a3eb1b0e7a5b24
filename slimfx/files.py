"""All-or-nothing directory writes, shared by every save (``slimfx.io``, ``forms.mla.save``,
``forms.mla.deepseek``).

A save is written into a fresh temporary directory next to the target (``tmp_dir``), each file
hashed and flushed (``seal``), then swapped in by ``commit``: one atomic directory exchange
where the OS has it (Linux ``renameat2``), else two renames with the old save parked at
``backup(d)`` in between — ``recover(d)`` (called by every load and save) puts it back when an
interruption fell between them. ``clean_stale`` removes what an interrupted save left;
``writable_target`` checks a target before any work. A leaf:
imports nothing from slimfx. Callers use the functions through the module
(``files.fsync(...)``) so that tests can stand in for the disk flush or the exchange.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

__all__ = [
    "sha256", "fsync", "backup", "recover", "exchange", "discard", "commit", "clean_stale",
    "tmp_dir", "writing", "finish", "hashes", "flush", "TMP", "OLD", "target",
    "check_replaceable",
]  # fmt: skip

TMP = ".slimfx-tmp-"
OLD = ".slimfx-old"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def backup(d: Path) -> Path:
    """Where the two-rename commit parks the old ``d``."""
    return d.parent / f".{d.name}{OLD}"


def recover(d: Path) -> None:
    """Put back an old save parked by an interrupted two-rename commit."""
    old = backup(d)
    if not d.exists() and old.is_dir():
        os.replace(old, d)


def exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically (Linux ``renameat2``); False when the OS or
    file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def discard(p: Path) -> None:
    """Remove a directory that no longer matters (the old save, once the new one is in place);
    what an interruption leaves, the next save's ``clean_stale`` removes. A Ctrl-C inside
    ``rmtree`` can surface as an ``OSError`` from its own clean-up (a closed descriptor): the
    ``KeyboardInterrupt`` is raised instead, never the clean-up's error."""
    try:
        shutil.rmtree(p, ignore_errors=True)
    except OSError as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None


def commit(tmp: Path, d: Path) -> None:
    """Make ``tmp`` the directory at ``d``; the old ``d`` (if any) ends up removed."""
    if not d.exists():
        os.rename(tmp, d)
    elif exchange(tmp, d):
        discard(tmp)  # now holds the old save
    else:
        old = backup(d)
        discard(old)
        os.rename(d, old)
        os.rename(tmp, d)  # an interruption between the renames: recover puts old back
        discard(old)
    fsync(d.parent)


def clean_stale(d: Path) -> None:
    """Remove what an interrupted save of ``d`` left behind: temporary directories, and the
    parked old save once ``d`` itself is in place."""
    for p in d.parent.glob(f".{d.name}{TMP}*"):
        shutil.rmtree(p, ignore_errors=True)
    if d.exists():
        shutil.rmtree(backup(d), ignore_errors=True)


def target(directory: str | os.PathLike[str]) -> Path:
    """The directory a save of ``directory`` replaces: absolute, symlinks resolved (a link
    ``proj/model -> /mnt/big/model`` saves into ``/mnt/big/model`` and stays a link)."""
    return Path(os.path.realpath(os.path.expanduser(directory)))


def check_replaceable(d: Path) -> None:
    """Raise ``ValueError`` where a commit could not replace ``d`` (see :func:`target`), before
    anything is computed or written: ``d`` is a mount point (it cannot be renamed), the working
    directory or one holding it (it would be deleted from under the process), or its parent
    cannot be written to."""
    if os.path.ismount(d):
        raise ValueError(
            f"{d} is a mount point: a save replaces its directory, which a mount point cannot "
            "be — save into a folder inside it"
        )
    cwd = Path(os.path.realpath(os.getcwd()))
    if d == cwd or d in cwd.parents:
        raise ValueError(
            f"{d} {'is' if d == cwd else 'holds'} the working directory: a save replaces the "
            "directory, which would delete it from under this process — save into a subfolder"
        )
    parent = d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {parent}: no permission to create {d} there")


def writable_target(
    directory: str | os.PathLike[str], what: str, overwrite: bool,
    ours: Callable[[Path], bool] | None = None, kind: str = "", own: Collection[str] = (),
    cli: bool = True,
) -> Path:
    """The directory ``what`` (a save or export) writes for ``directory`` (:func:`target`), an
    interrupted earlier commit put back (:func:`recover`), checked before any work: a file
    there, or a non-empty directory that is not ``ours`` (``kind`` names what ``ours`` accepts,
    for the message) without ``overwrite``, raise ``FileExistsError`` naming its first files,
    those not in ``own`` (the names ``what`` writes) first; ``cli``: the message names the CLI's
    ``--overwrite`` too. Then :func:`check_replaceable`."""
    d = target(directory)
    recover(d)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is a file; {what} writes a directory")
    if d.is_dir() and any(d.iterdir()) and not overwrite and not (ours is not None and ours(d)):
        names = sorted((p.name for p in d.iterdir()), key=lambda n: (n in own, n))
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        if ours is not None and names[0] in own:
            shown += ": no valid manifest"
        flag = " (CLI --overwrite)" if cli else ""
        raise FileExistsError(f"{d} is a non-empty directory{kind} ({shown}); save elsewhere, "
                              f"or pass overwrite=True{flag} to replace the whole directory")
    check_replaceable(d)
    return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tmp_dir(d: Path) -> Path:
    """A fresh temporary directory next to ``d`` (its parent created), stale ones removed; it
    gets ``d``'s mode where ``d`` exists, else what the umask gives a new directory (not
    ``mkdtemp``'s private 0700: a server running as another user reads the save)."""
    d.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}{TMP}", dir=d.parent))
    mode = (d.stat().st_mode & 0o7777) if d.is_dir() else (0o777 & ~_umask())
    os.chmod(tmp, mode)
    return tmp


def finish(tmp: Path, d: Path, manifest: str, info: dict) -> Path:
    """Close a save written into ``tmp``: ``info["files"]`` = every file's SHA-256, ``info``
    written as the JSON ``manifest``, everything flushed, ``tmp`` committed as ``d``."""
    info["files"] = hashes(tmp)
    (tmp / manifest).write_text(json.dumps(info, indent=1))
    mode = 0o666 & ~_umask()
    for p in tmp.iterdir():  # safetensors writes its file private (0600)
        if p.is_file():
            os.chmod(p, mode)
    flush(tmp)
    commit(tmp, d)
    return d


@contextlib.contextmanager
def writing(d: Path) -> Iterator[Path]:
    """A fresh ``tmp_dir(d)`` to write a save into, removed when the body raises (a Ctrl-C
    too), with the parent directories it created for ``d`` where they are still empty; the
    body ends with ``finish``."""
    made = [q for q in (d.parent, *d.parent.parents) if not q.exists()]  # deepest first
    tmp = tmp_dir(d)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for q in made:
            try:
                q.rmdir()  # only an empty directory: another writer's files stay
            except OSError:
                break
        raise


def hashes(tmp: Path) -> dict[str, str]:
    """SHA-256 of every file in ``tmp`` by name (a manifest's ``files``)."""
    return {p.name: sha256(p) for p in sorted(tmp.iterdir())}


def flush(tmp: Path) -> None:
    """Flush every file of ``tmp`` and the directory itself, before ``commit``."""
    for p in sorted(tmp.iterdir()):
        fsync(p)
    fsync(tmp)



"""Writing a directory of files so that a reader, a failure or a killed process sees the old directory or the new
one, complete, never a mix and never neither.

``write_directory(out_dir, write, overwrite=..., owner_file=...)``: ``write(tmp)`` writes our files into a hidden
directory beside ``out_dir``; whatever else an existing ``out_dir`` holds (a README, training arguments, ...) is
carried over (hard-linked, or copied where links are impossible), every file is fsynced, and the new directory then
takes the old one's place: on Linux in one step (``renameat2(RENAME_EXCHANGE)``), elsewhere by moving the old
directory aside and the new one in. A process killed before that leaves only hidden ``.<name>.tmp-*`` /
``.<name>.old-*`` directories, and in the fallback possibly no ``out_dir`` but its ``.old-`` copy. The next write
to the same ``out_dir`` puts that copy back and removes the leftovers of writers that are no longer running.

Not guarded: another process editing ``out_dir`` while we write (its edits between our copy and our swap are lost).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import uuid
from typing import Callable

_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _path(out_dir) -> str:
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        # "" would be the working directory: too easy to get from an unset variable
        raise ValueError(f"out_dir must be a non-empty path (str or os.PathLike), got {out_dir!r}")
    return os.fspath(out_dir)


def check_out_dir(out_dir, overwrite: bool, owner_file: str) -> None:
    """Refuse (ValueError) an ``out_dir`` that is not a non-empty path, exists without ``overwrite``, is not a
    directory, or is a non-empty directory without ``owner_file`` (not one we wrote: replacing files in it is not
    ours to do)."""
    out_dir = _path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise ValueError(f"output directory {out_dir!r} already exists; pass overwrite=True (--overwrite) "
                         "to replace the files we write there (other files in it are kept)")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ValueError(f"output path {out_dir!r} exists and is not a directory")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, owner_file)):
        raise ValueError(f"refusing to write into {out_dir!r}: it is not empty and not an adapter directory "
                         f"(no {owner_file})")


def write_directory(out_dir, write: Callable[[str], None], *, overwrite: bool, owner_file: str) -> str:
    """Make ``out_dir`` hold what ``write(directory)`` writes, plus what else it held before; returns its absolute
    path. Old or new, complete, whatever happens (see the module doc); leftovers of killed writes are removed."""
    out_dir = os.path.abspath(_path(out_dir))
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _recover(parent, name)
    check_out_dir(out_dir, overwrite, owner_file)
    new = _hidden_path(parent, name, "tmp")
    os.mkdir(new)
    try:
        write(new)
        if os.path.lexists(out_dir):
            _carry_over(out_dir, new)
        _fsync_tree(new)
        _swap_in(new, out_dir)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync(parent)
    return out_dir


def _hidden_path(parent: str, name: str, kind: str) -> str:
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(parent: str, name: str) -> None:
    """Undo what killed writers to ``parent/name`` left: restore the newest old copy if ``name`` is missing, delete
    their hidden directories. Leftovers of writers still running are theirs."""
    prefix = f".{name}."
    dead = {"tmp": [], "old": []}
    for entry in os.listdir(parent):
        match = entry.startswith(prefix) and _LEFTOVER.fullmatch(entry[len(prefix):])
        if match and not _running(int(match["pid"])):
            dead[match["kind"]].append(os.path.join(parent, entry))
    out_dir = os.path.join(parent, name)
    if dead["old"] and not os.path.lexists(out_dir):
        newest = max(dead["old"], key=os.path.getmtime)
        os.replace(newest, out_dir)
        dead["old"].remove(newest)
    for path in dead["tmp"] + dead["old"]:
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str) -> None:
    """Put every entry of ``old`` that ``new`` does not have into ``new``."""
    ours = set(os.listdir(new))
    for entry in sorted(set(os.listdir(old)) - ours):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _fsync(path: str) -> None:
    """Make ``path``'s contents (a file) or entries (a directory) durable, where the platform can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(directory)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one step; False where the platform or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _swap_in(new: str, out_dir: str) -> None:
    if not os.path.lexists(out_dir):
        os.replace(new, out_dir)
        return
    if _exchange(new, out_dir):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old directory
        return
    parent, name = os.path.split(out_dir)
    aside = _hidden_path(parent, name, "old")
    os.replace(out_dir, aside)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)

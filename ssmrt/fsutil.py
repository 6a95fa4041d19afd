"""Writing output directories so that nothing ssmrt did not write is ever touched, and a failure or Ctrl-C
at any point leaves one complete output (the old one or the new one), never a half.

`check_output_dir` decides, before any long work, whether a path may be written and how; `output_directory`
stages the new output in a hidden temporary directory and then puts it in place:

- a new path: the staged directory is renamed to it;
- an existing empty directory: the staged entries move into it, the main file last (the user's directory,
  with its permissions, stays);
- an earlier output of the same kind (only with overwrite=True, and only when every entry in it is one
  ssmrt writes): the staged directory and the old one are exchanged in one atomic rename (Linux's
  renameat2 RENAME_EXCHANGE), then the old one is deleted. Where that is not available, the old directory
  is renamed aside, the new one moved in, then the old one deleted, with the first rename undone if the
  second fails. A mount point cannot be renamed: there the staging happens inside it, and the entries are
  swapped one by one (the old ones aside into a hidden directory, the new ones in, the main file last),
  each move undone in reverse order if a later one fails.

Ctrl-C is held back while the entries are being moved (the moves are renames: quick), and delivered after.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SsmrtError

log = logging.getLogger(__name__)

STAGE_PREFIX = ".ssmrt-new-"
ASIDE_PREFIX = ".ssmrt-old-"


# The filesystem operations a replacement is made of, in one place so that tests can fail any one of them.
class _Ops:
    rmtree = staticmethod(shutil.rmtree)
    rmdir = staticmethod(os.rmdir)

    @staticmethod
    def rename(a: Path, b: Path) -> None:
        """Rename a to b, failing (FileExistsError) rather than replacing anything already at b."""
        _rename_noreplace(a, b)

    @staticmethod
    def exchange(a: Path, b: Path) -> None:
        """Atomically swap the names a and b (both exist). OSError(ENOSYS/EINVAL) where unsupported."""
        _renameat2_exchange(a, b)


_ops = _Ops()


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> None:
    fn = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a), None, str(b))


def _renameat2_exchange(a: Path, b: Path) -> None:
    _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(a: Path, b: Path) -> None:
    """rename(a, b) that never replaces b: atomically where the kernel and filesystem support it, else after a
    check (a narrow window remains there)."""
    try:
        _renameat2(a, b, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    if os.path.lexists(b):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(b))
    os.rename(a, b)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


# ------------------------------------------------------------------------------------------ checking


def user_path(value, what: str = "path") -> Path:
    """`value` as a Path, or SsmrtError naming `what`: not a str or os.PathLike, empty, or holding a NUL byte.
    An empty string is refused rather than taken as "." (Path("") is the current directory): an unset
    variable in a script would otherwise read, or write, wherever the script happens to stand."""
    if isinstance(value, Path):
        text = str(value)
    elif isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
    else:
        raise SsmrtError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    if text == "":
        raise SsmrtError(f"{what} is empty; give a path ('.' for the current directory)")
    if "\0" in text:
        raise SsmrtError(f"{what} {text!r} holds a NUL byte, which no file name can")
    return Path(text)


def make_work_dir(path, what: str) -> Path:
    """A directory ssmrt writes its own, named entries into (the self-test's models): created with its parents
    where missing, refused in one line naming `what` where it is a file, lies under one, or cannot be written."""
    p = user_path(path, what)
    if p.exists() and not p.is_dir():
        raise SsmrtError(f"{p}: {what} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SsmrtError(f"{p}: {what} cannot be created ({e.strerror or e})") from None
    why = _probe_writable(p)
    if why is not None:
        raise SsmrtError(f"{p}: {what} cannot be written ({why})")
    return p


def probe_file_writable(path) -> str | None:
    """None if a file can be created beside `path` (in its directory, which must exist), else why not. A real
    file is created and removed: permission bits say nothing to root, and nothing about a read-only mount."""
    directory = Path(os.path.abspath(path)).parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.ssmrt-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return None


@dataclass(frozen=True)
class OutputPlan:
    """How `output_directory` will write `out`: "create" (a new path), "fill" (an empty directory) or
    "replace" (an earlier output); `in_place` stages inside `out` itself (a mount point, or a directory whose
    parent ssmrt cannot write). The rest is what the check was given, to repeat it before the swap."""

    out: Path
    mode: str
    in_place: bool
    recognise: Callable[[Path, list[str]], str | None]
    overwrite: bool
    what: str
    flag: str


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def is_mount_point(path: Path) -> bool:
    """os.path.ismount, plus bind mounts of a directory on the same filesystem (which it cannot see), from
    /proc/self/mountinfo where there is one."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            points = {_unescape_mountinfo(line.split()[4]) for line in f if len(line.split()) > 4}
    except OSError:
        return False
    return os.path.realpath(path) in points


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _probe_writable(directory: Path) -> str | None:
    """None if a directory can be created and removed in `directory`, else why not (the honest test: access()
    does not see read-only mounts and says yes to root)."""
    try:
        probe = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


# mkdtemp's names: the prefix and eight characters of [a-z0-9_]
_OURS = re.compile(rf"^({re.escape(STAGE_PREFIX)}|{re.escape(ASIDE_PREFIX)})[a-z0-9_]{{8}}$")


def _ours(directory: Path, name: str) -> bool:
    """A staging or set-aside directory an earlier ssmrt run left when it was killed before it could clean up:
    its exact name pattern, a real directory, and regular files only inside (never a user's folder)."""
    path = directory / name
    if not _OURS.match(name) or path.is_symlink() or not path.is_dir():
        return False
    try:
        return all(e.is_file(follow_symlinks=False) for e in os.scandir(path))
    except OSError:
        return False


def _warn_leftovers(out: Path) -> None:
    """Says where a killed earlier run left a staging or set-aside copy beside `out` (ssmrt's own, possibly
    large; never removed without asking)."""
    try:
        found = sorted(p.name for p in out.parent.glob(f".{glob.escape(out.name)}.ssmrt-*-*"))
    except OSError:
        return
    if found:
        log.warning("ssmrt: %s holds copies an interrupted earlier run left (%s); delete them if unneeded",
                    out.parent, ", ".join(found))


def check_output_dir(
    out,
    *,
    recognise: Callable[[Path, list[str]], str | None],
    overwrite: bool = False,
    what: str = "an earlier ssmrt export",
    flag: str = "--overwrite (overwrite=True)",
    _ignore: tuple[str, ...] = (),
) -> OutputPlan:
    """Decides whether `out` may be written, before any long work: raises SsmrtError in one line that names the
    path and what is in the way, else returns the plan for output_directory.

    recognise(out, names) -> None when the entries `names` of an existing directory are an earlier output of
    this kind and nothing else, else what is in the way ("holds 'notes.txt', which ssmrt did not write").
    """
    # absolute, so that "." has a real parent to stage beside
    out = Path(os.path.abspath(user_path(out, "the output directory")))
    keep = dict(recognise=recognise, overwrite=overwrite, what=what, flag=flag)
    try:
        return _check(out, keep, _ignore)
    except OSError as e:  # a path that cannot even be examined (no search permission on a parent, ...)
        raise SsmrtError(f"{out}: cannot be examined ({e.strerror or e})") from None


def _check(out: Path, keep: dict, _ignore: tuple[str, ...]) -> OutputPlan:
    recognise, overwrite, what, flag = keep["recognise"], keep["overwrite"], keep["what"], keep["flag"]
    if out.is_symlink():
        raise SsmrtError(f"{out}: is a symbolic link; give the directory itself (ssmrt does not write through "
                         "links)")
    if not _ignore:  # the first check: later ones see this run's own staging copy
        _warn_leftovers(out)
    if out.exists():
        if not out.is_dir():
            raise SsmrtError(f"{out}: exists and is not a directory; give a new or empty directory")
        try:
            names = sorted(n for n in os.listdir(out) if n not in _ignore and not _ours(out, n))
        except OSError as e:
            raise SsmrtError(f"{out}: cannot be listed ({e.strerror or e})") from None
        if not names:
            mode = "fill"
        else:
            problem = recognise(out, names)
            if problem is not None:
                raise SsmrtError(f"{out}: {problem}; choose a new or empty directory (ssmrt replaces only "
                                 f"{what} with nothing else in it)")
            if not overwrite:
                raise SsmrtError(f"{out}: holds {what}; pass {flag} to replace it")
            mode = "replace"
        in_place = mode == "fill" or is_mount_point(out) or _probe_writable(out.parent) is not None
        why = _probe_writable(out)
        if why is not None:
            raise SsmrtError(f"{out}: cannot be written ({why})")
        return OutputPlan(out, mode, in_place, **keep)
    # a new path: its nearest existing ancestor must be a directory ssmrt can write in
    ancestor = out.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        kind = "a broken symbolic link" if ancestor.is_symlink() else "a file"
        raise SsmrtError(f"{out}: cannot be created: {ancestor} is {kind}, not a directory")
    why = _probe_writable(ancestor)
    if why is not None:
        raise SsmrtError(f"{out}: cannot be created in {ancestor} ({why})")
    return OutputPlan(out, "create", False, **keep)


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Holds Ctrl-C back inside the block and raises KeyboardInterrupt after it (main thread only: signal
    handlers can be set nowhere else, and only the main thread receives SIGINT)."""
    # Only Python's own Ctrl-C handler is replaced: a process that ignores SIGINT, or handles it its own way,
    # keeps what it chose.
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    except BaseException as e:
        signal.signal(signal.SIGINT, previous)
        if caught and not isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from e  # the failure is the cause; the Ctrl-C is not lost
        raise
    signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new hidden directory with the permissions of an ordinary mkdir (mkdtemp makes 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, 0o777 & ~umask())
    return d


def _ordered(names, last: str | None) -> list[str]:
    """Entries in move order: everything else first, `last` (the file that makes the output an output) last."""
    return sorted(names, key=lambda n: (n == last, n))


def _move_all(src: Path, dst: Path, names: list[str], journal: list[tuple[Path, Path]]) -> None:
    for name in names:
        _ops.rename(src / name, dst / name)
        journal.append((src / name, dst / name))


def _undo(journal: list[tuple[Path, Path]]) -> None:
    """Moves every journalled entry back, never over anything; SsmrtError saying where the entries are if that
    fails."""
    for src, dst in reversed(journal):
        try:
            _rename_noreplace(dst, src)
        except OSError as e:
            raise SsmrtError(f"the failed replacement could not be undone ({e.strerror or e} for {src}); the "
                             f"entries not moved back are in {dst.parent}") from None
    journal.clear()


def _clean_up(path: Path) -> None:
    """Removes what ssmrt set aside once the new output is in place; a failure here loses nothing, so it is a
    warning, not an error."""
    try:
        if path.exists():
            _ops.rmtree(path)
    except (OSError, KeyboardInterrupt) as e:
        log.warning("ssmrt: could not remove %s (ssmrt's own temporary copy; delete it): %s", path, e)


@contextmanager
def output_directory(plan: OutputPlan, *, main_file: str | None = None) -> Iterator[Path]:
    """Yields a hidden staging directory to write the new output into; when the block succeeds, puts it in
    place as the module docstring says. On any failure (or Ctrl-C) before that, the staging directory and
    any parent directories this call created are removed and `out` is as it was. The check is repeated just
    before the swap (the directory may have changed during a long write). `main_file` moves in last and
    out first, so a directory holding it is never half an output."""
    out = plan.out
    created: list[Path] = []  # parents this call made, removed again on failure
    if plan.mode == "create":
        missing = []
        p = out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except OSError as e:
                _remove_created(created)
                raise SsmrtError(f"{out}: cannot create {p} ({e.strerror or e})") from None
            created.append(p)
    stage_parent = out if plan.in_place else out.parent
    try:
        stage = _new_dir(stage_parent, STAGE_PREFIX if plan.in_place else f".{out.name}{STAGE_PREFIX}")
    except OSError as e:
        _remove_created(created)
        raise SsmrtError(f"{out}: cannot write a temporary directory in {stage_parent} ({e.strerror or e})"
                         ) from None
    try:
        yield stage
    except BaseException:
        with _sigint_held():
            shutil.rmtree(stage, ignore_errors=True)
            _remove_created(created)
        raise
    with _sigint_held():  # a Ctrl-C from here on is raised once the new output is in place and tidied
        try:
            now = check_output_dir(out, recognise=plan.recognise, overwrite=plan.overwrite, what=plan.what,
                                   flag=plan.flag, _ignore=(stage.name,))
            if (now.mode, now.in_place) != (plan.mode, plan.in_place):
                raise SsmrtError(f"{out}: changed while the output was being written (was to {plan.mode}, now "
                                 f"{now.mode}); nothing was replaced")
            inside = _cwd_inside(out)
            leftover = _commit(plan, stage, main_file)
            if inside:  # the process stood in the directory that was swapped away: stand in the new one
                os.chdir(out)
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            _remove_created(created)
            if isinstance(e, OSError):
                raise SsmrtError(f"{out}: the new output could not be put in place ({e.strerror or e}); "
                                 f"{out} is as it was") from None
            raise
        for path in leftover:
            _clean_up(path)


def _cwd_inside(out: Path) -> bool:
    try:
        cwd = os.getcwd()
    except OSError:
        return False
    return cwd == str(out) or cwd.startswith(str(out) + os.sep)


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def _commit(plan: OutputPlan, stage: Path, main_file: str | None) -> list[Path]:
    """Puts the staged output in place; returns what is left to delete (ssmrt's own, the old output)."""
    out = plan.out
    new = _ordered(os.listdir(stage), main_file)
    if plan.mode == "create":
        _ops.rename(stage, out)  # fails (ENOTEMPTY) rather than replace what appeared there meanwhile
        return []
    if plan.mode == "fill":
        journal: list[tuple[Path, Path]] = []
        try:
            _move_all(stage, out, new, journal)
        except BaseException:
            _undo(journal)
            raise
        return [stage]
    if plan.in_place:
        return _swap_entries(out, stage, new, main_file)
    try:
        _ops.exchange(stage, out)  # now `out` is the new output and `stage` the old one
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return _rename_aside(plan, stage)
        if e.errno in (errno.EBUSY, errno.EXDEV):  # a mount point is_mount_point did not see
            return _swap_from_outside(out, stage, new, main_file)
        raise
    problem = _foreign(plan, stage)
    if problem is not None:  # added to the old output after the last check: put it back, delete nothing
        _renameat2_exchange(stage, out)
        raise SsmrtError(f"{plan.out}: {problem} (added while the new output was being put in place); the old "
                         "output is back as it was")
    return [stage]


def _foreign(plan: OutputPlan, old: Path) -> str | None:
    """What, in the old output now set aside at `old`, ssmrt did not write (None: it may be deleted)."""
    names = sorted(n for n in os.listdir(old) if not _ours(old, n))
    return plan.recognise(old, names) if names else None


def _swap_from_outside(out: Path, stage: Path, new: list[str], main_file: str | None) -> list[Path]:
    """The entry-by-entry swap for an output staged outside a directory that turned out not to be renameable:
    the staged entries are first copied into a staging directory inside it."""
    inner = _new_dir(out, STAGE_PREFIX)
    try:
        for name in new:
            shutil.move(stage / name, inner / name)
        return _swap_entries(out, inner, new, main_file) + [stage]
    except BaseException:
        shutil.rmtree(inner, ignore_errors=True)
        raise


def _rename_aside(plan: OutputPlan, stage: Path) -> list[Path]:
    """Replaces `out` by `stage` without an atomic exchange: the old one aside, the new one in (the first
    rename undone if the second fails). The old one is deleted only if it still holds only ssmrt's files."""
    out = plan.out
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{ASIDE_PREFIX}", dir=out.parent))
    os.rmdir(aside)  # mkdtemp reserved a fresh name; rename() needs it free
    _ops.rename(out, aside)
    try:
        _ops.rename(stage, out)
    except BaseException:
        _undo([(out, aside)])
        raise
    problem = _foreign(plan, aside)
    if problem is not None:
        log.warning("ssmrt: %s: the earlier output, kept at %s: %s (added while the new output was being put in "
                    "place)", out, aside, problem)
        return []
    return [aside]


def _swap_entries(out: Path, stage: Path, new: list[str], main_file: str | None) -> list[Path]:
    """Inside a directory that cannot be renamed (a mount point): the old entries aside (the main file first),
    the new ones in (the main file last), every move undone in reverse if one fails."""
    aside = _new_dir(out, ASIDE_PREFIX)
    old = [n for n in os.listdir(out) if n not in (stage.name, aside.name)]
    old = list(reversed(_ordered(old, main_file)))
    journal: list[tuple[Path, Path]] = []
    try:
        _move_all(out, aside, old, journal)
        _move_all(stage, out, new, journal)
    except BaseException:
        _undo(journal)
        os.rmdir(aside)
        raise
    return [stage, aside]

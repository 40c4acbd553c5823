"""What a command may write, and when: every output of every command goes through this module.

Three rules, each in one place:

- `check_output(path, inputs, force, what)`: a path a command is about to write is refused when it exists
  (unless `force`), and refused even with `force` when it is one of the command's inputs, lies inside one or
  contains one (symlinks resolved). Commands call it after validating their arguments and before any work.
- `replacing(dest)`: the one writer. It yields a temporary path beside `dest` (same suffix, hidden name);
  whatever the caller writes there (a file or a folder) is renamed onto `dest` when the block ends, or
  removed when it raises. An existing `dest` is replaced only with `force` (a folder: moved aside, the new
  one renamed in, then the old one removed). Parent folders it had to create and that stay empty are
  removed again on failure, and so are the temporaries of an earlier writer of `dest` that was killed.
  Nothing else is ever deleted.
- `Lock(path, command)`: one command at a time per run directory / DEST / output. The lock file
  `.<name>.lock` beside the path holds `{pid, host, command, started}` (JSON) and an exclusive `flock`
  (taken atomically by the kernel and released when the process dies, even by SIGKILL). A second command
  refuses in one line naming the holder; a lock file left by a process that is no longer running on this
  host is taken over. Processes started by a command that holds the lock (the `accelerate launch` workers)
  find it in `CVD_LOCKS` and do not take it again.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

HELD_ENV = "CVD_LOCKS"  # lock files held by the process that started this one (os.pathsep-separated)


class GuardError(ValueError):
    """A refused output: exists without --force, or is/inside/contains an input. One line, exit 2."""


class LockedError(GuardError):
    """The path is in use by another command (it holds the lock)."""


# --------------------------------------------------------------------------------------------- paths

def _real(path: str | Path) -> Path:
    """The absolute path with symlinks resolved (for paths that do not exist: as far as they do)."""
    return Path(os.path.abspath(path)).resolve()


def relation(out: str | Path, inp: str | Path) -> str | None:
    """How `out` relates to `inp`: "is", "is inside", "contains" or None (unrelated)."""
    o, i = _real(out), _real(inp)
    if o == i:
        return "is"
    try:
        if o.exists() and i.exists() and os.path.samefile(o, i):
            return "is"
    except OSError:
        pass
    if i in o.parents:
        return "is inside"
    if o in i.parents:
        return "contains"
    return None


def _inputs(inputs: Mapping[str, str | Path | None] | Iterable | None) -> list[tuple[str, str | Path]]:
    if inputs is None:
        return []
    items = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    # an input that does not exist holds nothing to lose (and may be a hub id rather than a local path)
    return [(name, p) for name, p in items if p not in (None, "") and (Path(p).exists() or Path(p).is_symlink())]


def check_inputs(path: str | Path, inputs, what: str) -> None:
    """Refuse `path` (an output) when it is an input, inside one or contains one, whatever `--force` says.

    Args:
        inputs: `{name: path}` or an iterable of paths; None and paths that do not exist are skipped.
        what: how the user named the output (`--out`, `DEST`, `data.path`, ...), for the message.
    Raises:
        GuardError naming both paths.
    """
    for name, inp in _inputs(inputs):
        rel = relation(path, inp)
        if rel is not None:
            label = f"the input {inp}" if str(name) == str(inp) else f"the input {name} ({inp})"
            raise GuardError(f"{what} {path} {rel} {label}; choose another path (--force never writes over an "
                             "input of the command)")


def check_output(path: str | Path, inputs=None, force: bool = False, what: str = "output",
                 exists_ok: bool = False) -> Path:
    """The output rule for `path`: refused when it is, is inside, or contains one of `inputs` (even with
    `force`); refused when it exists, unless `force` or `exists_ok` (a folder a command adds to or resumes).

    Returns:
        `path` as a `Path`.
    Raises:
        GuardError (one line naming the path and the reason).
    """
    path = Path(path)
    check_inputs(path, inputs, what)
    if not (force or exists_ok) and (path.exists() or path.is_symlink()):
        raise GuardError(f"{what} {path} exists; pass --force to replace it")
    return path


def make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of `path`; returns those created (outermost first)."""
    missing = []
    p = Path(os.path.abspath(path)).parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (created by this process) that are still empty, innermost first."""
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            break


def _fresh(dest: Path, tag: str) -> Path:
    """An unused hidden name beside `dest`, keeping its suffix (writers choose formats by suffix)."""
    for n in range(1000):
        p = dest.with_name(f".{tag}-{os.getpid()}{f'-{n}' if n else ''}-{dest.name}")
        if not (p.exists() or p.is_symlink()):
            return p
    raise FileExistsError(f"no free temporary name beside {dest}")


def _clear_stale(dest: Path) -> None:
    """Remove what an earlier writer of `dest` on this host left when it was killed: its temporary
    (`.tmp-<pid>-<name>`) and, once `dest` is back, the old copy it had moved aside (`.old-<pid>-<name>`),
    when process <pid> is no longer running (a live one is writing: left alone)."""
    for tag in ("tmp", "old"):
        for p in dest.parent.glob(f".{tag}-*-{dest.name}"):
            pid = p.name[len(tag) + 2:-len(dest.name) - 1].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and (tag == "tmp" or dest.exists()):
                _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def replacing(dest: str | Path, force: bool = True, what: str | None = None):
    """Yield a temporary path beside `dest`; when the block ends, what was written there replaces `dest`.

    On an exception the temporary is removed and `dest` is untouched. An existing `dest` is replaced only
    with `force` (default: the command's own outputs, whose policy was checked up front by
    `check_output`); without it, `GuardError` (`what` names the output in the message).
    """
    dest = Path(dest)
    created = make_parents(dest)
    _clear_stale(dest)
    tmp = _fresh(dest, "tmp")
    try:
        yield tmp
        if tmp.exists() or tmp.is_symlink():
            commit(tmp, dest, force, what)
    except BaseException:
        _remove(tmp)
        remove_if_empty(created)
        raise


def commit(tmp: Path, dest: Path, force: bool = True, what: str | None = None) -> None:
    """Rename the finished `tmp` onto `dest` (see `replacing`)."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
        return
    if not force:
        raise GuardError(f"{what or 'output'} {dest} exists; pass --force to replace it")
    if (dest.is_dir() and not dest.is_symlink()) or tmp.is_dir():  # rename() cannot replace a folder in one step
        old = _fresh(dest, "old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


def write_text(path: str | Path, text: str, force: bool = True) -> Path:
    """A text file written through `replacing`."""
    with replacing(path, force) as tmp:
        tmp.write_text(text)
    return Path(path)


# --------------------------------------------------------------------------------------------- locks

def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        holder = json.loads(data.decode()) if data else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class Lock:
    """The exclusive lock of one path (a run directory, a DEST, an output), held by this process.

    Use as a context manager, or `acquire()` / `release()`. The lock file is `.<name>.lock` beside the
    path; it is removed on release.
    """

    def __init__(self, path: str | Path, command: str = "", what: str | None = None):
        self.target = Path(path)
        real = Path(os.path.abspath(path))
        self.file = real.parent / f".{real.name}.lock"
        self.command = command
        self.what = what
        self.fd: int | None = None
        self.created: list[Path] = []
        self.took_over: dict | None = None

    def held_by_parent(self) -> bool:
        return str(self.file) in os.environ.get(HELD_ENV, "").split(os.pathsep)

    def env(self, env: dict | None = None) -> dict:
        """`env` (default: this process's) plus this lock, for processes started on its behalf."""
        env = dict(os.environ if env is None else env)
        held = [p for p in env.get(HELD_ENV, "").split(os.pathsep) if p]
        env[HELD_ENV] = os.pathsep.join([*held, str(self.file)])
        return env

    def message(self, holder: dict) -> str:
        if not holder:
            return f"{self.target} is in use by another command (lock file {self.file})"
        line = (f"{self.target} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                f"(command {holder.get('command') or '?'}) since {holder.get('started')}")
        if holder.get("host") != socket.gethostname():
            line += f"; if that run is over, delete {self.file}"
        return line

    def acquire(self) -> "Lock":
        if self.held_by_parent():
            return self
        self.created = make_parents(self.file)
        try:
            while True:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read(fd)
                    os.close(fd)
                    raise LockedError(self.message(holder)) from None
                try:  # the file may have been released (unlinked) between our open and our flock
                    same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                break
            holder = _read(fd)
            if holder:
                here = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                if not here or (isinstance(pid, int) and pid != os.getpid() and _alive(pid)):
                    # a lock written elsewhere (another host) or by a live process that holds it some other way
                    os.close(fd)
                    raise LockedError(self.message(holder))
                self.took_over = holder
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            self.fd = fd
        except BaseException:
            remove_if_empty(self.created)
            raise
        if self.took_over:
            print(f"[lock] {self.target}: took over the lock left by pid {self.took_over.get('pid')} "
                  f"(command {self.took_over.get('command') or '?'}, no longer running)")
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.file).st_ino == os.fstat(self.fd).st_ino:
                self.file.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        remove_if_empty(self.created)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

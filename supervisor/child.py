"""Start the child in its own session, signal it, reap it and everything it left behind."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import stat
import subprocess
import termios
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

PIPE_SIZE_BYTES = 1 << 20  # bigger pipe: fewer, larger reads and fewer stalls of a chatty child
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux: no subreaper, no parent-death signal
    _prctl = None


class SpawnError(Exception):
    """The command could not be started; status is 126 or 127 as timeout(1) uses them."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def become_subreaper() -> bool:
    """Adopt orphaned descendants (double-forked daemons), so they can be found and ended."""
    return _prctl is not None and _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _in_child() -> None:
    # Runs between fork and exec: only async-signal-safe work. If the supervisor is
    # killed outright, the kernel sends the child SIGTERM (SPEC 4).
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def decode_status(wait_status: int) -> tuple[int, int | None]:
    """Turn a waitpid status into (shell-style exit status, signal number or None)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    return os.WEXITSTATUS(wait_status), None


def signal_name(sig: int) -> str:
    """SIGTERM for 15, and so on."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


@dataclass
class Child:
    """A running command: its pid (also its process group and session id) and output fds."""

    pid: int
    fds: dict[str, int]  # stream name ("out", "err") -> our read end, non-blocking
    status: int | None = None  # shell-style, once reaped
    term_signal: int | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)

    def reap(self) -> bool:
        """Collect the exit status if the child has exited; True once it has."""
        if self.status is not None:
            return True
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: keep going rather than hang
            self.status, self.term_signal = 255, None
            return True
        if pid == 0:
            return False
        self.status, self.term_signal = decode_status(wait_status)
        if self._popen is not None:
            self._popen.returncode = self.status  # keeps Popen.__del__ from waiting on it
        return True

    def signal_group(self, sig: int) -> bool:
        """Send sig to the child's process group; False if nobody is left in it."""
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def _raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    # No output post-processing: the child's "\n" must reach us as "\n", not "\r\n".
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def spawn(argv: list[str], env: dict[str, str], use_pty: bool = False) -> Child:
    """Start argv in a new session, stdin from /dev/null; raise SpawnError for 126/127."""
    if use_pty:
        master, slave = _raw_pty()
        out_w = err_w = slave
        read_fds = {"out": master}
    else:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        read_fds = {"out": out_r, "err": err_r}
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=env,
            start_new_session=True,
            preexec_fn=_in_child,
            close_fds=True,
        )
    except FileNotFoundError as e:
        _close_all(read_fds.values())
        raise SpawnError(127, f"cannot run {argv[0]!r}: {e.strerror}") from None
    except PermissionError as e:
        _close_all(read_fds.values())
        raise SpawnError(126, f"cannot run {argv[0]!r}: {e.strerror}") from None
    except OSError as e:
        _close_all(read_fds.values())
        status = 126 if e.errno in (errno.ENOEXEC, errno.EISDIR, errno.EACCES) else 127
        raise SpawnError(status, f"cannot run {argv[0]!r}: {e.strerror or e}") from None
    finally:
        _close_all({out_w, err_w})
    for fd in read_fds.values():
        os.set_blocking(fd, False)
        grow_pipe(fd)
    return Child(pid=popen.pid, fds=read_fds, _popen=popen)


def grow_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB buffer: fewer, larger reads and writes on both sides; anything else is left alone."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE_BYTES)
    except OSError:
        pass  # capped by /proc/sys/fs/pipe-max-size, or not ours to grow: the default works, only slower


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _direct_children() -> set[int] | None:
    """Our own children, zombies included, from /proc/self/task/*/children; None if unreadable."""
    kids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                kids.update(int(pid) for pid in f.read().split())
    except (OSError, ValueError):
        return None
    return kids


def descendants(exclude_roots: set[int] = frozenset()) -> list[psutil.Process]:
    """All live processes below the supervisor, minus alert hooks: the subtrees and sessions of exclude_roots.

    As a subreaper the supervisor inherits what its child's descendants orphan, so
    "below us" also covers grandchildren that escaped with setsid or a double fork.
    """
    kids = _direct_children()
    if kids is not None and kids <= set(exclude_roots):
        return []  # the common answer at exit, without importing psutil or scanning /proc
    import psutil

    try:
        me = psutil.Process()
        procs = me.children(recursive=True)
    except psutil.Error:
        return []
    excluded: set[int] = set()
    for p in procs:
        try:
            # A hook runs in a session of its own; what it leaves behind stays in that session.
            in_hook_session = bool(exclude_roots) and os.getsid(p.pid) in exclude_roots
        except OSError:
            continue
        if in_hook_session:
            excluded.add(p.pid)
        if p.pid in exclude_roots:
            excluded.add(p.pid)
            try:
                excluded.update(c.pid for c in p.children(recursive=True))
            except psutil.Error:
                pass
    live = []
    for p in procs:
        if p.pid in excluded:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        live.append(p)
    return live


def reap_adopted(keep: set[int]) -> None:
    """Reap zombie children we adopted as subreaper, except the pids in keep (waited on elsewhere)."""
    kids = _direct_children()
    if kids is not None and kids <= keep:
        return
    import psutil

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for p in children:
        if p.pid in keep:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def signal_processes(procs: list[psutil.Process], sig: int) -> list[int]:
    """Send sig to each process that is still there; return the pids signalled."""
    import psutil

    sent = []
    for p in procs:
        try:
            p.send_signal(sig)
            sent.append(p.pid)
        except psutil.Error:
            pass
    return sent

"""Start the child in its own session, signal it, reap it and everything it left behind."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import time
import termios
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Callable

from supervisor.output.lines import printable

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

    def exited(self) -> bool:
        """Say whether the child has ended, reaped or not (a zombie is left for reap())."""
        if self.status is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def signal_group(self, sig: int) -> bool:
        """Send sig to the child's process group; False if nobody is left in it, or it may not be ours.

        Only before the child is reaped: until then its pid, and so its group id,
        cannot be given to another process. Once reaped, the number may belong to
        an unrelated group (pid reuse), so what is left is signalled one verified
        process at a time (Tree.send).
        """
        if self.status is not None:
            return False
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
        try:
            popen = _popen(argv, env, out_w, err_w)
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
            # An executable script without a #! line: run it with /bin/sh, as execvp(3) does
            # (and so timeout(1) and env(1)).
            popen = _popen(["/bin/sh", shutil.which(argv[0]) or argv[0], *argv[1:]], env, out_w, err_w)
    except OSError as e:
        _close_all(read_fds.values())
        status = 127 if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG) else 126
        raise SpawnError(status, f"cannot run {printable(argv[0])!r}: {e.strerror or e}") from None
    finally:
        _close_all({out_w, err_w})
    for fd in read_fds.values():
        os.set_blocking(fd, False)
        grow_pipe(fd)
    return Child(pid=popen.pid, fds=read_fds, _popen=popen)


def _popen(argv: list[str], env: dict[str, str], out_w: int, err_w: int) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        env=env,
        start_new_session=True,
        preexec_fn=_in_child,
        close_fds=True,
    )


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


def descendants(is_own: Callable[[int], bool] = lambda pid: False) -> list[psutil.Process]:
    """All live processes below the supervisor except its own (alert hooks, py-spy...) and what they started.

    As a subreaper the supervisor inherits what its child's descendants orphan, so
    "below us" also covers grandchildren that escaped with setsid or a double fork.
    A hook's escapees are re-parented to us too: is_own tells them apart.
    """
    kids = _direct_children()
    if kids is not None and all(is_own(pid) for pid in kids):
        return []  # the common answer at exit, without importing psutil or scanning /proc
    import psutil

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    excluded: set[int] = set()
    for p in procs:
        if p.pid in excluded or not is_own(p.pid):
            continue
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


def reap_adopted(keep: Callable[[int], bool]) -> None:
    """Reap zombie children we adopted as subreaper, except those keep() names (waited on elsewhere)."""
    kids = _direct_children()
    if kids is not None and all(keep(pid) for pid in kids):
        return
    import psutil

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for p in children:
        if keep(p.pid):
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


def sig_caught(pid: int, sig: int) -> bool:
    """Say whether pid has a handler for sig (its bit in SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


class Tree:
    """The child's process tree as the supervisor sees it: list, measure, signal, reap.

    Only processes verified to be still ours are signalled: the group while the
    main child is unreaped, else each process through psutil, which checks its
    start time (a reused pid is not ours).
    """

    def __init__(self, is_own: Callable[[int], bool] = lambda pid: False):
        self.is_own = is_own  # the supervisor's own processes: alert hooks, py-spy, torchfrtrace
        self._cpu_seen: dict[tuple[int, float], tuple[float, float]] = {}  # (pid, start) -> (cpu s, when)

    def processes(self) -> list[psutil.Process]:
        """Everything below us except our own processes (alert hooks, diagnosis helpers)."""
        return descendants(self.is_own)

    def stats(self) -> tuple[float, int]:
        """CPU % and RSS summed over the tree; CPU since the last call, or since a process started."""
        import psutil

        cpu_percent, rss, seen = 0.0, 0, {}
        now = time.time()  # psutil's create_time is wall-clock
        for p in self.processes():
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    rss += p.memory_info().rss
                    key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            used_s = times.user + times.system
            before_s, before_at = self._cpu_seen.get(key, (0.0, key[1]))
            cpu_percent += 100.0 * (used_s - before_s) / max(now - before_at, 1e-3)
            seen[key] = (used_s, now)
        self._cpu_seen = seen
        return cpu_percent, rss

    def send(self, kid: Child, sig: int, target: str) -> str:
        """Signal the child's group, its whole tree, or (USR1/USR2) the processes that catch it; return the target.

        "group" falls back to "tree" once the group is gone or no longer ours.
        "catchers" reaches the ranks torchrun starts in their own sessions without
        killing torchrun or a shell that has no handler; with no catcher, the group.
        """
        if target == "catchers":
            procs = [p for p in self.processes() if sig_caught(p.pid, sig)]
            if procs:
                signal_processes(procs, sig)
                return "catchers"
            target = "group"
        if target == "group" and kid.signal_group(sig):
            return "group"
        kid.signal_group(sig)  # members psutil has not seen yet (only while the group is surely ours)
        signal_processes(self.processes(), sig)
        return "tree"

    def reap_adopted(self, main_pid: int) -> None:
        """Reap zombies we adopted as subreaper (not the main child, nor our own helpers: their owners wait on them)."""
        reap_adopted(lambda pid: pid == main_pid or self.is_own(pid))

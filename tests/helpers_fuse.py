"""A FUSE mount whose daemon never answers: the way to make a path that hangs whoever touches it.

A process opens /dev/fuse, mounts it with mount(2) and never reads the fd: the kernel's
first request (INIT) is never answered, so every stat, open or readdir under the mount
waits, killably, in state D. Ending that process closes the fd, which aborts the
connection: everything waiting gets ENOTCONN. Needs root (or CAP_SYS_ADMIN) and /dev/fuse.
Usage:

    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    with hung_mount() as mnt:
        ...  # os.stat(mnt + "/x") would block here: never touch it from the test itself
    # aborted and detached: the folder is gone
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile

# The daemon that never answers. PR_SET_PDEATHSIG: it dies with the test process, and it ends
# itself after a while anyway, so a test killed midway cannot leave a hung mount behind for long.
_DAEMON = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
fd = os.open("/dev/fuse", os.O_RDWR)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
if libc.mount(b"magvit-hung", sys.argv[1].encode(), b"fuse.magvit-hung", 0, opts) != 0:
    e = ctypes.get_errno()
    print(f"mount failed: {os.strerror(e)}", flush=True)
    sys.exit(1)
print("mounted", flush=True)
time.sleep(float(sys.argv[2]))
"""
MNT_DETACH = 2


def fuse_unavailable() -> str | None:
    """Return why no hung FUSE mount can be made here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "mounting FUSE by hand needs root"
    return None


@contextlib.contextmanager
def hung_mount(max_life_s: float = 300.0):
    """Yield the path of a mount that never answers; abort and detach it whatever happens."""
    mnt = tempfile.mkdtemp(prefix="magvit-hung-")
    daemon = subprocess.Popen([sys.executable, "-c", _DAEMON, mnt, str(max_life_s)], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        line = daemon.stdout.readline().decode().strip()
        if line != "mounted":
            raise RuntimeError(f"cannot mount a FUSE file system at {mnt}: {line or 'the daemon died'}")
        yield mnt
    finally:
        daemon.send_signal(signal.SIGKILL)  # closing /dev/fuse aborts the connection: waiters get ENOTCONN
        daemon.wait()
        _abort_connections_of(mnt)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(mnt.encode(), MNT_DETACH)  # lazily: a process still inside cannot keep it busy
        shutil.rmtree(mnt, ignore_errors=True)


def _abort_connections_of(mnt: str) -> None:
    """Belt and braces: write to /sys/fs/fuse/connections/N/abort for our mount, where fusectl is mounted."""
    try:
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == mnt:
                    dev = fields[2]  # major:minor; N is the minor
        if dev is None:
            return
        with open(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/abort", "w") as f:
            f.write("1")
    except (OSError, IndexError):
        pass

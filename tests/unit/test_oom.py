"""Finding the child's memory cgroup counters (SPEC 4, `oom-killer`): mountinfo and counter files as the kernel writes them."""
from supervisor.forensics.oom import _count, _mounts

# This machine's (cgroup v1 controllers plus an empty v2 hierarchy), and a v2-only systemd host's.
V1 = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
COMBINED = "36 31 0:33 /jobs /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory,memsw\n"


def test_mounts():
    assert _mounts(V1) == ([("/", "/sys/fs/cgroup/unified")], [("/", "/sys/fs/cgroup/memory")])
    assert _mounts(V2) == ([("/", "/sys/fs/cgroup")], [])
    assert _mounts(COMBINED) == ([], [("/jobs", "/sys/fs/cgroup/memory")])


def test_counts():
    assert _count("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3  # v1 memory.oom_control
    assert _count("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n") == 1  # v2 memory.events
    assert _count("") is None and _count("oom_kill x\n") is None

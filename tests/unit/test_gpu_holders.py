"""find_holders against real processes holding a stand-in device file open (no GPU needed)."""
import subprocess

import pytest

from supervisor.forensics.gpu_holders import find_holders


@pytest.fixture
def holding(tmp_path):
    """Start `sleep` with its stdin (and stdout) on the given files; kill them all after the test."""
    procs = []

    def start(*paths):
        files = [open(p, "ab") for p in paths]
        try:
            # Popen returns once sleep runs: its fd 0 (and 1) already point at the files.
            proc = subprocess.Popen(["sleep", "60"], stdin=files[0], stdout=files[-1])
        finally:
            for f in files:
                f.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_process_holding_the_device_is_found_with_its_command(tmp_path, holding):
    device = tmp_path / "nvidia"
    holder = holding(tmp_path / "nvidia0", tmp_path / "nvidiactl")  # two fds: one entry
    holding(tmp_path / "other")  # holds something else
    with open(tmp_path / "nvidia1", "ab"):  # we hold it too, and are never reported
        assert find_holders(set(), device_prefix=str(device)) == [(holder.pid, "sleep 60")]


def test_excluded_pids_are_not_reported(tmp_path, holding):
    first = holding(tmp_path / "nvidia0")
    second = holding(tmp_path / "nvidia-uvm")
    assert find_holders(set(), device_prefix=str(tmp_path / "nvidia")) == sorted(
        [(first.pid, "sleep 60"), (second.pid, "sleep 60")])
    assert find_holders({first.pid}, device_prefix=str(tmp_path / "nvidia")) == [(second.pid, "sleep 60")]


def test_nobody_holding_it_is_an_empty_list(tmp_path, holding):
    holder = holding(tmp_path / "nvidia0")
    holder.kill()
    holder.wait()
    assert find_holders(set(), device_prefix=str(tmp_path / "nvidia")) == []


def test_a_machine_without_the_device_has_no_holders(tmp_path):
    """No /dev/nvidia* at all (a CPU box): the answer is known without scanning /proc."""
    from supervisor.forensics.gpu_holders import find_holders

    assert find_holders(set(), device_prefix=str(tmp_path / "nvidia")) == []


def test_only_the_jobs_lineage_counts(tmp_path):
    """The marker naming this supervisor, or the child's session: nothing else is the job's."""
    from supervisor.forensics.gpu_holders import MARKER, of_lineage

    me = 4242  # the supervisor's pid the marker names
    marked = subprocess.Popen(["sleep", "60"], env={MARKER: str(me)})
    other = subprocess.Popen(["sleep", "60"], env={MARKER: "1"})  # another supervisor's job
    plain = subprocess.Popen(["sleep", "60"], env={}, start_new_session=True)  # a session of its own
    try:
        assert of_lineage(marked.pid, me, set())
        assert not of_lineage(other.pid, me, set())
        assert not of_lineage(plain.pid, me, set())
        assert of_lineage(plain.pid, me, {plain.pid})  # in the child's session (its leader is the child)
    finally:
        for proc in (marked, other, plain):
            proc.kill()
            proc.wait()
    assert not of_lineage(marked.pid, me, {marked.pid})  # gone: nobody's


def test_find_holders_keeps_only_what_keep_accepts(tmp_path, holding):
    first = holding(tmp_path / "nvidia0")
    second = holding(tmp_path / "nvidia1")
    found = find_holders(set(), device_prefix=str(tmp_path / "nvidia"), keep=lambda pid: pid == second.pid)
    assert found == [(second.pid, "sleep 60")] and first.pid != second.pid

"""Two nodes, one supervisor each, on torchrun's own c10d rendezvous (SPEC 11).

Each "node" is a supervisor wrapping `torchrun --nnodes 2` (one CPU rank, gloo), both
watching the shared run folder's PROGRESS-rank*.txt. A hang on one rank stalls the other
rank's collective too, so every supervisor sees the stall, kills its own tree and
restarts; the rendezvous brings the ranks back and they resume from the shared checkpoint.

First on one machine (both agents on 127.0.0.1), then as two hosts: two network
namespaces joined by a veth pair, with a real network fault (the link goes down).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, base_env, kill_tree_of, sup_argv, wait_for

TORCHRUN = Path(sys.executable).with_name("torchrun")
TRAIN_PY = str(ROOT / "trainer" / "train.py")
# Tiny clips, batch 2 per rank, a checkpoint at every epoch end (so a restart resumes at
# k * steps_per_epoch + 1); 24 clips make 20 training clips: 5 steps an epoch on 2 ranks.
TRAIN_ARGS = ["--frames", "4", "--size", "16", "--batch-size", "2", "--log-every-s", "0",
              "--heartbeat-s", "0"]
# Not much less: at the very end, rank 0's test pass and plot and torchrun's teardown leave
# rank 1's file still for ~8 s on a busy machine (a false stall after the job is done).
STALL_TIMEOUT_S = 15
# A stall must be declared within the timeout of the last progress, plus the supervisor's
# polling and a loaded 2-core machine's scheduling.
STALL_SLACK_S = 3
SUP_OPTS = ["--heartbeat", "5", "--stall-timeout", str(STALL_TIMEOUT_S), "--startup-grace", "120",
            "--kill-grace", "3", "--on-stall", "restart", "--restart-on-crash", "--max-restarts", "3"]
# The collective a rank waits in when its peer is gone: DDP's buffer broadcast, the
# gradient all-reduce (the reducer, in native frames), the trainer's stop-flag all-reduce.
COLLECTIVE = re.compile(r"broadcast|all_?reduce|allreduce|all_gather|barrier|Reducer|Work::wait")

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_ts(ts: str) -> float:
    """Unix time of an events/log timestamp (ISO-8601 UTC, ms, 'Z')."""
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class Node:
    """One node: a supervisor (optionally inside a network namespace) over torchrun."""

    def __init__(self, name: str, run: Path, torchrun_argv: list[str], netns: str | None = None,
                 env: dict | None = None):
        self.name, self.run = name, run
        self.log = run / f"supervise-{name}.log"
        self.events_path = run / f"events-{name}.jsonl"
        argv = sup_argv(*SUP_OPTS, "--run-dir", str(run), "--progress-file", str(run / "PROGRESS-rank*.txt"),
                        "--log", str(self.log), "--events", str(self.events_path), child=torchrun_argv)
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.out_path, self.err_path = run / f"{name}.out", run / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=base_env(**(env or {})), cwd=ROOT)

    def events(self, kind: str | None = None) -> list[dict]:
        """The supervisor's events so far (a torn last line is skipped)."""
        found = []
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if kind is None or event["event"] == kind:
                found.append(event)
        return found

    def text(self) -> str:
        """Everything this node printed, stdout then stderr."""
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout_s}s:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_tree_of(self.proc)


def metrics_steps(run: Path) -> list[tuple[int, float]]:
    """(step, time) of every step record in metrics.jsonl, in file order."""
    return [(r["step"], r["time"]) for r in metrics_records(run) if r.get("kind") == "step"]


def steps_per_epoch(run: Path) -> int:
    """Steps in epoch 1, from metrics.jsonl (0 until epoch 1 has a step)."""
    return max((r["step"] for r in metrics_records(run) if r.get("kind") == "step" and r["epoch"] == 1),
               default=0)


def metrics_records(run: Path) -> list[dict]:
    """Every record of metrics.jsonl so far (a torn last line is skipped)."""
    records = []
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def processes_of(run: Path) -> list[str]:
    """Processes still alive whose command line names the run folder."""
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(run) in " ".join(p.info["cmdline"] or []):
                left.append(f"{p.pid} {' '.join(p.info['cmdline'])[:200]}")
        except psutil.Error:
            pass
    return left


def assert_resumed_cleanly(nodes: list[Node], run: Path, epochs: int) -> int:
    """The ranks resumed from the checkpoint and trained on to the end; return the resume step."""
    text = "".join(node.text() for node in nodes)
    resumed = re.findall(r"Resuming from \S+ at step (\d+)", text)
    assert len(resumed) == 1, text[-4000:]  # rank 0 says it, once, on the second launch
    resume_step = int(resumed[0])
    spe = steps_per_epoch(run)
    total_steps = epochs * spe
    assert resume_step > 1 and (resume_step - 1) % spe == 0, (resume_step, spe)
    restart_ts = min(parse_ts(node.events("restart")[0]["ts"]) for node in nodes)
    steps = metrics_steps(run)
    # one clean history: every step once (the resumed run cut off what the lost one logged
    # after the checkpoint), and from the checkpoint's step on, all from the resumed run
    assert [step for step, _ in steps] == list(range(1, total_steps + 1)), steps
    after = [step for step, t in steps if t > restart_ts]
    assert after == list(range(resume_step, total_steps + 1)), (resume_step, after)
    return resume_step


def assert_stall_restart_exit(node: Node, since_ts: float) -> dict:
    """One stall (declared within the timeout of `since_ts`), one restart, exit 0; return the stall."""
    (stall,) = node.events("stall")
    delay_s = parse_ts(stall["ts"]) - since_ts
    assert delay_s <= STALL_TIMEOUT_S + STALL_SLACK_S, (node.name, delay_s, stall)
    assert stall["action"] == "restart"
    assert len(node.events("restart")) == 1
    (exit_event,) = node.events("exit")
    assert (exit_event["status"], exit_event["restarts"]) == (0, 1), exit_event
    return stall


@needs_torchrun
@pytest.mark.heavy
@pytest.mark.timeout(180)
def test_rank_hang_on_one_node_restarts_both_nodes_and_they_resume_from_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    epochs = 3
    hang_step = 7  # in epoch 2 (5 steps an epoch), after the epoch-1 checkpoint: resume at 6
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    try:
        for name in ("node0", "node1"):
            # hang-once: the hang fires the first time step 7 is reached in this run folder
            torchrun = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                        TRAIN_PY, *TRAIN_ARGS, "--samples", "24", "--epochs", str(epochs),
                        "--fault", f"hang-once:{hang_step}:1"]
            nodes.append(Node(name, run, torchrun))
        for node in nodes:
            assert node.wait(timeout_s=160) == 0, node.text()[-4000:]
    finally:
        for node in nodes:
            node.kill()

    # The hang fired on rank 1 (on whichever node the rendezvous gave it) at the step asked.
    hang = re.compile(r"^(\S+) err\| \[fault\] injected hang at step (\d+)", re.M)
    found = [m for node in nodes for m in hang.finditer(node.log.read_text(errors="replace"))]
    assert [int(m.group(2)) for m in found] == [hang_step], found
    hang_ts = parse_ts(found[0].group(1))
    for node in nodes:
        stall = assert_stall_restart_exit(node, since_ts=hang_ts)
        assert "PROGRESS-rank" in stall["source"]
    assert assert_resumed_cleanly(nodes, run, epochs) == 6
    assert processes_of(run) == []
    # Each node's diagnosis names its own rank and where it is (SPEC 4, triage): rank 1 in the
    # injected hang; rank 0 waiting for it in a collective, which points away from its node.
    named = {}
    for node in nodes:
        (diagnosis,) = node.events("diagnosis")
        (group,) = diagnosis["groups"]
        named[tuple(group["ranks"])] = (node, group)
    hung_node, hung = named[(1,)]
    assert hung["frame"].startswith("_injected_hang (") and not hung["collective"], hung
    assert f"rank 1 (pid {hung['pids'][0]}) in _injected_hang (" in hung_node.text()
    waiting_node, waiting = named[(0,)]
    assert waiting["collective"], waiting
    assert re.search(r"rank 0 \(pid \d+\) in a collective: .*outside this node", waiting_node.text())


# ---- two hosts: network namespaces joined by a veth pair ------------------------------

HOST_A, HOST_B = "192.0.2.1", "192.0.2.2"  # TEST-NET-1: our own test hosts, never routed


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists() and not Path("/bin/ip").exists():
        return "iproute2's ip is not installed"
    probe = f"mvs-probe-{os.getpid()}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """Two namespaces A and B, one veth link between them, addresses HOST_A and HOST_B."""

    def __init__(self):
        tag = os.getpid()
        self.ns = (f"mvs-{tag}-a", f"mvs-{tag}-b")
        self.ifname = (f"mv{tag}a", f"mv{tag}b")  # interface names: 15 characters at most

    def __enter__(self) -> "TwoHosts":
        a, b = self.ns
        ia, ib = self.ifname
        try:
            ip("netns", "add", a)
            ip("netns", "add", b)
            ip("link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
            ip("-n", a, "addr", "add", f"{HOST_A}/24", "dev", ia)
            ip("-n", b, "addr", "add", f"{HOST_B}/24", "dev", ib)
            for ns, ifname in zip(self.ns, self.ifname):
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", ifname, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def link(self, up: bool) -> None:
        """Take B's end of the link down (A sees no carrier), or bring it back."""
        ip("-n", self.ns[1], "link", "set", self.ifname[1], "up" if up else "down")

    def __exit__(self, *exc) -> None:
        for ns in self.ns:
            ip("netns", "del", ns, check=False)  # the veth pair goes with its namespace


@needs_torchrun
@pytest.mark.heavy
@pytest.mark.timeout(240)
def test_link_down_between_two_hosts_is_a_stall_on_both_and_the_job_completes_once_it_is_back(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    run = tmp_path / "run"
    run.mkdir()
    # 84 clips: 17 steps an epoch on 2 ranks, so the link can go down between steps,
    # well away from an epoch end's validation and checkpoint (phases that declare a
    # longer deadline of their own, expect_next_s).
    epochs = 4
    nodes = []
    with TwoHosts() as hosts:
        try:
            for i, (addr, is_host) in enumerate(((HOST_A, "true"), (HOST_B, "false"))):
                # Inside namespaces torchrun cannot tell which agent hosts the rendezvous
                # store from host names (both share this machine's): say it. --local-addr
                # and GLOO_SOCKET_IFNAME keep each side on its own end of the link.
                torchrun = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{HOST_A}:29500",
                            "--rdzv-id", "two-hosts", "--rdzv-conf", f"is_host={is_host}",
                            "--local-addr", addr,
                            TRAIN_PY, *TRAIN_ARGS, "--samples", "84", "--epochs", str(epochs)]
                nodes.append(Node(f"host{i}", run, torchrun, netns=hosts.ns[i],
                                  env={"GLOO_SOCKET_IFNAME": hosts.ifname[i]}))
            # Mid-run: past the epoch-1 checkpoint, a few steps into epoch 2.
            def in_epoch_2():
                spe = steps_per_epoch(run)
                return spe and any(step >= spe + 4 for step, _ in metrics_steps(run))
            wait_for(in_epoch_2, timeout_s=120, interval_s=0.01, what="training in epoch 2")
            down_ts = time.time()
            hosts.link(up=False)
            for node in nodes:
                wait_for(lambda: node.events("stall"), timeout_s=STALL_TIMEOUT_S + 30, what=f"{node.name}'s stall")
            # both relaunched: the link comes back while their rendezvous waits
            for node in nodes:
                wait_for(lambda: len(node.events("start")) == 2, timeout_s=60, what=f"{node.name}'s restart")
            hosts.link(up=True)
            for node in nodes:
                assert node.wait(timeout_s=150) == 0, node.text()[-4000:]
        finally:
            for node in nodes:
                node.kill()

    for node in nodes:
        assert_stall_restart_exit(node, since_ts=down_ts)
    assert assert_resumed_cleanly(nodes, run, epochs) > 1
    assert processes_of(run) == []
    # Last, what a person reads first: the diagnosis names the collective each rank waits in.
    for node in nodes:
        (diagnosis,) = node.events("diagnosis")
        # Triage: no rank here is different; a collective the rank waits in points at the network.
        (group,) = diagnosis["groups"]
        if group["collective"]:
            assert re.search(r"rank \d \(pid \d+\) in a collective: .*points at the network", node.text())
        # the rank's own dump, not torchrun's (whose command line also names train.py)
        rank_stacks = "".join(block for block in re.split(r"(?m)^(?=Process \d+: )", diagnosis["stacks"])
                              if "train.py" in block.split("\n", 1)[0] and "torchrun" not in block.split("\n", 1)[0])
        assert rank_stacks, diagnosis["stacks"]
        if not COLLECTIVE.search(rank_stacks):
            if "(libtorch" not in diagnosis["stacks"]:
                pytest.xfail(f"{node.name}: the rank waits in a collective that only native frames name"
                             " (DDP's gradient all-reduce under backward()), and the diagnosis has"
                             " Python frames only (py-spy dump without --native)")
            raise AssertionError(f"{node.name}: no collective named in\n{diagnosis['stacks']}")

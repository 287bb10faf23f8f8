"""collect() against real stand-in ranks (tests/fixtures/fr_rank.py) that speak torch's pipe protocol."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import LineReader
from supervisor.forensics.flight_recorder import collect

RANK = str(Path(__file__).resolve().parent.parent / "fixtures" / "fr_rank.py")
TORCHFRTRACE = Path(sys.executable).parent / "torchfrtrace"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "attempt-0"
    d.mkdir()
    return d


@pytest.fixture
def ranks(folder):
    """Start stand-in ranks: ranks(0, 1, mode="dump"); each is ready (its FIFO open) on return."""
    procs = []

    def start(*numbers, mode="dump"):
        for rank in numbers:
            proc = subprocess.Popen([sys.executable, RANK, f"{folder}/pipe_", f"{folder}/rank_", str(rank), mode],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            procs.append(proc)
            wait_ready(proc)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def wait_ready(proc, timeout_s=15.0):
    """Wait until the stand-in rank says `ready` (its FIFO is open)."""
    LineReader(proc.stdout).wait_for(b"ready", timeout_s)


def collect_in(folder, **kw):
    started = time.monotonic()
    record = collect(f"{folder}/pipe_", f"{folder}/rank_", **kw)
    return record, time.monotonic() - started


@pytest.fixture
def no_torchfrtrace(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def fake_torchfrtrace(monkeypatch, tmp_path, body):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "torchfrtrace"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")


def test_each_rank_dumps_on_its_byte_and_the_dumps_are_named(folder, ranks, no_torchfrtrace):
    ranks(0, 1)
    record, took_s = collect_in(folder, settle_s=10)
    assert took_s < 5  # the dumps settled: no need to wait out settle_s
    assert record.ranks == [0, 1]
    assert record.files == [f"{folder}/rank_0", f"{folder}/rank_1"]
    assert record.pipes == [f"{folder}/pipe_0.pipe", f"{folder}/pipe_1.pipe"]
    assert all(Path(f).stat().st_size > 4096 for f in record.files)  # both pieces, not half a dump
    assert record.lines()[0] == f"flight recorder: 2 rank dumps in {folder}"
    assert record.summary == "" and record.error == ""


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_a_fifo_nobody_reads_is_skipped_at_once(folder, no_torchfrtrace):
    os.mkfifo(folder / "pipe_0.pipe")  # the rank that made it is gone
    record, took_s = collect_in(folder, settle_s=10)
    assert took_s < 1
    assert (record.pipes, record.ranks, record.files) == ([f"{folder}/pipe_0.pipe"], [], [])


def test_what_is_not_a_fifo_is_never_written(folder, ranks, no_torchfrtrace):
    (folder / "pipe_3.pipe").write_bytes(b"precious")
    (folder / "pipe_x.pipe").write_bytes(b"not a rank")
    os.symlink(folder / "pipe_0.pipe", folder / "pipe_4.pipe")  # a link to a live FIFO
    ranks(0)
    record, _ = collect_in(folder, settle_s=10)
    assert record.ranks == [0]
    assert record.pipes == [f"{folder}/pipe_0.pipe"]
    assert (folder / "pipe_3.pipe").read_bytes() == b"precious"
    assert (folder / "pipe_x.pipe").read_bytes() == b"not a rank"


def test_a_dump_that_keeps_growing_is_bounded_by_settle_s(folder, ranks, no_torchfrtrace):
    ranks(0, mode="grow")
    record, took_s = collect_in(folder, settle_s=1.5)
    assert 1.4 < took_s < 4
    assert record.files == [f"{folder}/rank_0"]  # as far as it got


def test_a_rank_that_takes_the_byte_but_never_dumps(folder, ranks, no_torchfrtrace):
    (folder / "rank_0").write_bytes(b"an old dump from an earlier stall")
    ranks(0, mode="deaf")
    ranks(1)
    record, took_s = collect_in(folder, settle_s=1.5)
    assert 1.4 < took_s < 4
    assert record.ranks == [0, 1]
    assert record.files == [f"{folder}/rank_1"]  # the old rank_0 does not pass for an answer
    assert "  asked but no dump from rank 0" in record.lines()


def test_torchfrtrace_runs_on_the_dumps_and_its_summary_is_kept(folder, ranks, monkeypatch, tmp_path):
    argv_file = tmp_path / "argv"
    fake_torchfrtrace(monkeypatch, tmp_path, f"""
        echo "$@" > {argv_file}
        i=1; while [ $i -le 50 ]; do echo "line $i"; i=$((i+1)); done
        exit 2
    """)
    ranks(0)
    record, _ = collect_in(folder, settle_s=10)
    assert argv_file.read_text().split() == [str(folder), "--prefix", "rank_"]
    lines = record.summary.splitlines()
    assert lines == [f"line {i}" for i in range(1, 41)] + ["torchfrtrace: exit status 2"]
    assert record.lines()[-2:] == ["  line 40", "  torchfrtrace: exit status 2"]


def test_a_hanging_torchfrtrace_is_bounded(folder, ranks, monkeypatch, tmp_path):
    fake_torchfrtrace(monkeypatch, tmp_path, """
        echo analysing
        sleep 30 &
        exec sleep 30
    """)
    ranks(0)
    started = time.monotonic()
    record = collect(f"{folder}/pipe_", f"{folder}/rank_", settle_s=10, trace_timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert record.summary.splitlines() == ["analysing", "torchfrtrace: timed out after 0.5s, killed"]


def test_no_torchfrtrace_call_without_dumps(folder, monkeypatch, tmp_path):
    argv_file = tmp_path / "argv"
    fake_torchfrtrace(monkeypatch, tmp_path, f"echo ran > {argv_file}\n")
    record, _ = collect_in(folder)
    assert (record.files, record.summary) == ([], "")
    assert not argv_file.exists()


@pytest.mark.skipif(not TORCHFRTRACE.exists(), reason="torch's torchfrtrace is not installed beside our python")
def test_the_real_torchfrtrace_accepts_our_call(folder, ranks, monkeypatch):
    monkeypatch.setenv("PATH", f"{TORCHFRTRACE.parent}:/usr/bin:/bin")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks(0, 1)
    record, _ = collect_in(folder, settle_s=10, trace_timeout_s=45)
    assert record.files == [f"{folder}/rank_0", f"{folder}/rank_1"]
    assert "exit status" not in record.summary and "timed out" not in record.summary, record.summary

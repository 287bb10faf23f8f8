"""Settings that undo each other, and a file system that never answers (issue 16, items 7, 9, 10, 12, 13).

Each test drives the real supervisor against real processes: a progress file whose
declaration is shorter than the user's limit, processes holding a stand-in GPU device,
two supervisors on one folder, and a FUSE mount whose daemon never answers.
"""
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from helpers import PY, base_env, kill_tree_of, run_sup, start_sup, sup_lines, wait_for


def events_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_traceback(stderr: bytes) -> None:
    assert b"Traceback" not in stderr and b"internal error" not in stderr, stderr[-2000:]


def script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ----- 7. expect_next_s only ever extends the user's limits ---------------------------------------------


def test_a_short_declaration_does_not_cut_the_stall_timeout(tmp_path):
    """`expect_next_s: 1` before a 4 s step under --stall-timeout 20: was STALL at 1 s, killed, 124."""
    job = script(tmp_path, "job.py", """
        import os, time
        path = os.environ["MAGVIT_PROGRESS_FILE"]
        def write(text):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        write("starting\\nexpect_next_s: 1\\n")
        time.sleep(4)
        write("Step 1/1\\n")
        print("done", flush=True)
    """)
    r = run_sup("--progress-file", str(tmp_path / "P.txt"), "--stall-timeout", "20", "--startup-grace", "30",
                "--heartbeat", "0", "--kill-grace", "1", child=[PY, job], cwd=tmp_path, timeout_s=40)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any("STALL" in line for line in sup_lines(r.stderr))
    assert b"done" in r.stdout


# ----- 12. an empty --progress-regex ----------------------------------------------------------------------


def test_an_empty_progress_regex_is_refused_and_an_empty_variable_is_unset(tmp_path):
    r = run_sup("--progress-regex", "", child=["true"], cwd=tmp_path, timeout_s=20)
    assert r.returncode == 125 and r.stdout == b""
    message = r.stderr.decode().strip().splitlines()
    assert len(message) == 1 and "--progress-regex ''" in message[0], message
    # From the environment, empty is unset: the run goes ahead (no progress stall for output).
    r = run_sup("--heartbeat", "0", child=[PY, "-c", "print('hello')"], cwd=tmp_path, timeout_s=20,
                env=base_env(MAGVIT_SUPERVISE_PROGRESS_REGEX="", MAGVIT_SUPERVISE_STALL_TIMEOUT=""))
    assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr[-2000:]

"""The flight recorder's pure parts: the child's variables, the folders, the human lines."""
import os

import pytest

from supervisor.forensics.flight_recorder import FlightRecord, attempt_dir, child_env, prefixes, prepare

FR = "/runs/r1/flight-recorder"


def test_child_env_sets_everything_the_user_did_not():
    assert child_env(FR, 2, {"HOME": "/home/u"}) == {
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_TEMP_FILE": f"{FR}/attempt-2/rank_",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{FR}/attempt-2/rank_",
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": f"{FR}/attempt-2/pipe_",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }


@pytest.mark.parametrize("user,added", [
    # One name set: the twin gets the user's value, whichever torch reads which name.
    ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "500"}, {"TORCH_FR_BUFFER_SIZE": "500"}),
    ({"TORCH_FR_BUFFER_SIZE": "0"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}),
    ({"TORCH_FR_DUMP_TEMP_FILE": "/mine/d_"}, {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/mine/d_"}),
    # Both set: both are the user's.
    ({"TORCH_FR_BUFFER_SIZE": "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2"}, {}),
    # Set empty is set: no pipe, no dump on timeout.
    ({"TORCH_NCCL_DEBUG_INFO_PIPE_FILE": "", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, {}),
])
def test_a_user_set_variable_wins_for_both_names(user, added):
    env = child_env(FR, 0, user)
    assert not set(env) & set(user)
    assert {k: v for k, v in env.items() if k in added} == added
    assert set(env) >= set(added)


def test_child_env_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert child_env("fr", 0, {})["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] == f"{tmp_path}/fr/attempt-0/pipe_"
    assert attempt_dir("fr", 3) == f"{tmp_path}/fr/attempt-3"


def test_prefixes_are_read_as_torch_reads_them():
    env = child_env(FR, 1, {})
    assert prefixes(env) == (f"{FR}/attempt-1/pipe_", f"{FR}/attempt-1/rank_")
    assert prefixes({"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/old/d_", "HOME": "/h"}) == (None, "/old/d_")
    assert prefixes({"HOME": "/h"}) == (None, "/h/.cache/torch/comm_lib_trace_rank_")
    assert prefixes({"XDG_CACHE_HOME": "/c", "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": "/p/x_"}) == (
        "/p/x_", "/c/torch/comm_lib_trace_rank_")


def test_prepare_creates_the_attempt_folder(tmp_path):
    assert prepare(str(tmp_path / "fr"), 4) is None
    assert os.path.isdir(tmp_path / "fr" / "attempt-4")
    assert prepare(str(tmp_path / "fr"), 4) is None  # again: fine


def test_prepare_says_why_it_cannot(tmp_path):
    (tmp_path / "fr").write_text("a file where the folder should be")
    error = prepare(str(tmp_path / "fr"), 0)
    assert error.startswith(f"cannot create {tmp_path}/fr/attempt-0: ")
    assert "\n" not in error


def test_lines_say_how_many_dumps_where_and_what_torchfrtrace_found():
    record = FlightRecord(
        dir="/fr/attempt-0", ranks=[0, 1, 2], files=["/fr/attempt-0/rank_0", "/fr/attempt-0/rank_2"],
        summary="Mismatch on pg 0\nrank 1 is behind", pipes=["p0", "p1", "p2"],
    )
    assert record.lines() == [
        "flight recorder: 2 rank dumps in /fr/attempt-0",
        "  asked but no dump from rank 1",
        "  /fr/attempt-0/rank_0",
        "  /fr/attempt-0/rank_2",
        "torchfrtrace:",
        "  Mismatch on pg 0",
        "  rank 1 is behind",
    ]
    assert record.event_fields() == {
        "dir": "/fr/attempt-0", "ranks": [0, 1, 2], "files": record.files, "summary": record.summary,
        "pipes": ["p0", "p1", "p2"], "error": "",  # beside SPEC 6's four: what the lines need
    }


@pytest.mark.parametrize("pipes,ranks,second", [
    ([], [], "  no rank has a dump FIFO (no NCCL process group, or its variables were changed)"),
    (["p0", "p1"], [], "  2 dump FIFOs, none with a reader"),
])
def test_lines_when_nothing_was_dumped(pipes, ranks, second):
    assert FlightRecord(dir="/d", ranks=ranks, files=[], pipes=pipes).lines() == [
        "flight recorder: 0 rank dumps in /d", second,
    ]

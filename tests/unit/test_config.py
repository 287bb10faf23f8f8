"""Option parsing and validation: every bad value is one clear line naming the option."""
import os

import pytest

from supervisor.config import OPTIONS, ConfigError, parse_config, parse_duration


@pytest.mark.parametrize("text,seconds", [("90", 90), ("1.5", 1.5), ("30s", 30), ("10m", 600), ("2h", 7200),
                                          (".5", 0.5), ("0", 0), (" 5m ", 300)])
def test_durations(text, seconds):
    assert parse_duration("--heartbeat", text, "command line") == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1", "1e3", "inf", "nan", "m", "10 minutes", "1.2.3"])
def test_bad_durations_name_option_value_and_source(text):
    with pytest.raises(ConfigError) as e:
        parse_duration("--kill-grace", text, "MAGVIT_SUPERVISE_KILL_GRACE")
    msg = str(e.value)
    assert "--kill-grace" in msg and repr(text) in msg and "MAGVIT_SUPERVISE_KILL_GRACE" in msg
    assert "\n" not in msg


def test_defaults_follow_the_spec(tmp_path):
    c = parse_config(["--", "python", "train.py"], environ={}, cwd=str(tmp_path))
    assert c.command == ("python", "train.py")
    assert (c.heartbeat_s, c.stall_timeout_s, c.startup_grace_s, c.silence_timeout_s) == (30, 600, 600, 0)
    assert (c.on_stall, c.kill_grace_s, c.max_restarts) == ("kill", 30, 3)
    assert c.progress_file == os.path.join(str(tmp_path), "PROGRESS.txt") and not c.progress_file_explicit
    assert not (c.restart_on_crash or c.timestamps or c.pty or c.stall_auto)


def test_startup_grace_defaults_to_stall_timeout_and_600_with_auto():
    assert parse_config(["--stall-timeout", "2m", "--", "x"], environ={}).startup_grace_s == 120
    auto = parse_config(["--stall-timeout", "auto", "--", "x"], environ={})
    assert auto.stall_auto and auto.startup_grace_s == 600


def test_environment_supplies_options_and_command_line_wins():
    env = {"MAGVIT_SUPERVISE_HEARTBEAT": "5m", "MAGVIT_SUPERVISE_ON_STALL": "warn",
           "MAGVIT_SUPERVISE_TIMESTAMPS": "yes", "MAGVIT_SUPERVISE_KILL_GRACE": "7"}
    c = parse_config(["--kill-grace", "3", "--", "x"], environ=env)
    assert (c.heartbeat_s, c.on_stall, c.timestamps, c.kill_grace_s) == (300, "warn", True, 3)


def test_command_without_double_dash_and_options_after_it_belong_to_the_command():
    c = parse_config(["--heartbeat", "1", "python", "-u", "t.py", "--heartbeat", "9"], environ={})
    assert c.heartbeat_s == 1 and c.command == ("python", "-u", "t.py", "--heartbeat", "9")


@pytest.mark.parametrize("argv,needle", [
    ([], "no command"),
    (["--"], "no command"),
    (["--heartbeat", "soon", "--", "x"], "--heartbeat 'soon'"),
    (["--on-stall", "explode", "--", "x"], "--on-stall 'explode'"),
    (["--max-restarts", "-1", "--", "x"], "--max-restarts '-1'"),
    (["--progress-regex", "(", "--", "x"], "--progress-regex '('"),
    (["--alert-cmd", "'unclosed", "--", "x"], "--alert-cmd"),
    (["--alert-webhook", "ftp://x", "--", "x"], "--alert-webhook 'ftp://x'"),
    (["--bogus", "--", "x"], "--bogus"),
    (["--heartbeat"], "--heartbeat"),
])
def test_bad_command_lines(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(argv, environ={})
    assert needle in str(e.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as e:
        parse_config(["--", "x"], environ={"MAGVIT_SUPERVISE_PTY": "maybe"})
    assert "MAGVIT_SUPERVISE_PTY" in str(e.value) and "'maybe'" in str(e.value)


def test_progress_regex_and_alert_cmd_are_parsed():
    c = parse_config(["--progress-regex", r"Batch \d+", "--alert-cmd", "notify-send 'job alert'", "--", "x"],
                     environ={})
    assert c.progress_regex.search(b"  Batch 12/20") and c.alert_cmd == ("notify-send", "job alert")


@pytest.mark.parametrize("argv,environ,output_progress,on_stall_explicit", [
    ([], {}, True, False),
    (["--output-progress", "off"], {}, False, False),
    ([], {"MAGVIT_SUPERVISE_OUTPUT_PROGRESS": "off"}, False, False),
    (["--output-progress", "on"], {"MAGVIT_SUPERVISE_OUTPUT_PROGRESS": "off"}, True, False),
    (["--on-stall", "kill"], {}, True, True),
    ([], {"MAGVIT_SUPERVISE_ON_STALL": "restart"}, True, True),
])
def test_output_progress_and_whether_on_stall_was_given(argv, environ, output_progress, on_stall_explicit):
    cfg = parse_config([*argv, "--", "x"], environ=environ, cwd="/tmp")
    assert cfg.output_progress is output_progress and cfg.on_stall_explicit is on_stall_explicit


def test_bad_output_progress_names_the_option():
    with pytest.raises(ConfigError, match=r"--output-progress 'maybe' \(from command line\)"):
        parse_config(["--output-progress", "maybe", "--", "x"], environ={}, cwd="/tmp")


@pytest.mark.parametrize("regex", ["x*", "step|", "(?:)", "^"])  # "" is refused as empty, as for every option
def test_a_progress_regex_that_matches_every_line_is_refused(regex):
    # Every line, a heartbeat thread's included, would be progress: no hang could ever be seen.
    with pytest.raises(ConfigError) as e:
        parse_config(["--progress-regex", regex, "--", "x"], environ={})
    assert f"--progress-regex {regex!r} (from command line)" in str(e.value) and "every line" in str(e.value)


@pytest.mark.parametrize("regex", [r"^$", r"Batch \d+", r".+", r"\bstep\b"])
def test_a_progress_regex_that_matches_some_lines_is_kept(regex):
    assert parse_config(["--progress-regex", regex, "--", "x"], environ={}).progress_regex is not None


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_an_empty_environment_value_means_unset(option):
    # As for every shell variable set to nothing: `MAGVIT_SUPERVISE_X= cmd` is no setting.
    assert parse_config(["--", "x"], environ={option.env: ""}, cwd="/w") == parse_config(["--", "x"], environ={},
                                                                                         cwd="/w")


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.metavar is not None],
                         ids=[o.name for o in OPTIONS if o.metavar is not None])
def test_an_empty_value_on_the_command_line_is_refused(option):
    # `--log "$LOG"` or `--ping-url "$HC_URL"` with the variable unset must not quietly turn the feature off.
    with pytest.raises(ConfigError) as e:
        parse_config([f"--{option.name}", "", "--", "x"], environ={}, cwd="/w")
    assert f"--{option.name} '' (from command line)" in str(e.value)


def test_the_run_folder_lock_is_one_per_events_file():
    """SPEC 4 and 11: one supervisor per folder and events file; nodes with their own share the folder."""
    from supervisor.rundir import LOCK_NAME, lock_name

    assert lock_name("/r", None) == lock_name("/r", "/r/events.jsonl") == LOCK_NAME
    assert lock_name("/r", "/r/events-node0.jsonl") == ".supervise-events-node0.jsonl.lock"
    assert lock_name("/r", "/r/nodes/0.jsonl") == ".supervise-nodes_0.jsonl.lock"
    outside = {lock_name("/r", "/a/events.jsonl"), lock_name("/r", "/b/events.jsonl")}
    assert len(outside) == 2 and LOCK_NAME not in outside

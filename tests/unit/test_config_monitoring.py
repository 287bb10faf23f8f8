"""The SLOW and monitoring options (SPEC 1.3, 12): defaults, forms, and one clear line for a bad value."""
import pytest

from supervisor.config import ConfigError, parse_config


def test_defaults_leave_monitoring_off_and_slow_on():
    c = parse_config(["--", "x"], environ={})
    assert (c.slow_window_s, c.slow_ratio) == (600, 0.5)
    assert (c.metrics_addr, c.metrics_file, c.ping_url) == (None, None, None)


@pytest.mark.parametrize("text, addr", [
    ("9400", ("127.0.0.1", 9400)),
    ("0.0.0.0:9400", ("0.0.0.0", 9400)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9400", ("::1", 9400)),
])
def test_metrics_port_forms(text, addr):
    assert parse_config(["--metrics-port", text, "--", "x"], environ={}).metrics_addr == addr


def test_options_from_the_environment(tmp_path):
    env = {"MAGVIT_SUPERVISE_SLOW_WINDOW": "2m", "MAGVIT_SUPERVISE_SLOW_RATIO": "0",
           "MAGVIT_SUPERVISE_METRICS_FILE": "m/job.prom", "MAGVIT_SUPERVISE_PING_URL": "https://hc-ping.com/uuid",
           "MAGVIT_SUPERVISE_METRICS_PORT": ""}
    c = parse_config(["--", "x"], environ=env, cwd=str(tmp_path))
    assert (c.slow_window_s, c.slow_ratio, c.metrics_addr) == (120, 0.0, None)
    assert c.metrics_file == str(tmp_path / "m" / "job.prom") and c.ping_url == "https://hc-ping.com/uuid"


@pytest.mark.parametrize("argv, needle", [
    (["--slow-window", "0"], "--slow-window '0'"),
    (["--slow-ratio", "1"], "--slow-ratio '1'"),
    (["--slow-ratio", "-0.5"], "--slow-ratio '-0.5'"),
    (["--slow-ratio", "half"], "--slow-ratio 'half'"),
    (["--metrics-port", "99999"], "--metrics-port '99999'"),
    (["--metrics-port", "host:"], "--metrics-port 'host:'"),
    (["--metrics-port", ":9400"], "--metrics-port ':9400'"),
    (["--metrics-file", " "], "--metrics-file"),
])
def test_bad_values_name_the_option(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(argv + ["--", "x"], environ={})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_bad_ping_url_is_refused_without_showing_its_secret():
    with pytest.raises(ConfigError) as e:
        parse_config(["--ping-url", "hc-ping.com/9f1b-secret-uuid", "--", "x"], environ={})
    assert "--ping-url" in str(e.value) and "secret" not in str(e.value)

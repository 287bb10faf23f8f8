"""The dead-man's switch against a real HTTP server: order, bounds, one failure per outage, no secret shown."""
import time

import pytest

from helpers import wait_for
from ping_server import PingServer
from supervisor.output.ping import Pinger, ping_url


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    s = PingServer()
    yield s
    s.close()


@pytest.mark.parametrize("url, suffix, sent", [
    ("https://hc-ping.com/uuid", "start", "https://hc-ping.com/uuid/start"),
    ("https://hc-ping.com/uuid/", "fail", "https://hc-ping.com/uuid/fail"),
    ("https://hc-ping.com/uuid?rid=7", "0", "https://hc-ping.com/uuid/0?rid=7"),
    ("https://hc-ping.com/uuid", "", "https://hc-ping.com/uuid"),
])
def test_urls_follow_healthchecks(url, suffix, sent):
    assert ping_url(url, suffix) == sent


def test_pings_arrive_in_order_with_their_bodies(server):
    pinger = Pinger(server.url + "/secret-uuid?rid=1")
    pinger.start()
    pinger.beat()
    pinger.fail("STALL no progress for 10m02s")
    pinger.finish(124, "exit status=124 reason=stall")
    pinger.beat()  # after the end: never sent
    assert pinger.wait(10)
    assert server.requests == [("/secret-uuid/start?rid=1", ""), ("/secret-uuid?rid=1", ""),
                               ("/secret-uuid/fail?rid=1", "STALL no progress for 10m02s"),
                               ("/secret-uuid/124?rid=1", "exit status=124 reason=stall")]
    assert pinger.failures() == []


def test_a_slow_service_has_one_ping_in_flight_and_merged_heartbeats():
    slow = PingServer(delay_s=0.5)
    try:
        pinger = Pinger(slow.url + "/secret-uuid", timeout_s=5)
        pinger.start()
        for _ in range(50):
            pinger.beat()
        pinger.finish(0, "exit status=0")
        assert pinger.wait(15)
        assert slow.most_in_flight == 1
        assert slow.paths() == ["/secret-uuid/start", "/secret-uuid", "/secret-uuid/0"]
        assert pinger.failures() == []
    finally:
        slow.close()


def test_a_ping_is_given_up_at_its_bound_and_a_dead_service_is_one_failure():
    stuck = PingServer(delay_s=30)
    try:
        pinger = Pinger(stuck.url + "/secret-uuid", timeout_s=0.3)
        started = time.monotonic()
        pinger.start()
        pinger.beat()
        pinger.finish(1, "exit status=1")
        assert pinger.wait(10)
        assert time.monotonic() - started < 5  # three pings of at most 0.3 s each, one after the other
        assert stuck.paths() == ["/secret-uuid/start", "/secret-uuid", "/secret-uuid/1"]
        assert pinger.failures() == [("ping", f"{stuck.url}: timed out after 0.3s")]
    finally:
        stuck.close()


def test_one_failure_per_outage(server):
    pinger = Pinger(server.url + "/secret-uuid")
    server.status = 500
    for _ in range(3):
        pinger.beat()
        assert pinger.wait(10)
    server.status = 200
    pinger.beat()
    assert pinger.wait(10)
    server.status = 503
    pinger.beat()
    assert pinger.wait(10)
    failures = pinger.failures()
    assert [error for _, error in failures] == [f"{server.url}: HTTP 500 Internal Server Error",
                                                f"{server.url}: HTTP 503 Service Unavailable"]
    assert len(server.requests) == 5


def test_an_unreachable_service_shows_only_scheme_and_host():
    pinger = Pinger("http://user:pw@127.0.0.1:1/secret-uuid?token=hidden")
    pinger.start()
    assert pinger.wait(15)
    [(hook, error)] = wait_for(pinger.failures, what="the failure")
    assert hook == "ping" and error.startswith("http://127.0.0.1:1: ")
    assert not any(s in error for s in ("secret", "hidden", "user", "pw"))

"""The demo's load test, run short: every request is answered in time and the server's memory stays bounded."""

from __future__ import annotations

import pytest

from mmgen.app.loadtest import MAX_MEMORY_GROWTH, main, run


@pytest.mark.timeout(1800)
def test_a_short_load_run_serves_every_request_and_keeps_the_server_memory_bounded():
    clients, timeout = 4, 120.0
    report = run(clients=clients, seconds=10, model="tiny", timeout=timeout)

    assert report.failures == [], report.summary()
    assert report.served > clients, "every client had at least one answer, besides the first request"
    assert max(report.latencies) < timeout
    assert 0 < report.rss_first and report.memory_growth <= MAX_MEMORY_GROWTH, report.summary()
    assert report.ok
    summary = report.summary()
    for figure in ("requests served", "failures: 0", "latency: max", "after the first request", "at the end"):
        assert figure in summary


def test_bad_settings_are_refused_before_a_server_starts(capsys):
    assert main(["--clients", "0"]) == 2
    assert "clients, seconds and timeout must be positive" in capsys.readouterr().err

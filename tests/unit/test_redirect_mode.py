"""agent/redirect_mode.choose_redirect: BPF, or the iptables fallback with one clear log line."""

from __future__ import annotations

import logging

import pytest

from nodemesh.agent.bpf_loader import BpfUnavailable
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.redirect_mode import choose_redirect

MISSING = "/sys/fs/cgroup/nodemesh-test-no-such-cgroup"


def test_auto_falls_back_to_iptables_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    cfg = AgentConfig(node="n1", cgroup_path=MISSING, proxy_ip="10.244.1.1", redirect="auto")
    with caplog.at_level(logging.WARNING, logger="nodemesh.agent"):
        progs, nat = choose_redirect(cfg)
    assert progs is None and nat is not None and nat.redirect and nat.capture
    lines = [r.getMessage() for r in caplog.records if "redirect mode" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("redirect mode: iptables (BPF unavailable: ")


def test_bpf_mode_refuses_to_fall_back() -> None:
    with pytest.raises(BpfUnavailable):
        choose_redirect(AgentConfig(node="n1", cgroup_path=MISSING, proxy_ip="10.244.1.1", redirect="bpf"))


def test_forced_iptables_never_loads_bpf(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodemesh.agent"):
        progs, nat = choose_redirect(AgentConfig(node="n1", cgroup_path=MISSING, proxy_ip="10.244.1.1", redirect="iptables", capture=False))
    assert progs is None and nat is not None and nat.redirect and not nat.capture
    assert "forced by --redirect=iptables" in caplog.text


def test_no_bpf_redirects_and_captures_nothing() -> None:
    assert choose_redirect(AgentConfig(node="n1", bpf=False)) == (None, None)

"""Parsing the load generators' real outputs (captured from wrk 4.1, h2load 1.52, iperf3 3.12)."""

from __future__ import annotations

import json

import pytest

from nodemesh.bench import parse

WRK = """Running 2s test @ http://127.0.0.1:8080/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    86.97us   67.90us   2.18ms   97.23%
    Req/Sec    97.86k    21.07k  129.63k    66.67%
  Latency Distribution
     50%   81.00us
     75%   97.00us
     90%  123.00us
     99%    1.99ms
  203990 requests in 2.10s, 67.89MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  97135.55
Transfer/sec:     32.33MB
"""

H2LOAD = """starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s of warm-up time and 2s of main duration for measurements.
Application protocol: h2c

finished in 3.00s, 76842.00 req/s, 19.64MB/s
requests: 153684 total, 153684 started, 153680 done, 153670 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 153684 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 39.28MB (41187312) total, 10.64MB (11161300) headers (space savings 50.00%), 42.58MB (44645200) data
                     min         max         mean         sd        +/- sd
time for request:       29us      3.44ms       512us       219us    80.44%
time for connect:        0us         0us         0us         0us     0.00%
"""


@pytest.mark.parametrize("text, us", [("81.00us", 81.0), ("1.99ms", 1990.0), ("2.10s", 2.1e6), ("1m", 60e6)])
def test_durations(text: str, us: float) -> None:
    assert parse.duration_us(text) == pytest.approx(us)


def test_duration_rejects_garbage() -> None:
    with pytest.raises(parse.ParseError, match="not a duration"):
        parse.duration_us("fast")


def test_wrk() -> None:
    r = parse.wrk(WRK)
    assert (r.requests, r.rps, r.errors) == (203990, 97135.55, 10)
    assert (r.p50_us, r.p90_us, r.p99_us) == (81.0, 123.0, 1990.0)
    assert r.duration_s == pytest.approx(2.1) and r.mean_us == pytest.approx(86.97)


def test_wrk_without_latency_flag_says_so() -> None:
    no_dist = "\n".join(l for l in WRK.splitlines() if "%" not in l or "Stdev" in l)
    with pytest.raises(parse.ParseError, match="--latency"):
        parse.wrk(no_dist)


def test_wrk_crash_output_is_quoted() -> None:
    with pytest.raises(parse.ParseError, match="unable to connect"):
        parse.wrk("unable to connect to 10.0.0.1:80 Connection refused\n")


def test_h2load() -> None:
    r = parse.h2load(H2LOAD)
    assert (r.requests, r.rps, r.mean_us, r.p50_us) == (153670, 76842.0, 512.0, None)
    assert r.errors == 10 + 4  # failed + never done


def test_h2load_truncated() -> None:
    with pytest.raises(parse.ParseError, match="h2load output has no"):
        parse.h2load(H2LOAD.split("requests:")[0])


def test_iperf3() -> None:
    doc = {"end": {"sum_received": {"seconds": 2.0, "bits_per_second": 8.5e9}}}
    r = parse.iperf3(json.dumps(doc))
    assert r.throughput_gbps == pytest.approx(8.5) and r.duration_s == 2.0


@pytest.mark.parametrize("text, message", [
    ("not json", "printed no JSON"),
    (json.dumps({"error": "unable to connect to server"}), "unable to connect"),
    (json.dumps({"end": {}}), "no end.sum_received"),
])
def test_iperf3_failures(text: str, message: str) -> None:
    with pytest.raises(parse.ParseError, match=message):
        parse.iperf3(text)

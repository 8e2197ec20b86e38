"""The wrk serving benchmark (bench/wrk.py, bench/serving_wrk.py): Lua generation, output parsing, metrics
arithmetic, goal verdicts, and (with wrk installed) a 2-second smoke run against our fast lane."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import wrk
from bench.servers import DEFAULT_MODEL_NAME, oob_argv
from bench.serving_wrk import ANSWER_FIELDS, answer_breakdown, breakdown, parse_metrics
from bench.serving_wrk_report import render_markdown, summarise, table

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")

SAMPLE = ("Running 2s test @ http://127.0.0.1:8000\n  1 threads and 32 connections\n"
          'WRK_JSON {"duration_us":2000000,"requests":1000,"bytes":250000,"responses":1000,"non2xx":10,'
          '"errors":{"connect":0,"read":1,"write":0,"status":10,"timeout":2},'
          '"field_sums":{"queue_seconds":4.95,"batch_samples":9900},"field_count":990,'
          '"latency_us":{"min":900,"max":90000,"mean":31000.500,"stdev":4000.250,"p50":30000,"p90":40000,'
          '"p99":60000,"p999":80000}}\n')


def test_lua_script_rotates_bodies_and_reports_json(tmp_path: Path):
    bodies, sizes = wrk.write_payload([b"\x89PNG-a", b"\x89PNG-bb", b"c"], tmp_path)
    assert bodies.read_bytes() == b"\x89PNG-a\x89PNG-bbc"
    assert sizes.read_text().split() == ["6", "7", "1"]
    lua = wrk.lua_script(bodies, sizes, "/classify?top_k=1&exits=off")
    assert f'local BODIES = "{bodies}"' in lua and f'local SIZES = "{sizes}"' in lua
    assert 'local PATH = "/classify?top_k=1&exits=off"' in lua and 'local CTYPE = "image/png"' in lua
    for fn in ("function setup(thread)", "function init(args)", "function request()",
               "function response(status, headers, body)", "function done(summary, latency, requests)"):
        assert fn in lua
    assert "status < 200 or status > 299" in lua and wrk.MARK in lua
    assert "{{" not in lua and "}}}" not in lua  # the template's braces were all unescaped
    assert "local FIELDS = {}" in lua  # nothing summed unless asked
    lua = wrk.lua_script(bodies, sizes, "/classify", fields=("queue_seconds", "batch_samples"))
    assert 'local FIELDS = {"queue_seconds", "batch_samples"}' in lua
    with pytest.raises(ValueError):
        wrk.lua_script(bodies, sizes, "/classify", fields=('x"',))
    with pytest.raises(ValueError):
        wrk.lua_script(bodies, sizes, 'classify')  # not a path
    with pytest.raises(ValueError):
        wrk.lua_script(bodies, sizes, '/classify?x="1"')  # would break out of the Lua string


def test_parse_output_reads_the_json_line():
    rep = wrk.parse_output(SAMPLE)
    assert rep["duration_s"] == 2.0 and rep["requests"] == 1000 and rep["non2xx"] == 10
    assert rep["rps"] == 500.0 and rep["ok_rps"] == 495.0
    assert rep["socket_errors"] == 3
    assert rep["latency_seconds"]["p50"] == pytest.approx(0.030)
    assert rep["latency_seconds"]["p99"] == pytest.approx(0.060)
    assert rep["latency_seconds"]["mean"] == pytest.approx(0.0310005)
    assert rep["field_count"] == 990 and rep["field_means"] == pytest.approx({"queue_seconds": 0.005,
                                                                              "batch_samples": 10.0})
    with pytest.raises(ValueError, match="WRK_JSON"):
        wrk.parse_output("Running 2s test\nno json here\n")


def test_wrk_plan_pins_and_refuses_remote_hosts(tmp_path: Path):
    argv = wrk.WrkPlan(1, 2, 3.0, "1").argv("http://127.0.0.1:1", tmp_path / "s.lua")
    assert argv[:3] == ["taskset", "-c", "1"]
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-c", 3) + 1] == "1"  # threads <= connections
    assert "3s" in argv and wrk.WrkPlan(32, 1, 3.0).argv("http://127.0.0.1:1", tmp_path / "s.lua")[0] != "taskset"
    with pytest.raises(ValueError, match="loopback"):
        wrk.run("http://example.com:80", tmp_path / "s.lua", wrk.WrkPlan(1, 1, 1.0))


METRICS_BEFORE = """# TYPE classmeans_request_latency_seconds histogram
classmeans_request_latency_seconds_sum{endpoint="/classify",model="m"} 1.0
classmeans_request_latency_seconds_count{endpoint="/classify",model="m"} 100.0
classmeans_request_latency_seconds_sum{endpoint="/metrics",model="m"} 5.0
classmeans_request_latency_seconds_count{endpoint="/metrics",model="m"} 3.0
# TYPE classmeans_queue_wait_seconds histogram
classmeans_queue_wait_seconds_sum{model="m"} 0.2
classmeans_queue_wait_seconds_count{model="m"} 100.0
# TYPE classmeans_inference_seconds histogram
classmeans_inference_seconds_sum{model="m"} 0.5
classmeans_inference_seconds_count{model="m"} 10.0
# TYPE classmeans_batch_size histogram
classmeans_batch_size_sum{model="m"} 100.0
classmeans_batch_size_count{model="m"} 10.0
# TYPE classmeans_up gauge
classmeans_up{model="m"} 2.0
"""


def test_metrics_breakdown_is_the_difference_of_two_scrapes():
    before = parse_metrics(METRICS_BEFORE)
    assert before["latency_count"] == 100 and before["up"] == 2  # /metrics' own latency is left out
    after = dict(before)
    after.update({"latency_sum": 3.0, "latency_count": 200.0, "queue_sum": 0.7, "queue_count": 200.0,
                  "inference_sum": 1.5, "inference_count": 20.0, "batch_sum": 200.0, "batch_count": 20.0})
    bd = breakdown(before, after, decode_s=0.0001)
    assert bd["requests"] == 100 and bd["request_s"] == pytest.approx(0.02)
    assert bd["queue_s"] == pytest.approx(0.005) and bd["inference_per_batch_s"] == pytest.approx(0.1)
    assert bd["mean_batch_samples"] == pytest.approx(10)
    assert bd["http_and_rest_s"] == pytest.approx(0.02 - 0.005 - 0.1 - 0.0001)
    assert breakdown(before, before, None)["request_s"] is None


def _rec(row: str, clients: int, rps: float, p50: float, non2xx: int = 0) -> dict:
    lat = {"min": p50 / 2, "mean": p50, "p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "p999": p50 * 3,
           "max": p50 * 4}
    return {"row": row, "clients": clients, "pinning": "none", "loadavg_before": [1.0, 1.0, 1.0],
            "loadavg_after": [1.2, 1.0, 1.0], "processes": [{"pid": 1, "rss_mib": 100.0, "cmd": "x"}],
            "rss_mib_total": 100.0, "check": {"non2xx": 0, "accuracy": 0.9, "agreement_with_full_network": 1.0,
                                               "mean_flops_fraction": 1.0},
            "wrk": {"ok_rps": rps, "non2xx": non2xx, "socket_errors": 0, "latency_seconds": lat}}


def _results() -> dict:
    rows = [_rec("litserve", 1, 50, 0.020), _rec("litserve", 32, 200, 0.150),
            _rec("litserve_ort", 1, 100, 0.010), _rec("litserve_ort", 32, 400, 0.080),
            _rec("ours_target", 1, 200, 0.005), _rec("ours_target", 32, 650, 0.050, non2xx=2)]
    return {"rows": rows, "profiles": {"target": "hull-34", "target_basis": "selection", "default": "hull-34",
                                       "bundle": "b"},
            "environment": {"cpu": "x", "cpu_count": 2, "cpu_flags": {"avx512_bf16": True}, "loadavg_start": [1, 1, 1],
                            "loadavg_end": [1, 1, 1]},
            "load_generator": {"version": "wrk 4.1", "language": "C", "threads": 1, "seconds_per_row": 3,
                               "warmup_s": 1, "pinning": {"1 client": "a", "32 clients": "b"}},
            "images": {"source": "s", "png_bytes_mean": 2000.0, "check_images": 10},
            "batching": {"max_batch_size": 32, "batch_wait_s": 0.002}, "quick": True}


def test_goals_are_computed_from_the_rows():
    res = _results()
    rows = {r["row"]: r for r in table(res)}
    assert rows["ours_target"]["p50_c1_vs_litserve"] == pytest.approx(0.25)
    assert rows["ours_target"]["rps_c32_vs_litserve"] == pytest.approx(3.25)
    assert rows["ours_target"]["rps_c32_vs_litserve_ort"] == pytest.approx(1.625)
    assert rows["ours_target"]["non2xx_c32"] == 2
    goals = summarise(res)["goals"]
    assert [g["met"] for g in goals] == [True, True, True]
    res["rows"][4]["wrk"]["latency_seconds"]["p50"] = 0.007  # 0.35x LitServe: not met
    assert [g["met"] for g in summarise(res)["goals"]] == [False, True, True]
    del res["rows"][2:4]  # no ONNX Runtime row: that goal is not measured
    assert summarise(res)["goals"][2]["met"] is None
    res["summary"] = summarise(res)
    md = render_markdown(res)
    assert "**not met**" in md and "not measured" in md and "Quick mode" in md


def test_out_of_the_box_command_is_the_readme_one(tmp_path: Path):
    argv = oob_argv(tmp_path, DEFAULT_MODEL_NAME, 8123)
    assert argv[1:] == ["-m", "service.cli.main", "serve", "--store", str(tmp_path), "--port", "8123"]
    assert oob_argv(tmp_path, "tiny", 1)[-2:] == ["--model", "tiny"]


@pytest.mark.cifar
def test_payload_holds_the_cifar_test_pngs(tmp_path: Path):
    from bench.images import load_images

    images = load_images(20)
    assert images.source.startswith("CIFAR-10")
    bodies, sizes = wrk.write_payload(images.pngs, tmp_path)
    blob, pos = bodies.read_bytes(), 0
    for png, size in zip(images.pngs, map(int, sizes.read_text().split()), strict=True):
        assert blob[pos:pos + size] == png and png.startswith(b"\x89PNG")
        pos += size


@needs_wrk
def test_wrk_smoke_against_our_fast_lane(tiny_store: Path, tmp_path: Path):
    """2 s of wrk (2 clients) against ``classmeans serve`` on the tiny store, then 1 s on an unknown profile
    (404): every answer is counted, the non-2xx ones as such."""
    from bench.images import png_bytes
    from bench.servers import classmeans_server

    rng = np.random.default_rng(0)
    pngs = [png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    bodies, sizes = wrk.write_payload(pngs, tmp_path / "payload")
    ok, bad = tmp_path / "ok.lua", tmp_path / "bad.lua"
    ok.write_text(wrk.lua_script(bodies, sizes, "/classify?top_k=1", fields=ANSWER_FIELDS))
    bad.write_text(wrk.lua_script(bodies, sizes, "/classify?profile=no-such-profile"))
    with classmeans_server(tiny_store, "tiny", tmp_path / "serve.log", ready_timeout_s=120, grace_s=10,
                           torch_threads=1) as srv:
        rep = wrk.run(srv.url, ok, wrk.WrkPlan(2, 1, 2.0, timeout_s=5))
        assert rep["requests"] > 0 and rep["responses"] == rep["requests"]
        assert rep["non2xx"] == 0 and rep["socket_errors"] == 0
        assert 0 < rep["latency_seconds"]["p50"] <= rep["latency_seconds"]["p99"]
        assert rep["field_count"] == rep["responses"]  # every answer carried our timing fields
        ab = answer_breakdown(rep, 0.0)
        assert ab is not None and 0 <= ab["queue_s"] < ab["server_s"] < ab["client_s"]
        assert ab["mean_batch_samples"] >= 1
        rep = wrk.run(srv.url, bad, wrk.WrkPlan(1, 1, 1.0, timeout_s=5))
        assert rep["requests"] > 0 and rep["non2xx"] == rep["responses"] and rep["ok_rps"] == 0
    json.dumps(rep)  # the report is plain JSON

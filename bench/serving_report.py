"""Turn the raw benchmark results into the summary table, the target verdicts, PNG plots and Markdown.

Everything here reads the JSON that ``bench/serving.py`` measured; nothing is typed by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOLERANCE_POINTS = 0.005  # "within 0.5 points of full accuracy"


# -- choosing the profile the targets are about ------------------------------------------------------------

def test_curve(listing: dict[str, Any], results_json: dict[str, Any] | None) -> dict[str, Any] | None:
    """The test-set curve of the served bundle from ``docs/results.json`` (None if it has none)."""
    if not results_json:
        return None
    for entry in (results_json.get("test") or {}).values():
        if entry.get("bundle") == listing.get("bundle"):
            return entry
    return None


def target_profile(listing: dict[str, Any], results_json: dict[str, Any] | None) -> tuple[str, str]:
    """(name, basis): the cheapest profile within 0.5 points of the full network's accuracy, judged on the
    10,000 test images (``docs/results.json``) when available, else on the held-out selection split."""
    curve = test_curve(listing, results_json)
    names = {p["name"] for p in listing["profiles"]}
    if curve is not None:
        full = float(curve["full_network_accuracy"])
        ok = [c for c in curve["curve"] if c["name"] in names and c["accuracy"] >= full - TOLERANCE_POINTS]
        if ok:
            return min(ok, key=lambda c: c["flops_fraction"])["name"], "test set (docs/results.json)"
    rows = listing["profiles"]
    full = next((p["accuracy"] for p in rows if p["name"] == "full"), max(p["accuracy"] for p in rows))
    ok = [p for p in rows if p["accuracy"] >= full - TOLERANCE_POINTS]
    return min(ok, key=lambda p: p["flops_fraction"])["name"], "held-out selection split (profiles.json)"


# -- the table ---------------------------------------------------------------------------------------------

def _lat(rep: dict[str, Any], q: str) -> float | None:
    return rep["latency_seconds"][q]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _server_row(name: str, kind: str, c1: dict[str, Any], c32: dict[str, Any]) -> dict[str, Any]:
    errors = sum(r["counts"]["sent"] - r["counts"]["ok_2xx"] for r in (c1, c32))
    return {"config": name, "kind": kind, "rps_c1": c1["ok_rps"], "rps_c32": c32["ok_rps"],
            "p50_c1": _lat(c1, "p50"), "p90_c1": _lat(c1, "p90"), "p99_c1": _lat(c1, "p99"),
            "p50_c32": _lat(c32, "p50"), "p90_c32": _lat(c32, "p90"), "p99_c32": _lat(c32, "p99"),
            "accuracy": c32["early_exit"]["accuracy"], "accuracy_c1": c1["early_exit"]["accuracy"],
            "flops_fraction": c32["early_exit"]["mean_flops_fraction"],
            "flops_fraction_c1": c1["early_exit"]["mean_flops_fraction"],
            "compute_p50_c1": c1["server"]["compute_p50"], "mean_batch_c32": c32["server"]["mean_batch_samples"],
            "errors": errors, "mixed_state": c1["swap"]["mixed_state_responses"] + c32["swap"]["mixed_state_responses"]}


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration, with the ratios to plain PyTorch and to LitServe."""
    pl = results["plain"]
    b1, b32 = pl["plain_batch1"], pl["plain_batch32"]
    rows = [{"config": "plain PyTorch", "kind": "reference", "rps_c1": b1["images_per_second"],
             "rps_c32": b32["images_per_second"], "p50_c1": b1["latency_per_call_seconds"]["p50"],
             "p90_c1": b1["latency_per_call_seconds"]["p90"], "p99_c1": b1["latency_per_call_seconds"]["p99"],
             "p50_c32": b32["latency_per_call_seconds"]["p50"], "p90_c32": b32["latency_per_call_seconds"]["p90"],
             "p99_c32": b32["latency_per_call_seconds"]["p99"], "accuracy": b32["accuracy"],
             "accuracy_c1": b1["accuracy"], "flops_fraction": 1.0, "errors": 0, "mixed_state": 0}]
    lit = results.get("litserve")
    if lit:
        rows.append(_server_row("LitServe", "litserve", lit["c1"], lit["c32"]))
    for name, cfg in results["classmeans"]["configs"].items():
        rows.append(_server_row(f"ours: {name}",
                                "exits_off" if cfg["profile"] is None else "profile", cfg["c1"], cfg["c32"]))
    lit_row = next((r for r in rows if r["kind"] == "litserve"), None)
    for r in rows:
        r["ratio_rps_c1_vs_plain"] = _ratio(r["rps_c1"], b1["images_per_second"])
        r["ratio_rps_c32_vs_plain"] = _ratio(r["rps_c32"], b32["images_per_second"])
        r["ratio_rps_c32_vs_litserve"] = _ratio(r["rps_c32"], lit_row["rps_c32"]) if lit_row else None
        r["ratio_rps_c1_vs_litserve"] = _ratio(r["rps_c1"], lit_row["rps_c1"]) if lit_row else None
        r["ratio_p50_c1_vs_litserve"] = _ratio(r["p50_c1"], lit_row["p50_c1"]) if lit_row else None
        r["ratio_p50_c32_vs_litserve"] = _ratio(r["p50_c32"], lit_row["p50_c32"]) if lit_row else None
    return rows


# -- targets -----------------------------------------------------------------------------------------------

def _verdict(name: str, value: float | None, op: str, bar: float, detail: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= bar if op == ">=" else value <= bar)
    return {"target": name, "value": value, "op": op, "bar": bar, "met": met, "detail": detail}


def summarise(results: dict[str, Any], results_json: dict[str, Any] | None) -> dict[str, Any]:
    rows = table(results)
    cm = results["classmeans"]
    name, basis = target_profile(cm["profiles"], results_json)
    by = {r["config"]: r for r in rows}
    tgt, off = by.get(f"ours: {name}"), by["ours: exits off"]
    lit = by.get("LitServe")
    runner = results["plain"]["runner"]["profiles"]
    verdicts = []
    if tgt is not None:
        if lit is not None:
            verdicts.append(_verdict(f"profile {name}: throughput at 32 clients vs LitServe",
                                     tgt["ratio_rps_c32_vs_litserve"], ">=", 2.0))
            verdicts.append(_verdict(f"profile {name}: p50 at 1 client vs LitServe",
                                     tgt["ratio_p50_c1_vs_litserve"], "<=", 0.5))
            verdicts.append(_verdict("exits off: throughput at 32 clients vs LitServe",
                                     off["ratio_rps_c32_vs_litserve"], ">=", 1.0))
            verdicts.append(_verdict("exits off: p50 at 1 client vs LitServe",
                                     off["ratio_p50_c1_vs_litserve"], "<=", 1.0))
        flops_speedup = 1.0 / tgt["flops_fraction_c1"] if tgt["flops_fraction_c1"] else None
        e2e = _ratio(off["p50_c1"], tgt["p50_c1"])
        verdicts.append(_verdict(f"profile {name}: batch-1 latency speedup / FLOPs speedup (end to end, p50)",
                                 _ratio(e2e, flops_speedup), ">=", 0.9,
                                 f"latency speedup {e2e:.2f}x, FLOPs speedup {flops_speedup:.2f}x"
                                 if e2e and flops_speedup else ""))
        srv = _ratio(off["compute_p50_c1"], tgt["compute_p50_c1"])
        verdicts.append(_verdict(f"profile {name}: batch-1 compute speedup / FLOPs speedup (server inference p50)",
                                 _ratio(srv, flops_speedup), ">=", 0.9,
                                 f"compute speedup {srv:.2f}x" if srv else ""))
        if name in runner and "full" in runner:
            r_full, r_t = runner["full"]["batch1"], runner[name]["batch1"]
            sp = _ratio(r_full["seconds"], r_t["seconds"])
            fs = 1.0 / r_t["mean_flops_fraction"]
            verdicts.append(_verdict(f"profile {name}: batch-1 runner speedup / FLOPs speedup (in process)",
                                     _ratio(sp, fs), ">=", 0.9, f"runner speedup {sp:.2f}x, FLOPs {fs:.2f}x"
                                     if sp else ""))
        verdicts.append(_verdict(f"profile {name}: accuracy of the answers minus exits-off accuracy (points)",
                                 100 * (tgt["accuracy"] - off["accuracy"])
                                 if tgt["accuracy"] is not None and off["accuracy"] is not None else None,
                                 ">=", -0.5, "same images, paired"))
    return {"rows": rows, "target_profile": name, "target_basis": basis, "targets": verdicts,
            "errors_total": sum(r["errors"] for r in rows), "mixed_state_total": sum(r["mixed_state"] for r in rows)}


# -- plots -------------------------------------------------------------------------------------------------

def render_plots(results: dict[str, Any], img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]["rows"] if "summary" in results else table(results)
    servers = [r for r in rows if r["kind"] != "reference"]
    labels = [r["config"].replace("ours: ", "") for r in servers]
    colours = ["#888888" if r["kind"] == "litserve" else "#d62728" if r["kind"] == "exits_off" else "#1f77b4"
               for r in servers]
    plain = rows[0]

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, title, ref in ((axes[0], "rps_c1", "1 client", plain["rps_c1"]),
                                (axes[1], "rps_c32", "32 clients", plain["rps_c32"])):
        ax.bar(range(len(servers)), [r[key] or 0 for r in servers], color=colours)
        ax.axhline(ref, color="black", ls="--", lw=1,
                   label=f"plain PyTorch batch {'1' if key == 'rps_c1' else '32'}: {ref:.0f} images/s")
        ax.set_xticks(range(len(servers)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("requests/s (one image each)")
        ax.set_title(f"throughput, {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "bench_throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, c in ((axes[0], "c1"), (axes[1], "c32")):
        x = range(len(servers))
        for q, mark in (("p50", "o"), ("p90", "^"), ("p99", "v")):
            ax.plot(x, [1000 * (r[f"{q}_{c}"] or 0) for r in servers], mark, label=q)
        ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"client latency, {'1 client' if c == 'c1' else '32 clients'}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "bench_latency.png", dpi=110)
    plt.close(fig)

    prof = [r for r in servers if r["kind"] in ("profile", "exits_off") and r["flops_fraction"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot([r["flops_fraction"] for r in prof], [r["rps_c32"] for r in prof], "o", label="ours, 32 clients")
    ax.plot([r["flops_fraction"] for r in prof], [r["rps_c1"] for r in prof], "s", label="ours, 1 client")
    lit = next((r for r in servers if r["kind"] == "litserve"), None)
    if lit:
        ax.axhline(lit["rps_c32"], color="#888888", ls="--", label="LitServe, 32 clients")
        ax.axhline(lit["rps_c1"], color="#888888", ls=":", label="LitServe, 1 client")
    ax.set_xlabel("mean FLOPs fraction of the answers")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot([r["flops_fraction"] for r in prof], [100 * (r["accuracy"] or 0) for r in prof], "x", color="green",
             label="accuracy (right)")
    ax2.set_ylabel("accuracy of the answers (%)", color="green")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("throughput and accuracy vs FLOPs per profile")
    fig.tight_layout()
    fig.savefig(img_dir / "bench_tradeoff.png", dpi=110)
    plt.close(fig)


# -- what limits it ----------------------------------------------------------------------------------------

def limits_text(results: dict[str, Any]) -> list[str]:
    """Bullet points computed from the measurements: the physical ceilings the targets meet."""
    s = results["summary"]
    by = {r["config"]: r for r in s["rows"]}
    name = s["target_profile"]
    tgt, off, lit, plain = by.get(f"ours: {name}"), by.get("ours: exits off"), by.get("LitServe"), by["plain PyTorch"]
    runner = results["plain"]["runner"]["profiles"]
    out = []
    if lit and tgt:
        bar = 2 * lit["rps_c32"]
        r32 = runner.get(name, {}).get("batch32", {}).get("images_per_second")
        out.append(f"- Throughput bar: 2 × LitServe = {bar:.0f} requests/s. Plain PyTorch computes "
                   f"{plain['rps_c32']:.0f} images/s at batch 32 on one core; the exit runner alone, at profile "
                   f"{name} (FLOPs fraction {tgt['flops_fraction']:.3f}), computes "
                   f"{_f(r32, '{:.0f}')} images/s at batch 32 with no HTTP, decoding or batching around it. "
                   + ("The bar is above that compute-only ceiling, so no serving stack reaches it on this "
                      "core count." if r32 and bar > r32 else
                      "The bar is below that ceiling: the gap is serving overhead (HTTP, decoding, batching) "
                      "sharing two cores with the compute, and the load generator."))
        half = 0.5 * lit["p50_c1"]
        out.append(f"- Latency bar: 0.5 × LitServe's 1-client p50 = {1000 * half:.1f} ms. One plain forward at "
                   f"batch 1 takes {1000 * plain['p50_c1']:.1f} ms (p50) here; the target profile's answers at 1 "
                   f"client took {_ms(tgt['p50_c1'])} ms end to end, of which the server's inference "
                   f"{_ms(tgt['compute_p50_c1'])} ms.")
    if off and lit:
        out.append(f"- Exits off vs LitServe at 32 clients: {off['rps_c32']:.0f} vs {lit['rps_c32']:.0f} requests/s. "
                   "LitServe runs the model in a separate worker process, so its HTTP process and its inference "
                   "process use the two cores in parallel; our server is one process (one uvicorn worker by "
                   "design: admin swaps live in process memory), where the event loop and the inference thread "
                   "share one interpreter lock.")
    b1 = results["plain"].get("batch1_costs")
    if b1 and name in b1["profiles"]:
        row = b1["profiles"][name]
        heads = [h for h in b1["head_us"] if h is not None]
        out.append(f"- Batch 1: the stages cost {min(b1['stage_us']):.0f}-{max(b1['stage_us']):.0f} µs of CPU "
                   f"each, a class-means head {min(heads):.0f}-{max(heads):.0f} µs (≈ 10 small tensor "
                   "operations: its FLOPs are negligible, its per-operation overhead is not). At profile "
                   f"{name} a sample consults {row['heads_consulted_mean']:.1f} heads on average. Its exit "
                   f"distribution predicts a stage-time speedup of {row['stage_time_speedup_if_heads_were_free']:.2f}× "
                   f"if heads were free and {row['predicted_speedup_with_heads']:.2f}× with them, against a FLOPs "
                   f"speedup of {row['flops_speedup']:.2f}× (later stages are cheaper per FLOP at batch 1, so "
                   "exits there save less time than FLOPs).")
    r = by.get(f"ours: {name}")
    spy = results["classmeans"].get("py_spy") or {}
    if spy.get("regions") and r:
        reg = spy["regions"]
        out.append("- py-spy at 32 clients (server threads, non-idle samples): "
                   + ", ".join(f"{k} {100 * v:.0f} %" for k, v in reg.items()) + ".")
    res = results["classmeans"]["configs"].get(name, {}).get("c32", {}).get("resources", {})
    if res:
        out.append(f"- CPU at 32 clients: server {_f(res.get('server_cpu_percent'), '{:.0f}')} %, load generator "
                   f"{_f(res.get('client_cpu_percent'), '{:.0f}')} % (100 % = one core; 2 cores in all). Load "
                   f"average at the start and end of the run: {results['environment'].get('loadavg_start')} / "
                   f"{results['environment'].get('loadavg_end')}.")
    return out


# -- Markdown ----------------------------------------------------------------------------------------------

def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ms(x: float | None) -> str:
    return _f(None if x is None else 1000 * x, "{:.1f}")


def _pct(x: float | None) -> str:
    return _f(None if x is None else 100 * x, "{:.2f}")


def render_markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    env = results["environment"]
    plan = results["plan"]
    cm = results["classmeans"]
    lines = [
        "# Serving benchmark",
        "",
        "Generated by `python -m bench.serving` (this file, `docs/benchmarks.json` and `docs/img/bench_*.png`); "
        "do not edit by hand.",
        "",
        f"One run on one machine: {env['cpu']}, {env['cpu_count']} cores, {env['ram_gib']} GiB; torch threads "
        f"{env['torch_threads_used']} for every server and for the reference; git `{(env['git_sha'] or '?')[:10]}`"
        f"{' (uncommitted changes)' if env['git_dirty'] else ''}; {env['date']}; load average at the start "
        f"and end {env.get('loadavg_start')} / {env.get('loadavg_end')} (other work was running on the machine "
        "when it is above 1). The load generator (`bench/loadgen.py`: asyncio with a minimal HTTP/1.1 "
        "keep-alive client, one connection per client; httpx cost about a core by itself at 32 clients) runs on "
        "the same cores, over 127.0.0.1.",
        f"Payload: {results['images']['source']}, PNG-encoded in memory (mean "
        f"{results['images']['png_bytes_mean']:.0f} bytes), one image per request; every answer is checked "
        f"against its label. {plan['rounds']} interleaved rounds (LitServe started and stopped in each; ours "
        "with exits off and at each profile, order rotated), each with a warm-up excluded "
        f"({plan['warmup_c1']} / {plan['warmup_c32']} requests), then {plan['requests_c1']} requests from 1 "
        f"client and {plan['requests_c32']} from 32 clients, on other images each round. Throughput is the "
        "median round; latency percentiles, accuracy and FLOPs are pooled over all rounds. The reference "
        "row is the best of 3 passes in process.",
        f"Batching: both servers max batch 32 with a {cm['settings']['max_delay_ms']} ms wait. LitServe gets "
        "its documented image request (JSON with a base64 PNG), ours a raw `image/png` body.",
        "",
        "## Results",
        "",
        "Throughput in requests/s (= images/s; the reference row is images/s at batch 1 and batch 32). "
        "Latency in ms (client side; reference: one forward call). Accuracy and FLOPs fraction of the "
        "32-client answers.",
        "",
        "| configuration | req/s 1 client | req/s 32 clients | p50 / p90 / p99 1 client | "
        "p50 / p90 / p99 32 clients | accuracy % | FLOPs fraction | ×plain (1 / 32) | ×LitServe req/s 32 | "
        "×LitServe p50 1 client | non-2xx |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        mark = " **(target profile)**" if r["config"] == f"ours: {s['target_profile']}" else ""
        lines.append(
            f"| {r['config']}{mark} | {_f(r['rps_c1'])} | {_f(r['rps_c32'])} | "
            f"{_ms(r['p50_c1'])} / {_ms(r['p90_c1'])} / {_ms(r['p99_c1'])} | "
            f"{_ms(r['p50_c32'])} / {_ms(r['p90_c32'])} / {_ms(r['p99_c32'])} | {_pct(r['accuracy'])} | "
            f"{_f(r['flops_fraction'], '{:.3f}')} | {_f(r['ratio_rps_c1_vs_plain'], '{:.2f}')} / "
            f"{_f(r['ratio_rps_c32_vs_plain'], '{:.2f}')} | {_f(r['ratio_rps_c32_vs_litserve'], '{:.2f}')} | "
            f"{_f(r['ratio_p50_c1_vs_litserve'], '{:.2f}')} | {r['errors']} |")
    lines += [
        "",
        f"Non-2xx answers in all runs: {s['errors_total']}; responses whose headers, body and per-sample "
        f"profile disagreed: {s['mixed_state_total']}.",
        "",
        "![throughput](img/bench_throughput.png)",
        "",
        "![latency](img/bench_latency.png)",
        "",
        "![trade-off](img/bench_tradeoff.png)",
        "",
        "## Targets",
        "",
        f"Target profile: **{s['target_profile']}**, the cheapest profile within 0.5 points of the full "
        f"network's accuracy on the {s['target_basis']}.",
        "",
        "| target | measured | bar | met |",
        "|---|---|---|---|",
    ]
    for v in s["targets"]:
        met = "n/a" if v["met"] is None else ("**yes**" if v["met"] else "**no**")
        detail = f" ({v['detail']})" if v["detail"] else ""
        lines.append(f"| {v['target']} | {_f(v['value'], '{:.2f}')}{detail} | {v['op']} {v['bar']} | {met} |")
    lines += ["", "## What limits it", ""]
    lines += limits_text(results)
    lines += ["", "## Compute only: the exit runner in process", "",
              "The same images through `CascadeRunner.run` without HTTP (decoded already), per profile: images/s "
              "at batch 1 and 32, and the measured FLOPs fraction.", "",
              "| profile | images/s batch 1 | images/s batch 32 | FLOPs fraction | accuracy % (batch 32) |",
              "|---|---|---|---|---|"]
    for name, row in results["plain"]["runner"]["profiles"].items():
        lines.append(f"| {name} | {_f(row['batch1']['images_per_second'])} | "
                     f"{_f(row['batch32']['images_per_second'])} | {row['batch32']['mean_flops_fraction']:.3f} | "
                     f"{_pct(row['batch32']['accuracy'])} |")
    spy = cm.get("py_spy") or {}
    lines += ["", "## Where the time goes (py-spy, 32 clients, target profile)", ""]
    if spy.get("regions"):
        lines += [f"{spy['samples']} non-idle samples over {spy['duration_s']} s of the server process "
                  "(all threads; a sample can fall in more than one region).", "",
                  "| region | share of samples |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f} % |" for k, v in spy["regions"].items()]
        lines += ["", "| top self frames | share |", "|---|---|"]
        lines += [f"| `{t['frame'][:110]}` | {100 * t['share']:.1f} % |" for t in spy["top_self"][:10]]
    else:
        lines.append(f"not profiled: {spy.get('skipped', 'py-spy was not run')}")
    lines += ["", f"Whole benchmark wall time: {results['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)

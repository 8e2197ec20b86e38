"""``docs/autopilot.md``, ``docs/img/autopilot.png`` and ``docs/img/autopilot_trace.png`` from the results of
:mod:`bench.autopilot` (generated, never hand-typed; ``python -m bench.autopilot --render-only`` re-renders
from ``docs/autopilot.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.autopilot_eval import mean_cost

LABELS = {"autopilot": "ours, autopilot", "autopilot_floor": "ours, autopilot + floor",
          "full": "ours, fixed at full", "litserve": "LitServe (best config)"}
COLOURS = {"autopilot": "tab:green", "autopilot_floor": "tab:olive", "full": "tab:blue", "litserve": "tab:orange"}


def _f(x: Any, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(100 * x, spec)


def _loads(results: dict[str, Any]) -> list[str]:
    keys = {k for rows in results.get("rows", {}).values() for k in rows}
    return sorted(keys, key=float)


def render_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loads = _loads(results)
    cfgs = [c for c in LABELS if c in results.get("rows", {})]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    width = 0.8 / max(1, len(cfgs))
    x = np.arange(len(loads))
    for j, cfg in enumerate(cfgs):
        rows = [results["rows"][cfg].get(k, {}) for k in loads]
        xs = x + (j - (len(cfgs) - 1) / 2) * width
        kw = {"width": width, "color": COLOURS[cfg], "label": LABELS[cfg]}
        axes[0].bar(xs, [r.get("p99_ms") or np.nan for r in rows], **kw)
        axes[1].bar(xs, [r.get("answered_rps") or 0.0 for r in rows], **kw)
        axes[2].bar(xs, [100 * r["accuracy"] if r.get("accuracy") is not None else np.nan for r in rows], **kw)
        axes[3].bar(xs, [100 * r["shed"] / r["requests"] if r.get("requests") else 0.0 for r in rows], **kw)
    axes[0].axhline(results["target_ms"], color="k", ls="--", lw=1, label=f"target {results['target_ms']:.0f} ms")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("p99 of answered requests, ms")
    axes[1].set_ylabel("answered (2xx) per second")
    offered = [float(k) * results.get("full_capacity_rps", 0.0) for k in loads]
    axes[1].plot(x, offered, "k_", ms=30, mew=2, label="offered")
    if results.get("floor_capacity_rps"):
        axes[1].axhline(results["floor_capacity_rps"], color="tab:olive", ls=":", lw=1, label="floor capacity")
    axes[2].set_ylabel("accuracy of the answers, %")
    lo = [100 * r["accuracy"] for c in cfgs for r in results["rows"][c].values() if r.get("accuracy") is not None]
    if lo:
        axes[2].set_ylim(max(0.0, min(lo) - 3), min(100.0, max(lo) + 2))
    axes[3].set_ylabel("shed (503), % of offered")
    for ax in axes:
        ax.set_xticks(x, [f"{k}x" for k in loads])
        ax.set_xlabel("offered load / full network's closed-loop capacity")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    pin = results.get("pinning", {})
    pinned = "server and generator pinned to their own CPU" if pin.get("enabled") else "not pinned"
    fig.suptitle(f"Latency autopilot under open-loop Poisson load ({pinned}; load average at the end "
                 f"{results['environment'].get('loadavg_end')})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_trace(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    traces = results.get("trace") or {}
    if not traces:
        return
    fig, axes = plt.subplots(4, len(traces), figsize=(7.5 * len(traces), 11), sharex=True, squeeze=False)
    target = results["target_ms"]
    for j, (cfg, tr) in enumerate(traces.items()):
        w = tr["windows"]
        t = np.array([r["t"] for r in w]) + tr["window_s"] / 2
        ax = axes[0][j]
        ax.plot(t, [r["offered_rps"] for r in w], color="k", lw=1, label="offered")
        ax.plot(t, [r["answered_rps"] for r in w], color="tab:green", lw=1.2, label="answered (2xx)")
        ax.plot(t, [r["shed_rps"] for r in w], color="tab:red", lw=1, label="shed (503)")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{LABELS[cfg]}: 0.5x -> 3x -> 0.5x")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        ax.plot(t, [r["p99_ms"] if r["p99_ms"] is not None else np.nan for r in w], color="tab:blue", lw=1,
                label=f"p99 per {tr['window_s']:g} s (client)")
        pt = [p["t"] for p in tr["polls"] if p.get("p99_ms") is not None]
        if pt:
            ax.plot(pt, [p["p99_ms"] for p in tr["polls"] if p.get("p99_ms") is not None], color="tab:purple",
                    lw=0.8, alpha=0.7, label="p99 the server reports")
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.0f} ms")
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms")
        ax.legend(fontsize=7)
        ax = axes[2][j]
        pts = [(p["t"], p["estimated_accuracy"]) for p in tr["polls"] if p.get("estimated_accuracy") is not None]
        if pts:
            ax.step([a for a, _ in pts], [100 * b for _, b in pts], where="post", color="tab:olive",
                    label="estimated accuracy of the point held (GET /profiles)")
        full = results.get("model", {}).get("full_estimated_accuracy")
        if full is not None:
            ax.axhline(100 * full, color="k", ls=":", lw=1, label="full network's estimate")
        ax.set_ylabel("accuracy, %")
        ax.legend(fontsize=7)
        ax = axes[3][j]
        ax.plot(t, [100 * (r["shed_fraction"] or 0.0) for r in w], color="tab:red", lw=1,
                label="shed, % of the window's arrivals")
        pts = [(p["t"], p["shed_rate"]) for p in tr["polls"] if p.get("shed_rate") is not None]
        if pts:
            ax.plot([a for a, _ in pts], [100 * b for _, b in pts], color="tab:pink", lw=0.8,
                    label="shed rate the server reports")
        ax.set_ylabel("shed, %")
        ax.set_xlabel("seconds (scheduled send time)")
        ax.legend(fontsize=7)
        for row in axes:
            for s in (tr["segments"][0]["seconds"], tr["segments"][0]["seconds"] + tr["segments"][1]["seconds"]):
                row[j].axvline(s, color="grey", lw=0.6, ls="--")
            row[j].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict[str, Any]) -> list[str]:
    lines = ["| load | configuration | offered/s | answered/s | p50 ms | p99 ms | shed 503 (p99 ms, with Retry-After) "
             "| other non-2xx | accuracy % | mean FLOPs | mean time | generator late p99 ms | load avg after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    last_load: dict[tuple[str, str], str] = {}
    for st in results.get("steps", []):
        last_load[(st["config"], st["load"])] = st["loadavg"]["after"] or "?"
    for k in _loads(results):
        for cfg in LABELS:
            r = results["rows"].get(cfg, {}).get(k)
            if r is None:
                continue
            lines.append(
                f"| {k}x | {LABELS[cfg]} | {r['offered_rps']:.0f} | {r['answered_rps']:.0f} | {_f(r['p50_ms'])} | "
                f"**{_f(r['p99_ms'])}** | {r['shed']} ({_f(r['shed_p99_ms'])}, {r['shed_with_retry_after']}) | "
                f"{r['other_non_2xx']} | {_pct(r['accuracy'])} | {_f(r['mean_flops_fraction'], '.3f')} | "
                f"{_f(r['mean_time_fraction'], '.3f')} | {_f(r.get('generator_late_p99_ms'))} | "
                f"{last_load.get((cfg, k), '?')} |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    env, pin, tgt = results["environment"], results.get("pinning", {}), results.get("target", {})
    cap = results.get("capacity", {})
    model = results.get("model", {})
    plan = results.get("plan", {})
    lit = results.get("litserve_config")
    lines = [
        "# Latency autopilot under open-loop load",
        "",
        "Generated by `python -m bench.autopilot` (this file, `docs/autopilot.json`, `docs/img/autopilot.png`, "
        "`docs/img/autopilot_trace.png`); do not edit by hand."
        + (" **A `--quick` smoke run: not a result.**" if results.get("quick") else ""),
        "",
        f"Model `{results['model_dir']}` (bundle `{model.get('bundle')}`; full network's estimated accuracy "
        f"{_pct(model.get('full_estimated_accuracy'))} %, floor {_pct(model.get('floor_accuracy'))} %); "
        f"{env.get('cpu')}, {env.get('cpu_count')} cores; git `{(env.get('git_sha') or '?')[:10]}`; "
        f"{env.get('date')}. Load average (1/5/15 min): {env.get('loadavg_start')} at the start, "
        f"{env.get('loadavg_end')} at the end (per step in the table and the JSON).",
        "",
        f"- **Load**: open loop, Poisson arrivals (seeded, the same arrival times and images for every "
        f"configuration at a load), latency from the scheduled send time; {plan.get('rounds')} round(s) of "
        f"{plan.get('settle_s'):g} s settling + {plan.get('step_s'):g} s measured per step, configurations back "
        "to back (order rotated each round), rounds pooled.",
        "- **Pinning**: " + (f"server `{pin.get('server')}`, load generator `{pin.get('generator')}`."
                             if pin.get("enabled") else f"none ({pin.get('note')})."),
        f"- **Capacity** (closed loop, 32 clients): full network {_f(cap.get('full', {}).get('ok_rps'), '.0f')} req/s;"
        f" floor point `{cap.get('floor', {}).get('point')}` {_f(cap.get('floor', {}).get('ok_rps'), '.0f')} req/s. "
        "Loads are multiples of the full network's.",
        f"- **Target**: **{results['target_ms']:.0f} ms** p99: {tgt.get('basis')}.",
        "- **LitServe**: " + (f"{lit['workers_per_device']} worker(s) x {lit['threads']} thread(s), chosen by "
                              f"{lit['chosen_by']}; same network, raw PNG body, max batch 32, 2 ms batch timeout."
                              if lit else "not run."),
        "",
        "![autopilot](img/autopilot.png)",
        "",
        *table(results),
        "",
        "Shed: HTTP 503 (their p99 latency; how many carried Retry-After). Other non-2xx: any other status, client "
        "timeouts, resets, and requests the generator could not send (its 512-connection cap). Mean time: the "
        "answer's time fraction when it carries one, else the served profile's expected time at batch 1 over the "
        "full network's (`GET /profiles`); LitServe runs the full network (1.0). Generator late: how long after its "
        "scheduled time the generator sent a request (p99; large values mean the generator, not the server, fell "
        "behind; that time is in the latency too).",
        "",
        "## Goals (issue #25)",
        "",
        "| goal | configuration | met | figures |",
        "|---|---|---|---|",
    ]
    for g in results.get("goals", []):
        mark = {True: "**met**", False: "**not met**", None: "(reported)"}[g["met"]]
        lines.append(f"| {g['goal']} | {LABELS.get(g['config'], g['config'])} | {mark} | {g['figures']} |")
    traces = results.get("trace") or {}
    if traces:
        lines += ["", "## Step-load trace: 0.5x -> 3x -> 0.5x", "",
                  "![trace](img/autopilot_trace.png)", "",
                  "| configuration | phase | answered/s | p99 ms | shed | accuracy % | back to full accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for cfg, tr in traces.items():
            for k, ph in enumerate(tr.get("phases", [])):
                rec = f"{_f(tr.get('recovery_s'))} s" if k == 2 else ""
                lines.append(f"| {LABELS[cfg]} | {('0.5x', '3x', '0.5x again')[k]} | {ph['answered_rps']:.0f} | "
                             f"{_f(ph['p99_ms'])} | {ph['shed']} | {_pct(ph['accuracy'])} | {rec} |")
        lines += ["", "Windows of the trace are by scheduled send time; the accuracy is the estimate of the point the "
                  "autopilot holds (polled every " f"{plan.get('poll_s'):g} s); 'back to full accuracy' is the time "
                  "after the step down until that estimate is within 0.2 points of the full network's and stays there."]
    costs = [(cfg, mean_cost(r)) for cfg, rows in results.get("rows", {}).items() for r in rows.values()]
    if costs and all(c is None for _, c in costs):
        lines += ["", "No cost figure was reported by the answers."]
    lines.append("")
    return "\n".join(lines)


def render(results: dict[str, Any], out: Path) -> None:
    (out / "img").mkdir(parents=True, exist_ok=True)
    render_plot(results, out / "img" / "autopilot.png")
    render_trace(results, out / "img" / "autopilot_trace.png")
    (out / "autopilot.md").write_text(render_markdown(results))

// The operator's page: draws GET /profiles as an SVG chart, polls GET /ui/api/stats, and with the admin
// token calls the admin API (POST /profiles, GET /admin/bundles, POST /admin/bundles/{id}/activate).
// No library: plain DOM and SVG. Every server string goes in through textContent, never as HTML.
// The token lives in the `token` variable only: never in a URL, cookie, storage or the console.
(() => {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const PROFILES_EVERY_MS = 5000;
  const STATS_EVERY_MS = 2000;
  const MODE_LABELS = {
    cm: "class means", ic_prob: "IC top probability (SDN)", ic_entropy: "IC entropy (BranchyNet)",
    combined: "IC + class means",
  };
  const PALETTE = ["#1f6fb4", "#d0452f", "#2d9a4a", "#8a55b8", "#c7861a", "#3a9fa8"];
  const MODE_COLORS = { cm: PALETTE[0], ic_prob: PALETTE[1], ic_entropy: PALETTE[2], combined: PALETTE[3] };

  let token = null; // the admin token, in memory only
  let profiles = null; // last GET /profiles
  let profilesKey = "";
  let bundles = null; // last GET /admin/bundles (only while unlocked)
  let prevStats = null;

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, { body, admin = false } = {}) {
    const headers = { Accept: "application/json" };
    if (admin) {
      if (!token) throw new ApiError(0, "locked", "enter the admin token first");
      headers.Authorization = "Bearer " + token;
    }
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit", redirect: "error",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const err = data && data.error ? data.error : {};
      throw new ApiError(response.status, err.code || "http_" + response.status, err.message || response.statusText);
    }
    return data;
  }

  // -- small DOM and number helpers ---------------------------------------------------------------------

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const pct = (x, digits = 1) => (100 * x).toFixed(digits) + " %";
  const modeLabel = (m) => MODE_LABELS[m] || m;

  function modeColor(mode, index) {
    return MODE_COLORS[mode] || PALETTE[(4 + index) % PALETTE.length];
  }

  function say(kind, text) {
    const box = $("message");
    box.textContent = text;
    box.className = "message " + kind;
    box.hidden = false;
  }

  function errorText(what, e) {
    if (e instanceof ApiError) return `${what}: ${e.status ? e.status + " " : ""}${e.code}: ${e.message}`;
    return `${what}: ${e && e.message ? e.message : e}`;
  }

  // -- the accuracy-cost chart --------------------------------------------------------------------------

  function niceStep(span, target) {
    const raw = span / target;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  }

  // Axes and grid for a box; returns the scales. fmt.x / fmt.y format tick values (fmt.x null: no x ticks).
  function chartFrame(root, box, xDomain, yDomain, labels, fmt) {
    const [x0, x1] = xDomain;
    const [y0, y1] = yDomain;
    const sx = (x) => box.left + ((x - x0) / (x1 - x0)) * box.width;
    const sy = (y) => box.top + box.height - ((y - y0) / (y1 - y0)) * box.height;
    const grid = svg("g", { class: "grid" });
    if (fmt.x) {
      const xs = niceStep(x1 - x0, 8);
      for (let v = Math.ceil(x0 / xs) * xs; v <= x1 + 1e-9; v += xs) {
        grid.append(svg("line", { x1: sx(v), x2: sx(v), y1: box.top, y2: box.top + box.height }));
        grid.append(svg("text", { x: sx(v), y: box.top + box.height + 16, class: "tick x" }, fmt.x(v, xs)));
      }
    }
    const ys = fmt.integer ? Math.max(1, niceStep(y1 - y0, 5)) : niceStep(y1 - y0, 6);
    for (let v = Math.ceil(y0 / ys) * ys; v <= y1 + 1e-9; v += ys) {
      grid.append(svg("line", { x1: box.left, x2: box.left + box.width, y1: sy(v), y2: sy(v) }));
      grid.append(svg("text", { x: box.left - 6, y: sy(v) + 4, class: "tick y" }, fmt.y(v, ys)));
    }
    root.append(grid);
    if (labels[0]) {
      root.append(svg("text", { x: box.left + box.width / 2, y: box.top + box.height + 36, class: "axis-label" },
        labels[0]));
    }
    if (labels[1]) {
      root.append(svg("text", { x: 14, y: box.top + box.height / 2, class: "axis-label",
        transform: `rotate(-90 14 ${box.top + box.height / 2})` }, labels[1]));
    }
    return { sx, sy };
  }

  function groupByMode(rows) {
    const modes = new Map();
    for (const p of rows) {
      if (!modes.has(p.mode)) modes.set(p.mode, []);
      modes.get(p.mode).push(p);
    }
    for (const list of modes.values()) list.sort((a, b) => a.flops_fraction - b.flops_fraction);
    return modes;
  }

  function domains(rows, extra) {
    const xs = rows.map((p) => p.flops_fraction);
    const ys = rows.map((p) => p.accuracy).concat(extra);
    const xMax = Math.max(1, ...xs) * 1.03;
    let yMin = Math.min(...ys);
    let yMax = Math.max(...ys);
    const pad = Math.max(0.005, (yMax - yMin) * 0.08);
    yMin = Math.max(0, yMin - pad);
    yMax = Math.min(1, yMax + pad);
    if (yMax - yMin < 0.01) { yMin = Math.max(0, yMin - 0.01); yMax = Math.min(1, yMax + 0.01); }
    return [[0, xMax], [yMin, yMax]];
  }

  function autopilotState(p) {
    const ap = p && p.autopilot;
    if (!ap || typeof ap !== "object") return null;
    const on = ap.enabled ?? ap.on ?? ap.active ?? ap.engaged ?? false;
    return on ? ap : null;
  }

  function drawSeries(root, modes, scale, active) {
    let index = 0;
    for (const [mode, list] of modes) {
      const color = modeColor(mode, index++);
      const g = svg("g", { class: "series", "data-mode": mode });
      const pts = list.map((p) => `${scale.sx(p.flops_fraction).toFixed(1)},${scale.sy(p.accuracy).toFixed(1)}`);
      g.append(svg("polyline", { points: pts.join(" "), stroke: color, class: "hull" }));
      for (const p of list) g.append(pointNode(p, scale, color, active));
      root.append(g);
    }
  }

  function pointNode(p, scale, color, active) {
    const isActive = p.name === active.a || p.name === active.b;
    const c = svg("circle", {
      cx: scale.sx(p.flops_fraction), cy: scale.sy(p.accuracy), r: isActive ? 7 : 5, fill: color,
      class: "point" + (isActive ? " active" : ""), tabindex: 0, role: "button",
      "data-name": p.name, "data-mode": p.mode,
      "aria-label": `serve ${p.name}`,
    });
    c.append(svg("title", {}, `${p.name} · ${modeLabel(p.mode)}\naccuracy ${pct(p.accuracy, 2)} · ` +
      `FLOPs ${pct(p.flops_fraction)} of full` + (isActive ? `\nserving now (${pct(p.share, 0)} of traffic)` : "") +
      "\nclick to serve this point"));
    c.addEventListener("click", () => switchTo(p));
    c.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); switchTo(p); } });
    return c;
  }

  function drawActive(root, p, scale) {
    const op = p.active;
    const byName = new Map(p.profiles.map((r) => [r.name, r]));
    const a = byName.get(op.a);
    const b = op.b ? byName.get(op.b) : null;
    if (a && b) {
      root.append(svg("line", { x1: scale.sx(a.flops_fraction), y1: scale.sy(a.accuracy),
        x2: scale.sx(b.flops_fraction), y2: scale.sy(b.accuracy), class: "mix" }));
    }
    const x = scale.sx(op.flops_fraction);
    const y = scale.sy(op.accuracy);
    const g = svg("g", { class: "active-marker", "data-name": op.name });
    g.append(svg("circle", { cx: x, cy: y, r: 12 }));
    const left = x > 560; // keep the label inside the plot near the right edge
    g.append(svg("text", { x: left ? x - 15 : x + 15, y: y + 26, class: "marker-label" + (left ? " end" : "") },
      "serving: " + op.name));
    root.append(g);
  }

  function drawAutopilot(root, p, scale, box) {
    const ap = autopilotState(p);
    if (!ap) return;
    const floor = ap.min_accuracy ?? ap.floor;
    if (typeof floor === "number") {
      root.append(svg("line", { x1: box.left, x2: box.left + box.width, y1: scale.sy(floor), y2: scale.sy(floor),
        class: "floor" }));
      root.append(svg("text", { x: box.left + box.width - 4, y: scale.sy(floor) - 5, class: "floor-label" },
        "autopilot floor " + pct(floor)));
    }
    const at = ap.operating || ap.point || p.active;
    if (typeof at.flops_fraction !== "number" || typeof at.accuracy !== "number") return;
    const x = scale.sx(at.flops_fraction);
    const y = scale.sy(at.accuracy);
    const d = `M ${x} ${y - 10} L ${x + 10} ${y} L ${x} ${y + 10} L ${x - 10} ${y} Z`;
    root.append(svg("path", { d, class: "autopilot-marker" }));
  }

  function drawCurve(p) {
    const root = $("curve");
    root.replaceChildren();
    const box = { left: 64, top: 16, width: 670, height: 340 };
    const ap = autopilotState(p);
    const extra = [p.active.accuracy];
    if (ap && typeof (ap.min_accuracy ?? ap.floor) === "number") extra.push(ap.min_accuracy ?? ap.floor);
    const [xd, yd] = domains(p.profiles, extra);
    const scale = chartFrame(root, box, xd, yd, ["FLOPs per sample, fraction of the full network",
      "estimated accuracy"], { x: (v, step) => v.toFixed(step < 0.1 ? 2 : 1), y: (v, step) => pct(v, step < 0.01 ? 1 : 0) });
    const modes = groupByMode(p.profiles);
    drawActive(root, p, scale);
    drawAutopilot(root, p, scale, box);
    drawSeries(root, modes, scale, p.active);
    drawLegend(modes);
  }

  function drawLegend(modes) {
    const legend = $("legend");
    legend.replaceChildren();
    let index = 0;
    for (const [mode, list] of modes) {
      const item = el("span", { class: "legend-item", "data-mode": mode });
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = modeColor(mode, index++);
      item.append(swatch, document.createTextNode(`${modeLabel(mode)} (${list.length} points)`));
      legend.append(item);
    }
    const ring = el("span", { class: "legend-item" });
    ring.append(el("span", { class: "swatch ring" }), document.createTextNode("serving now"));
    legend.append(ring);
  }

  function describeActive(p) {
    const op = p.active;
    const info = $("active-info");
    info.replaceChildren();
    const mix = op.b ? ` (time-shared: ${pct(op.lam, 0)} ${op.a}, ${pct(1 - op.lam, 0)} ${op.b})` : "";
    info.append(el("strong", {}, "Serving "), el("span", { id: "active-name" }, op.name),
      document.createTextNode(`${mix}: estimated accuracy ${pct(op.accuracy, 2)} at ${pct(op.flops_fraction)}` +
        ` of the full network's FLOPs · bundle ${p.bundle}, version ${p.version}`));
    const apBox = $("autopilot-info");
    const ap = autopilotState(p);
    apBox.hidden = !ap;
    if (ap) {
      const parts = ["Autopilot on"];
      const slo = ap.latency_slo_ms ?? ap.target_ms ?? (ap.target && ap.target.latency_slo_ms);
      if (slo !== undefined) parts.push(`p99 target ${slo} ms`);
      const floor = ap.min_accuracy ?? ap.floor;
      if (typeof floor === "number") parts.push(`floor ${pct(floor)}`);
      const why = ap.reason ?? ap.why;
      if (why) parts.push(String(why));
      apBox.textContent = parts.join(" · ") + " (the diamond marks its point; a click on the chart turns it off)";
    }
  }

  // -- actions ------------------------------------------------------------------------------------------

  async function switchTo(p) {
    if (!token) {
      say("warn", `Not switched to ${p.name}: switching needs the admin token (POST /profiles is an admin ` +
        "route). Enter it above, then click again.");
      return;
    }
    say("info", `Switching to ${p.name}…`);
    try {
      const r = await api("POST", "profiles", { body: { name: p.name }, admin: true });
      say("ok", `Now serving ${r.active.name} (version ${r.version}); was ${r.previous.profile}.`);
    } catch (e) {
      say("error", errorText(`Switch to ${p.name} refused`, e));
      if (e instanceof ApiError && e.status === 401) lock("the server rejected the token");
    }
    await refreshProfiles(true);
  }

  async function activateBundle(id, verb) {
    if (!token) { say("warn", "Activating a bundle needs the admin token."); return; }
    say("info", `${verb} ${id}…`);
    try {
      const r = await api("POST", `admin/bundles/${encodeURIComponent(id)}/activate`, { admin: true });
      say("ok", `${verb} done: serving bundle ${r.bundle}, profile ${r.active.name} (version ${r.version}); ` +
        `was ${r.previous.bundle}.`);
    } catch (e) {
      say("error", errorText(`${verb} ${id} refused`, e));
      if (e instanceof ApiError && e.status === 401) lock("the server rejected the token");
    }
    await Promise.all([refreshProfiles(true), refreshBundles()]);
  }

  // -- the token ----------------------------------------------------------------------------------------

  async function unlock() {
    const input = $("token");
    const candidate = input.value.trim();
    input.value = "";
    if (!candidate) { say("warn", "Type the admin token first."); return; }
    token = candidate;
    try {
      bundles = await api("GET", "admin/bundles", { admin: true });
    } catch (e) {
      token = null;
      say("error", errorText("Token not accepted", e));
      return;
    }
    $("token-state").textContent = "admin";
    $("token-state").className = "badge unlocked";
    $("token-forget").hidden = false;
    say("ok", "Unlocked: click a point to serve it; the bundles are listed below. The token stays in this page " +
      "only (reload or Lock forgets it).");
    renderBundles();
    if (profiles) drawCurve(profiles);
  }

  function lock(why) {
    token = null;
    bundles = null;
    $("token-state").textContent = "read-only";
    $("token-state").className = "badge locked";
    $("token-forget").hidden = true;
    renderBundles();
    if (why) say("warn", `Locked: ${why}.`);
  }

  // -- bundles ------------------------------------------------------------------------------------------

  function calibratedAt(id) {
    const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})/.exec(id);
    return m ? `${m[1]}-${m[2]}-${m[3]} ${m[4]}:${m[5]}` : "unknown";
  }

  function headsText(h) {
    if (!h) return "";
    const parts = [h.reduction, h.metric];
    if (h.temperature !== undefined && h.temperature !== null) parts.push("T " + h.temperature);
    return parts.filter((x) => x !== undefined && x !== null).join(" / ");
  }

  function dataText(b) {
    if (b.num_means == null) return "";
    return `${b.num_means} / ${b.num_selection ?? "?"}`;
  }

  function headlineText(b) {
    const h = b.headline;
    if (!h || typeof h.default_accuracy !== "number") return b.default_profile || "";
    const full = typeof h.full_accuracy === "number" ? ` (full net ${pct(h.full_accuracy, 2)})` : "";
    return `${b.default_profile}: ${pct(h.default_accuracy, 2)} at ${pct(h.default_flops_fraction)}${full}`;
  }

  function bundleRow(b) {
    const tr = el("tr", { "data-bundle": b.id, class: b.active ? "active" : "" });
    tr.append(el("td", {}, b.active ? "●" : ""), el("td", { class: "mono" }, b.id),
      el("td", {}, calibratedAt(b.id)), el("td", {}, b.readable ? headsText(b.heads) : "unreadable"),
      el("td", {}, dataText(b)), el("td", {}, headlineText(b)));
    const cell = el("td");
    if (!b.active && b.readable) {
      const btn = el("button", { type: "button", class: "activate", "data-bundle": b.id }, "Activate");
      btn.addEventListener("click", () => activateBundle(b.id, "Activate"));
      cell.append(btn);
    } else if (b.active) {
      cell.textContent = "serving";
    }
    tr.append(cell);
    return tr;
  }

  function renderBundles() {
    $("bundles-locked").hidden = !!bundles;
    $("bundles-box").hidden = !bundles;
    const body = $("bundles").querySelector("tbody");
    body.replaceChildren();
    const rb = $("rollback");
    if (!bundles) { rb.hidden = true; return; }
    const list = bundles.bundles;
    for (const b of list) body.append(bundleRow(b));
    const i = list.findIndex((b) => b.active);
    const prev = i > 0 ? list.slice(0, i).reverse().find((b) => b.readable) : null;
    rb.hidden = !prev;
    if (prev) {
      rb.textContent = `Roll back to ${prev.id}`;
      rb.dataset.bundle = prev.id;
    }
  }

  async function refreshBundles() {
    if (!token) return;
    try {
      bundles = await api("GET", "admin/bundles", { admin: true });
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) lock("the server rejected the token");
      return;
    }
    renderBundles();
  }

  // -- polling ------------------------------------------------------------------------------------------

  async function refreshProfiles(force = false) {
    let p;
    try {
      p = await api("GET", "profiles");
    } catch (e) {
      $("summary").textContent = errorText("not serving", e);
      return;
    }
    const key = JSON.stringify(p);
    $("summary").textContent = `model ${p.model} · bundle ${p.bundle} · version ${p.version}`;
    $("bundle-public").textContent = p.bundle;
    if (!force && key === profilesKey) return;
    const bundleChanged = profiles && profiles.bundle !== p.bundle;
    profiles = p;
    profilesKey = key;
    drawCurve(p);
    describeActive(p);
    document.body.dataset.version = String(p.version);
    if (bundleChanged) refreshBundles();
  }

  function rate(cur, prev, pick) {
    if (!prev || prev.instance !== cur.instance) return null;
    const dt = cur.uptime_s - prev.uptime_s;
    return dt > 0 ? (pick(cur) - pick(prev)) / dt : null;
  }

  function drawRates(s) {
    const reqRate = rate(s, prevStats, (x) => x.requests.inference);
    const sampleRate = rate(s, prevStats, (x) => x.samples);
    const spent = s.flops.full > 0 ? s.flops.spent / s.flops.full : null;
    const rejected = Object.values(s.rejected).reduce((a, b) => a + b, 0);
    const cells = [
      ["requests/s", reqRate === null ? "…" : reqRate.toFixed(2), "rate-requests"],
      ["samples/s", sampleRate === null ? "…" : sampleRate.toFixed(2), "rate-samples"],
      ["samples", String(s.samples), "total-samples"],
      ["FLOPs spent / full", spent === null ? "–" : pct(spent), "flops-spent"],
      ["errors", String(s.requests.inference_errors), "errors"],
      ["rejected", String(rejected), "rejected"],
      ["queue", String(s.queue_depth), "queue"],
    ];
    const box = $("rates");
    box.replaceChildren();
    for (const [label, value, id] of cells) {
      const cell = el("div", { class: "stat" });
      cell.append(el("div", { class: "value", id }, value), el("div", { class: "label" }, label));
      box.append(cell);
    }
  }

  function drawExits(s) {
    const root = $("exits");
    root.replaceChildren();
    const box = { left: 48, top: 12, width: 496, height: 180 };
    const max = Math.max(1, ...s.exits.map((e) => e.samples));
    chartFrame(root, box, [0, 1], [0, max], ["", "samples"], { x: null, y: (v) => String(Math.round(v)), integer: true });
    const n = s.exits.length;
    const w = box.width / n;
    const every = Math.ceil(n / 14);
    for (const e of s.exits) {
      const x = box.left + e.index * w;
      const h = box.height * (e.samples / max);
      const bar = svg("rect", { x: x + w * 0.12, y: box.top + box.height - h, width: w * 0.76, height: h,
        class: "bar" + (e.index === n - 1 ? " final" : ""), "data-exit": e.index, "data-samples": e.samples });
      const share = s.samples ? ` (${pct(e.samples / s.samples)})` : "";
      bar.append(svg("title", {}, `exit ${e.index} ${e.name}: ${e.samples} samples${share}\n` +
        `backbone cost ${pct(e.flops_fraction)} of full`));
      root.append(bar);
      if (e.index % every === 0 || e.index === n - 1) {
        root.append(svg("text", { x: x + w / 2, y: box.top + box.height + 14, class: "tick x bar-label",
          transform: `rotate(35 ${x + w / 2} ${box.top + box.height + 14})` }, e.name));
      }
    }
  }

  async function refreshStats() {
    let s;
    try {
      s = await api("GET", "ui/api/stats");
    } catch (e) {
      $("rates").textContent = errorText("no live figures", e);
      return;
    }
    drawRates(s);
    drawExits(s);
    prevStats = s;
  }

  function start() {
    $("token-use").addEventListener("click", unlock);
    $("token").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); unlock(); } });
    $("token-forget").addEventListener("click", () => { lock(); say("info", "Locked: the token is forgotten."); });
    $("rollback").addEventListener("click", (ev) => activateBundle(ev.currentTarget.dataset.bundle, "Roll back to"));
    refreshProfiles();
    refreshStats();
    setInterval(refreshProfiles, PROFILES_EVERY_MS);
    setInterval(refreshStats, STATS_EVERY_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();

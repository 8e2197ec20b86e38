// The page's two charts, drawn as SVG by hand (no library): the accuracy-cost curve of GET /profiles and
// the exit-depth histogram of GET /ui/api/stats. Every server string goes in through textContent.

const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const MODE_LABELS = {
  cm: "class means", ic_prob: "IC top probability (SDN)", ic_entropy: "IC entropy (BranchyNet)",
  combined: "IC + class means",
};
const PALETTE = ["#1f6fb4", "#d0452f", "#2d9a4a", "#8a55b8", "#c7861a", "#3a9fa8"];
const MODE_COLORS = { cm: PALETTE[0], ic_prob: PALETTE[1], ic_entropy: PALETTE[2], combined: PALETTE[3] };

export function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export const pct = (x, digits = 1) => (100 * x).toFixed(digits) + " %";
export const modeLabel = (m) => MODE_LABELS[m] || m;

export function modeColor(mode, index) {
  return MODE_COLORS[mode] || PALETTE[(4 + index) % PALETTE.length];
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

// The curve's x axis: "flops" (FLOPs fraction, the paper's measure) or "time" (measured ms per sample at batch 1
// as a fraction of the full network's: profiles timed with `classmeans timing` only).
let axis = "flops";
export function setAxis(a) { axis = a === "time" ? "time" : "flops"; }
export function curveAxis() { return axis; }
const xOf = (p) => (axis === "time" ? p.time_fraction : p.flops_fraction);

function fullMs(p) {
  const full = p.profiles.find((r) => r.name === "full");
  return full && typeof full.ms === "number" ? full.ms : null;
}

// The active point's x on the current axis (null when it has no measured time).
function activeX(p) {
  if (axis !== "time") return p.active.flops_fraction;
  const full = fullMs(p);
  return typeof p.active.ms === "number" && full ? p.active.ms / full : null;
}

function groupByMode(rows) {
  const modes = new Map();
  for (const p of rows) {
    if (!modes.has(p.mode)) modes.set(p.mode, []);
    modes.get(p.mode).push(p);
  }
  for (const list of modes.values()) list.sort((a, b) => xOf(a) - xOf(b));
  return modes;
}

function domains(rows, extra) {
  const xs = rows.map(xOf);
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

// The autopilot of GET /profiles (`autopilot`: enabled, latency_slo_ms, min_accuracy, operating (a name),
// operating_point, reason, ...) when on.
export function autopilotState(p) {
  const ap = p && p.autopilot;
  return ap && typeof ap === "object" && ap.enabled === true ? ap : null;
}

function drawSeries(root, modes, scale, active, onPick) {
  let index = 0;
  for (const [mode, list] of modes) {
    const color = modeColor(mode, index++);
    const g = svg("g", { class: "series", "data-mode": mode });
    const pts = list.map((p) => `${scale.sx(xOf(p)).toFixed(1)},${scale.sy(p.accuracy).toFixed(1)}`);
    g.append(svg("polyline", { points: pts.join(" "), stroke: color, class: "hull" }));
    for (const p of list) g.append(pointNode(p, scale, color, active, onPick));
    root.append(g);
  }
}

function pointNode(p, scale, color, active, onPick) {
  const isActive = p.name === active.a || p.name === active.b;
  const c = svg("circle", {
    cx: scale.sx(xOf(p)), cy: scale.sy(p.accuracy), r: isActive ? 7 : 5, fill: color,
    class: "point" + (isActive ? " active" : ""), tabindex: 0, role: "button",
    "data-name": p.name, "data-mode": p.mode,
    "aria-label": `serve ${p.name}`,
  });
  c.append(svg("title", {}, `${p.name} · ${modeLabel(p.mode)}\naccuracy ${pct(p.accuracy, 2)} · ` +
    `FLOPs ${pct(p.flops_fraction)} of full` +
    (typeof p.ms === "number" ? ` · ${p.ms.toFixed(2)} ms/sample (${pct(p.time_fraction)} of full)` : "") + (isActive ? `\nserving now (${pct(p.share, 0)} of traffic)` : "") +
    "\nclick to serve this point"));
  c.addEventListener("click", () => onPick(p));
  c.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); onPick(p); } });
  return c;
}

function drawActive(root, p, scale) {
  const op = p.active;
  const byName = new Map(p.profiles.map((r) => [r.name, r]));
  const a = byName.get(op.a);
  const b = op.b ? byName.get(op.b) : null;
  if (a && b && typeof xOf(a) === "number" && typeof xOf(b) === "number") {
    root.append(svg("line", { x1: scale.sx(xOf(a)), y1: scale.sy(a.accuracy),
      x2: scale.sx(xOf(b)), y2: scale.sy(b.accuracy), class: "mix" }));
  }
  const ax = activeX(p);
  if (typeof ax !== "number") return;
  const x = scale.sx(ax);
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
  const at = (typeof ap.operating === "object" && ap.operating) || ap.operating_point || p.active;
  if (axis === "time" || typeof at.flops_fraction !== "number" || typeof at.accuracy !== "number") return;
  const x = scale.sx(at.flops_fraction);
  const y = scale.sy(at.accuracy);
  const d = `M ${x} ${y - 10} L ${x + 10} ${y} L ${x} ${y + 10} L ${x - 10} ${y} Z`;
  root.append(svg("path", { d, class: "autopilot-marker" }));
}

// The curve of GET /profiles `p` into #curve; onPick(profile) runs when a point is clicked.
export function drawCurve(p, onPick) {
  const root = $("curve");
  root.replaceChildren();
  const box = { left: 64, top: 16, width: 670, height: 340 };
  const ap = autopilotState(p);
  const extra = [p.active.accuracy];
  if (ap && typeof (ap.min_accuracy ?? ap.floor) === "number") extra.push(ap.min_accuracy ?? ap.floor);
  const rows = p.profiles.filter((r) => typeof xOf(r) === "number");
  root.dataset.axis = axis;
  if (!rows.length) {
    root.append(svg("text", { x: 380, y: 200, class: "axis-label", "data-empty": "time" },
      "no profile of this bundle is timed on this machine: run `classmeans timing`"));
    drawLegend(new Map());
    return;
  }
  const [xd, yd] = domains(rows, extra);
  const xLabel = axis === "time" ? "measured time per sample at batch 1, fraction of the full network's"
    : "FLOPs per sample, fraction of the full network";
  const scale = chartFrame(root, box, xd, yd, [xLabel, "estimated accuracy"],
    { x: (v, step) => v.toFixed(step < 0.1 ? 2 : 1), y: (v, step) => pct(v, step < 0.01 ? 1 : 0) });
  const modes = groupByMode(rows);
  const members = axis === "flops" && Array.isArray(p.members) ? p.members : [];
  drawMembers(root, members, scale, yd);
  drawActive(root, p, scale);
  drawAutopilot(root, p, scale, box);
  drawSeries(root, modes, scale, p.active, onPick);
  drawLegend(modes, members);
}

// A cascade of models: each member alone (its own class-means hull on the selection split, FLOPs as fractions
// of the last member's), dashed, beside the cascade's curve; points below the plotted range are left out.
function drawMembers(root, members, scale, yd) {
  members.forEach((m, i) => {
    const pts = m.curve.filter(([, a]) => a >= yd[0]).map(([f, a]) => `${scale.sx(f).toFixed(1)},${scale.sy(a).toFixed(1)}`);
    if (!pts.length) return;
    const g = svg("g", { class: "member", "data-member": m.name });
    g.append(svg("polyline", { points: pts.join(" "), stroke: MEMBER_COLORS[i % MEMBER_COLORS.length], class: "member-hull" }));
    g.append(svg("title", {}, `${m.name} alone (its own exits, selection split)`));
    root.append(g);
  });
}

const MEMBER_COLORS = ["#9a6fb0", "#7f8c8d", "#b0846f"];

function drawLegend(modes, members = []) {
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
  members.forEach((m, i) => {
    const item = el("span", { class: "legend-item", "data-member": m.name });
    const swatch = el("span", { class: "swatch dashed" });
    swatch.style.borderColor = MEMBER_COLORS[i % MEMBER_COLORS.length];
    item.append(swatch, document.createTextNode(`${m.name} alone`));
    legend.append(item);
  });
  const ring = el("span", { class: "legend-item" });
  ring.append(el("span", { class: "swatch ring" }), document.createTextNode("serving now"));
  legend.append(ring);
}

// The exit-depth histogram of GET /ui/api/stats `s` into #exits.
export function drawExits(s) {
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

// -- the autopilot's trace ----------------------------------------------------------------------------

const TRACE_SERIES = [
  ["target", "p99 target (ms)", (r) => r.target_ms, "ms"],
  ["p99", "p99 (ms)", (r) => r.p99_ms, "ms"],
  ["accuracy", "estimated accuracy", (r) => r.accuracy, "share"],
  ["budget", "budget (share of full)", (r) => r.budget, "share"],
  ["shed", "shed rate", (r) => r.shed_rate, "share"],
];

function tracePath(rows, pick, sx, sy) {
  let d = "";
  let pen = false;
  for (const r of rows) {
    const v = pick(r);
    if (typeof v !== "number" || !Number.isFinite(v)) { pen = false; continue; }
    d += `${pen ? "L" : "M"} ${sx(r.t).toFixed(1)} ${sy(v).toFixed(1)} `;
    pen = true;
  }
  return d.trim();
}

// The ticks of GET /ui/api/autopilot `tr` into #trace: target and p99 in ms on the left axis; accuracy,
// budget and shed rate (0..1) on the right one. Time runs left to right, seconds before now.
export function drawTrace(tr) {
  const root = $("trace");
  root.replaceChildren();
  const rows = (tr && tr.ticks) || [];
  root.dataset.ticks = String(rows.length);
  const box = { left: 56, top: 14, width: 640, height: 230 };
  if (!rows.length) {
    root.append(svg("text", { x: 380, y: 140, class: "axis-label" }, "no autopilot ticks yet"));
    return;
  }
  const t1 = rows[rows.length - 1].t;
  const t0 = Math.min(rows[0].t, t1 - 60);
  const msVals = rows.flatMap((r) => [r.target_ms, r.p99_ms]).filter((v) => typeof v === "number");
  const msMax = Math.max(1, ...msVals) * 1.1;
  const scale = chartFrame(root, box, [t0 - t1, 0], [0, msMax], ["seconds before the last tick", "ms"],
    { x: (v) => String(Math.round(v)), y: (v) => String(Math.round(v)) });
  const sx = (t) => scale.sx(t - t1);
  const syMs = scale.sy;
  const syShare = (v) => box.top + box.height - v * box.height;
  for (const f of [0, 0.5, 1]) {
    root.append(svg("text", { x: box.left + box.width + 6, y: syShare(f) + 4, class: "tick" }, pct(f, 0)));
  }
  for (const [cls, label, pick, unit] of TRACE_SERIES) {
    const d = tracePath(rows, pick, sx, unit === "ms" ? syMs : syShare);
    if (!d) continue;
    const path = svg("path", { d, class: "trace-line " + cls, "data-series": cls });
    path.append(svg("title", {}, label));
    root.append(path);
  }
  let y = box.top + 4;
  for (const [cls, label] of TRACE_SERIES) {
    root.append(svg("line", { x1: box.left + 8, x2: box.left + 26, y1: y, y2: y, class: "trace-line " + cls }));
    root.append(svg("text", { x: box.left + 30, y: y + 4, class: "tick" }, label));
    y += 14;
  }
}

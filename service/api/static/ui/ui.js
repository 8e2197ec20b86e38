// The operator's page: draws GET /profiles as an SVG chart, polls GET /ui/api/stats (the whole server's
// figures) and GET /ui/api/autopilot (the controller's trace), and with the admin token calls the admin API
// (POST /profiles, also to turn the autopilot on and off; GET /admin/bundles, POST /admin/bundles/{id}/activate).
// No library: plain DOM and SVG. Every server string goes in through textContent, never as HTML.
// The token lives in the `token` variable only: never in a URL, cookie, storage or the console.
import {
  autopilotState, drawCurve, drawExits, drawTrace, el, pct, setAxis,
} from "./charts.js";

const PROFILES_EVERY_MS = 5000;
const STATS_EVERY_MS = 2000;
const TRACE_EVERY_MS = 2000;

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

// -- messages -----------------------------------------------------------------------------------------

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
    const parts = ["Autopilot on" + (ap.mode ? ` (${ap.mode})` : "")];
    const slo = ap.latency_slo_ms ?? ap.target_ms;
    if (typeof slo === "number") parts.push(`p99 target ${slo} ms`);
    if (typeof ap.p99_ms === "number") parts.push(`p99 now ${ap.p99_ms.toFixed(1)} ms`);
    const floor = ap.min_accuracy ?? ap.floor;
    if (typeof floor === "number") parts.push(`floor ${pct(floor)}`);
    if (ap.axis) parts.push(`${ap.axis} axis`);
    const why = ap.reason ?? ap.why;
    if (why) parts.push(String(why));
    apBox.textContent = parts.join(" · ") + " (the diamond marks its point; a click on the chart turns it off)";
  }
}

// -- the autopilot ------------------------------------------------------------------------------------

function fmt(x, digits = 1, unit = "") {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) + unit : "–";
}

function describeAutopilot(p) {
  const ap = autopilotState(p);
  const badge = $("ap-state");
  badge.textContent = ap ? `on · ${ap.latency_slo_ms ?? ap.target_ms} ms` : "off";
  badge.className = "badge " + (ap ? "on" : "locked");
  const raw = (p && p.autopilot) || {};
  const cells = [
    ["point", ap ? String((ap.operating && ap.operating.name) || ap.operating || "") : "–", "ap-operating"],
    ["est. accuracy", ap && typeof ap.accuracy === "number" ? pct(ap.accuracy, 1) : "–", "ap-accuracy"],
    ["p99 (ms)", fmt(raw.p99_ms), "ap-p99"],
    ["shed rate", typeof raw.shed_rate === "number" ? pct(raw.shed_rate, 1) : "–", "ap-shed"],
    ["capacity (samples/s)", ap ? fmt(ap.capacity_rps, 0) : "–", "ap-capacity"],
    ["axis", ap && ap.axis ? ap.axis : "–", "ap-axis"],
  ];
  const box = $("ap-figures");
  box.replaceChildren();
  for (const [label, value, id] of cells) {
    const cell = el("div", { class: "stat" });
    cell.append(el("div", { class: "value", id }, value), el("div", { class: "label" }, label));
    box.append(cell);
  }
}

async function autopilotOn() {
  if (!token) { say("warn", "Turning the autopilot on needs the admin token (POST /profiles is an admin route)."); return; }
  const target = Number($("ap-target").value);
  if (!$("ap-target").value || !Number.isFinite(target) || target <= 0) {
    say("warn", "Type a p99 target in milliseconds first.");
    return;
  }
  const body = { latency_slo_ms: target };
  const floorText = $("ap-floor").value.trim();
  if (floorText) body.min_accuracy = Number(floorText) / 100;
  say("info", `Turning the autopilot on (p99 target ${target} ms)…`);
  try {
    const r = await api("POST", "profiles", { body, admin: true });
    const ap = r.autopilot || {};
    say("ok", `Autopilot on: p99 target ${target} ms on the ${ap.axis || "?"} axis, holding ${ap.operating || r.active.name}` +
      (body.min_accuracy !== undefined ? `, floor ${pct(body.min_accuracy)}` : "") + ` (version ${r.version}).`);
  } catch (e) {
    say("error", errorText("Autopilot not turned on", e));
    if (e instanceof ApiError && e.status === 401) lock("the server rejected the token");
  }
  await Promise.all([refreshProfiles(true), refreshTrace()]);
}

async function autopilotOff() {
  if (!token) { say("warn", "Turning the autopilot off needs the admin token."); return; }
  if (!profiles) return;
  const op = profiles.active;
  const keep = op.b && op.lam < 0.5 ? op.b : op.a; // the vertex of the point it holds now that serves most
  say("info", `Turning the autopilot off (serving ${keep})…`);
  try {
    const r = await api("POST", "profiles", { body: { name: keep }, admin: true });
    say("ok", `Autopilot off: serving ${r.active.name} (version ${r.version}).`);
  } catch (e) {
    say("error", errorText("Autopilot not turned off", e));
    if (e instanceof ApiError && e.status === 401) lock("the server rejected the token");
  }
  await Promise.all([refreshProfiles(true), refreshTrace()]);
}

async function refreshTrace() {
  let tr;
  try {
    tr = await api("GET", "ui/api/autopilot");
  } catch (e) {
    return;
  }
  drawTrace(tr);
}

// -- actions ------------------------------------------------------------------------------------------

async function switchTo(p) {
  if (!token) {
    say("warn", `Not switched to ${p.name}: switching needs the admin token (POST /profiles is an admin ` +
      "route). Enter it above, then click again.");
    return;
  }
  say("info", `Switching to ${p.name}…`);
  const autopilotWasOn = !!autopilotState(profiles);
  try {
    const r = await api("POST", "profiles", { body: { name: p.name }, admin: true });
    say("ok", `Now serving ${r.active.name} (version ${r.version}); was ${r.previous.profile}.` +
      (autopilotWasOn ? " The autopilot is off now (a manual switch turns it off)." : ""));
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
  if (profiles) drawCurve(profiles, switchTo);
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
  drawCurve(p, switchTo);
  describeActive(p);
  describeAutopilot(p);
  document.body.dataset.version = String(p.version);
  if (bundleChanged) refreshBundles();
}

function rate(cur, prev, pick) {
  if (!prev || prev.instance !== cur.instance) return null;
  const dt = cur.scope === "server" ? cur.clock_s - prev.clock_s : cur.uptime_s - prev.uptime_s;
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
  $("live-scope").textContent = s.scope === "server"
    ? `(whole server: ${s.processes} worker${s.processes === 1 ? "" : "s"} merged)`
    : "(one worker process, since it started)";
  $("live-card").dataset.scope = s.scope || "process";
  prevStats = s;
}

function start() {
  $("token-use").addEventListener("click", unlock);
  $("token").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); unlock(); } });
  $("token-forget").addEventListener("click", () => { lock(); say("info", "Locked: the token is forgotten."); });
  $("rollback").addEventListener("click", (ev) => activateBundle(ev.currentTarget.dataset.bundle, "Roll back to"));
  for (const [id, value] of [["axis-flops", "flops"], ["axis-time", "time"]]) {
    $(id).addEventListener("click", () => {
      setAxis(value);
      $("axis-flops").setAttribute("aria-pressed", String(value === "flops"));
      $("axis-time").setAttribute("aria-pressed", String(value === "time"));
      if (profiles) drawCurve(profiles, switchTo);
    });
  }
  $("ap-on").addEventListener("click", autopilotOn);
  $("ap-off").addEventListener("click", autopilotOff);
  refreshProfiles();
  refreshStats();
  refreshTrace();
  setInterval(refreshProfiles, PROFILES_EVERY_MS);
  setInterval(refreshStats, STATS_EVERY_MS);
  setInterval(refreshTrace, TRACE_EVERY_MS);
}

start(); // a module runs once the document is parsed

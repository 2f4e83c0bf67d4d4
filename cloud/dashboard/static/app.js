// fedge live dashboard: one server-sent-events stream (/api/events), rendered without any library.
"use strict";

const COLORS = ["#4ea1ff", "#3fb950", "#d29922", "#f85149", "#a371f7", "#39c5cf", "#ff7b72", "#e3b341"];
const $ = (id) => document.getElementById(id);
let state = null;
let sortKey = "id", sortDir = 1;

function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}
function fmtAgo(t, now) {
  if (!t) return "–";
  const s = Math.max(0, now - t);
  return s < 60 ? s.toFixed(0) + " s ago" : s < 3600 ? (s / 60).toFixed(0) + " min ago" : (s / 3600).toFixed(1) + " h ago";
}
function fmtDur(s) { return s < 120 ? s.toFixed(0) + " s" : s < 7200 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h"; }
function text(id, v) { const e = $(id); if (e.textContent !== String(v)) e.textContent = v; }
function el(tag, attrs, content) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (content !== undefined) e.textContent = content;
  return e;
}

// ---------------------------------------------------------------- canvas helpers
function surface(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 220;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui, sans-serif";
  return { g, w, h };
}
function axes(g, w, h, pad, xs, ys, xlabel) {
  g.strokeStyle = "#2a3540"; g.fillStyle = "#8b98a5"; g.lineWidth = 1;
  for (const [v, y] of ys) { g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke(); g.fillText(v, 2, y + 4); }
  for (const [v, x] of xs) g.fillText(v, x - 4, h - pad.b + 14);
  if (xlabel) g.fillText(xlabel, w - pad.r - g.measureText(xlabel).width, h - 2);
}

function drawAccuracy(versions) {
  const canvas = $("accuracy-chart");
  const { g, w, h } = surface(canvas);
  const pad = { l: 34, r: 8, t: 8, b: 28 };
  const names = [];
  for (const p of versions) for (const k of Object.keys(p.accuracy)) if (!names.includes(k)) names.push(k);
  names.sort((a, b) => (a === "fused" ? -1 : b === "fused" ? 1 : a.localeCompare(b)));
  const vmax = Math.max(1, ...versions.map((p) => p.version)), vmin = versions.length ? Math.min(...versions.map((p) => p.version)) : 0;
  const X = (v) => pad.l + ((v - vmin) / Math.max(1, vmax - vmin)) * (w - pad.l - pad.r);
  const Y = (a) => pad.t + (1 - a) * (h - pad.t - pad.b);
  const step = Math.max(1, Math.ceil((vmax - vmin) / 8));
  const xs = []; for (let v = vmin; v <= vmax; v += step) xs.push([v, X(v)]);
  axes(g, w, h, pad, xs, [0, 0.25, 0.5, 0.75, 1].map((a) => [a.toFixed(2), Y(a)]), "version");
  const legend = $("acc-legend"); legend.textContent = "";
  names.forEach((name, i) => {
    const c = COLORS[i % COLORS.length];
    const pts = versions.filter((p) => name in p.accuracy);
    g.strokeStyle = c; g.fillStyle = c; g.lineWidth = name === "fused" ? 2.5 : 1.5;
    g.beginPath();
    pts.forEach((p, j) => (j ? g.lineTo(X(p.version), Y(p.accuracy[name])) : g.moveTo(X(p.version), Y(p.accuracy[name]))));
    g.stroke();
    for (const p of pts) { g.beginPath(); g.arc(X(p.version), Y(p.accuracy[name]), 2.5, 0, 2 * Math.PI); g.fill(); }
    const s = el("span"); const sw = el("i"); sw.style.background = c; s.append(sw, name); legend.append(s);
  });
  canvas.dataset.points = String(versions.length);
  canvas.dataset.series = names.join(",");
}

function drawStaleness(hist) {
  const canvas = $("staleness-chart");
  const { g, w, h } = surface(canvas);
  const pad = { l: 34, r: 8, t: 8, b: 28 };
  const smax = hist.length ? Math.max(...hist.map((b) => b.staleness)) : 0;
  const cmax = Math.max(1, ...hist.map((b) => b.count));
  const n = smax + 1, bw = (w - pad.l - pad.r) / n;
  const Y = (c) => pad.t + (1 - c / cmax) * (h - pad.t - pad.b);
  const xs = []; const xstep = Math.max(1, Math.ceil(n / 10));
  for (let s = 0; s < n; s += xstep) xs.push([s, pad.l + (s + 0.5) * bw]);
  const ticks = [...new Set([0, Math.round(cmax / 2), cmax])];  // whole counts, each once
  axes(g, w, h, pad, xs, ticks.map((c) => [c, Y(c)]), "versions behind");
  g.fillStyle = "#d29922";
  for (const b of hist) g.fillRect(pad.l + b.staleness * bw + 1, Y(b.count), Math.max(1, bw - 2), h - pad.b - Y(b.count));
  canvas.dataset.bins = String(hist.length);
}

// ---------------------------------------------------------------- panels
function renderCards(s) {
  const f = s.federation;
  text("version", f.version);
  text("target", "of " + f.target_versions + (s.running ? "" : " · finished"));
  text("mode", f.mode === "async" ? "async" : "sync");
  text("clock", (f.mode === "async" ? "K=" + f.buffer_size + " C=" + f.concurrency : f.concurrency + " per round") + " · " + f.clock + " clock " + fmtDur(f.clock_time));
  text("rate", f.versions_per_minute.toFixed(1));
  text("uptime", "up " + fmtDur(f.uptime_s));
  text("buffer", f.buffered + " / " + f.buffer_size);
  $("buffer-bar").style.width = Math.min(100, (100 * f.buffered) / Math.max(1, f.buffer_size)) + "%";
  const last = s.versions.length ? s.versions[s.versions.length - 1] : null;
  text("accuracy", last && "fused" in last.accuracy ? last.accuracy.fused.toFixed(3) : "–");
  text("base", "base " + f.base_version + (last ? " · evaluated v" + last.version : ""));
  text("updates", f.accepted);
  text("refused", f.refused + " refused");
  text("bytes", fmtBytes(s.bytes.up) + " / " + fmtBytes(s.bytes.down));
  const ds = s.device_states;
  text("devstates", ds.training + " training · " + ds.idle + " idle · " + ds.lost + " lost");
}

function renderRejections(rej) {
  const ul = $("rejections"); ul.textContent = "";
  const keys = Object.keys(rej).sort((a, b) => rej[b] - rej[a]);
  if (!keys.length) { ul.append(el("li", { class: "empty" }, "none")); return; }
  for (const k of keys) {
    const li = el("li", { "data-reason": k }); li.append(el("span", {}, k), el("b", {}, String(rej[k]))); ul.append(li);
  }
}

function renderEvents(events, links) {
  const ul = $("events"); ul.textContent = "";
  if (!events.length) ul.append(el("li", { class: "empty" }, "none yet"));
  for (const e of events.slice().reverse()) {
    let t = e.kind;
    if (e.kind === "training") t = "global training on v" + e.base_version + ": " + e.steps + " steps, " + (e.seconds || 0).toFixed(1) + " s → v" + e.version;
    else if (e.kind === "training_failed") t = "global training on v" + e.version + " failed";
    else if (e.kind === "published") t = "published base " + e.base_version + (e.path ? " (" + e.path.split("/").pop() + ")" : "");
    ul.append(el("li", { "data-kind": e.kind }, new Date(e.wall * 1000).toLocaleTimeString() + " · " + t));
  }
  const p = $("links"); p.textContent = "";
  for (const [name, url] of Object.entries(links)) {
    const a = el("a", { href: url, target: "_blank", rel: "noopener" }, name === "ray" ? "Ray dashboard" : name);
    p.append(a, " ");
  }
}

function cell(tr, v, cls) { const td = el("td", cls ? { class: cls } : {}, v); tr.append(td); }
function renderDevices(s) {
  const q = $("filter").value.trim().toLowerCase();
  let rows = s.devices.slice();
  if (q) rows = rows.filter((d) => [d.id, d.partition, d.state, d.modalities.join(" "), d.last_reason || ""].join(" ").toLowerCase().includes(q));
  rows.sort((a, b) => {
    let x = a[sortKey], y = b[sortKey];
    if (sortKey === "id") { x = BigInt(x); y = BigInt(y); }  // 64-bit node ids travel as strings
    if (Array.isArray(x)) { x = x.join(","); y = y.join(","); }
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
  });
  const tb = $("devices").tBodies[0];
  const frag = document.createDocumentFragment();
  for (const d of rows) {
    const tr = el("tr", { "data-id": d.id, "data-state": d.state });
    cell(tr, d.id); cell(tr, d.partition >= 0 ? d.partition : "–"); cell(tr, d.modalities.join("+") || "–");
    cell(tr, d.state, "state-" + d.state); cell(tr, d.base_version === null ? "–" : d.base_version);
    cell(tr, d.accepted); cell(tr, d.refused); cell(tr, d.last_staleness === null ? "–" : d.last_staleness);
    cell(tr, fmtAgo(d.last_seen, s.now)); cell(tr, fmtBytes(d.bytes_up)); cell(tr, fmtBytes(d.bytes_down));
    cell(tr, d.last_reason || "", "reason");
    frag.append(tr);
  }
  tb.replaceChildren(frag);
  text("device-count", "(" + rows.length + (q ? " of " + s.devices.length : "") + ")");
}

function render() {
  if (!state) return;
  renderCards(state);
  drawAccuracy(state.versions);
  drawStaleness(state.staleness);
  renderRejections(state.rejections);
  renderEvents(state.events, state.links);
  renderDevices(state);
  document.body.dataset.seq = String(state.seq);
}

// ---------------------------------------------------------------- wiring
for (const th of document.querySelectorAll("#devices th")) {
  th.addEventListener("click", () => {
    const k = th.dataset.key;
    sortDir = k === sortKey ? -sortDir : 1; sortKey = k;
    for (const o of document.querySelectorAll("#devices th")) o.classList.remove("asc", "desc");
    th.classList.add(sortDir > 0 ? "asc" : "desc");
    if (state) renderDevices(state);
  });
}
$("filter").addEventListener("input", () => state && renderDevices(state));
window.addEventListener("resize", () => state && (drawAccuracy(state.versions), drawStaleness(state.staleness)));

function connect() {
  const conn = $("conn");
  const es = new EventSource("/api/events");
  es.addEventListener("state", (ev) => {
    state = JSON.parse(ev.data);
    conn.textContent = state.running ? "live" : "finished"; conn.className = "pill " + (state.running ? "live" : "");
    render();
  });
  es.addEventListener("end", () => { es.close(); conn.textContent = "finished"; conn.className = "pill"; });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) { conn.textContent = "disconnected"; conn.className = "pill down"; }
    else { conn.textContent = "reconnecting…"; conn.className = "pill down"; }
  };
}
connect();

// prefixcache dashboard: polls /api/stats and draws it. No framework, no CDN (uPlot is vendored).
"use strict";

const POLL_MS = 3000;
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const $ = (id) => document.getElementById(id);
let chart = null;
let last = null;

const pct = (x) => (x == null || isNaN(x) ? "–" : `${(100 * x).toFixed(1)}%`);
const num = (x) => (x == null ? "–" : Number(x).toLocaleString("en-US"));
const secs = (x) => (x == null ? "–" : x < 1 ? `${(1000 * x).toFixed(0)} ms` : x < 120 ? `${x.toFixed(1)} s` : `${(x / 60).toFixed(1)} min`);
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function setStatus(kind, text) {
  const pill = $("status");
  pill.className = `pill pill-${kind}`;
  pill.textContent = text;
}
function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

function renderKpis(s) {
  const t = s.totals;
  $("service").textContent = `· ${s.service}`;
  $("kpi-hit").textContent = pct(t.hit_rate);
  $("kpi-hit-req").textContent = `${pct(t.request_hit_rate)} of requests hit`;
  $("kpi-saved").textContent = num(t.cached_tokens);
  $("kpi-compute").textContent = `≈ ${secs(t.compute_saved_s)} of prefill compute saved`;
  $("kpi-requests").textContent = num(t.requests);
  const audit = t.audit_checked ? ` · audit: ${num(t.audit_checked)} hits re-checked, ${num(t.audit_mismatches)} mismatches` : "";
  $("kpi-ttft").textContent = t.requests ? `mean TTFT ${secs(t.mean_ttft_s)}${audit}` : "";
  $("kpi-workers").textContent = `${s.workers_alive} / ${s.workers.length}`;
  const b = s.blocks || { stored: 0, distinct: 0, duplicates: 0 };
  $("kpi-distinct").textContent = num(b.distinct);
  $("kpi-stored").textContent = `${num(b.stored)} stored · ${num(b.duplicates)} duplicate copies`;
  const m = s.model || {};
  const routers = m.routers > 1 ? ` · ${m.routers} routers` : "";
  $("kpi-model").textContent = m.model ? `model ${m.model} · block ${m.block_size} · ${m.policy}${routers}` : "";
}

function renderChart(s) {
  const box = $("chart");
  const cum = s.history_cumulative || [];
  const win = new Map((s.history || []).map((p) => [p.t, p]));
  if (cum.length < 2) {
    $("chart-empty").hidden = false;
    return;
  }
  $("chart-empty").hidden = true;
  const xs = cum.map((p) => p.t);
  const pctOrNull = (x) => (x == null ? null : 100 * x);
  const data = [
    xs,
    cum.map((p) => pctOrNull(win.has(p.t) ? win.get(p.t).hit_rate : null)),
    cum.map((p) => pctOrNull(win.has(p.t) ? win.get(p.t).request_hit_rate : null)),
    cum.map((p) => 100 * p.hit_rate),
  ];
  const width = Math.max(280, box.clientWidth);
  if (!chart) {
    chart = new uPlot({
      width, height: 260,
      scales: { y: { range: [0, 100] } },
      legend: { live: false },
      axes: [{}, { values: (u, v) => v.map((x) => `${x}%`), size: 50 }],
      series: [
        {},
        { label: "tokens (per interval)", stroke: "#2563eb", width: 2, spanGaps: false, points: { show: true, size: 5 } },
        { label: "requests (per interval)", stroke: "#16a34a", width: 2, spanGaps: false, points: { show: true, size: 5 } },
        { label: "tokens (since start)", stroke: "#94a3b8", width: 1.5, dash: [6, 4] },
      ],
    }, data, box);
    new ResizeObserver(() => chart.setSize({ width: Math.max(280, box.clientWidth), height: 260 })).observe(box);
  } else {
    chart.setData(data);
  }
  box.dataset.drawn = "1";
  box.dataset.points = String(xs.length);
}

function renderMisses(s) {
  const colors = { never_seen: "var(--miss1)", evicted: "var(--miss2)", held_elsewhere: "var(--miss3)" };
  const names = { never_seen: "never seen (unique content)", evicted: "evicted (cache too small)", held_elsewhere: "held by another worker" };
  const total = Object.values(s.misses).reduce((a, b) => a + b, 0);
  const bar = $("misses");
  const legend = $("misses-legend");
  bar.replaceChildren();
  legend.replaceChildren();
  for (const [k, v] of Object.entries(s.misses)) {
    if (total) bar.append(el("span", { style: `width:${(100 * v) / total}%;background:${colors[k]}`, title: `${names[k]}: ${v} tokens` }));
    legend.append(el("span", {}, el("i", { style: `background:${colors[k]}` }), `${names[k]}: ${num(v)} tokens${total ? ` (${pct(v / total)})` : ""}`));
  }
}

function tierBar(t, cls) {
  const frac = t.capacity ? t.blocks / t.capacity : 0;
  return el("div", {},
    el("div", { class: `bar ${cls}` }, el("span", { style: `width:${(100 * frac).toFixed(1)}%` })),
    el("div", { class: "bar-label" }, t.capacity ? `${bytes(t.bytes)} / ${bytes(t.capacity_bytes)} · ${num(t.blocks)} blocks` : "off"));
}

function diskLine(d) {
  if (!d || !d.bytes_capacity) return "";
  const gbps = (x) => `${x.toFixed(2)} GB/s`;
  const text = `${num(d.hits)} hits · read ${gbps(d.read_gbps)} · write ${gbps(d.write_gbps)} · ` +
    `${num(d.writes_dropped)} dropped writes · ${num(d.corrupt_slots)} corrupt slots`;
  return el("div", { class: `bar-label${d.corrupt_slots ? " warn" : ""}` }, text);
}

function renderWorkers(s) {
  const body = $("workers").tBodies[0];
  body.replaceChildren(...s.workers.map((w) => el("tr", { "data-worker": w.worker_id },
    el("td", { class: "mono" }, w.worker_id),
    el("td", {}, el("span", { class: `dot ${w.alive ? "" : "dead"}` }),
      w.alive ? `yes (${w.lease_age_s ?? "?"} s ago)` : `no${w.lease_age_s != null ? "" : ""}`),
    el("td", { class: "num" }, num(w.requests)),
    el("td", { class: "num" }, pct(w.hit_rate)),
    el("td", {}, tierBar(w.tiers.device, "device")),
    el("td", {}, tierBar(w.tiers.host, "host")),
    el("td", {}, tierBar(w.tiers.disk, "disk"), diskLine(w.disk)),
    el("td", { class: "num" }, num(w.evictions)),
    el("td", { class: "num" }, num(w.queue)))));
  $("workers-empty").hidden = s.workers.length > 0;
}

function renderPrefixes(s) {
  const body = $("prefixes").tBodies[0];
  body.replaceChildren(...s.top_prefixes.map((p) => el("tr", {},
    el("td", { class: "mono" }, p.hash),
    el("td", { class: "num" }, num(p.tokens)),
    el("td", { class: "num" }, num(p.hits)),
    el("td", { class: "mono" }, p.holders.length ? p.holders.join(", ") : "none (evicted)"),
    el("td", {}, p.pinned ? "pinned" : ""),
    el("td", { class: "mono" }, p.tenant))));
  $("prefixes-empty").hidden = s.top_prefixes.length > 0;
}

function renderTenants(s) {
  const body = $("tenants").tBodies[0];
  body.replaceChildren(...s.tenants.map((t) => el("tr", {},
    el("td", { class: "mono" }, t.tenant === "none" ? "(no salt)" : t.tenant),
    el("td", { class: "num" }, num(t.requests)),
    el("td", { class: "num" }, pct(t.hit_rate)),
    el("td", { class: "num" }, num(t.cached_tokens)))));
  $("tenants-empty").hidden = s.tenants.length > 0;
}

function render(s) {
  renderKpis(s);
  renderChart(s);
  renderMisses(s);
  renderWorkers(s);
  renderPrefixes(s);
  renderTenants(s);
}

async function poll() {
  try {
    const res = await fetch(withToken("api/stats"), { cache: "no-store" });
    const body = await res.json();
    if (res.status === 503 || body.index_available === false) {
      setStatus("bad", "index unreachable");
      banner(`The Redis index is unreachable (${body.error || "no answer"}).` +
        (last ? ` Showing data from ${new Date(last.time * 1000).toLocaleTimeString()}.` : ""));
    } else if (!res.ok) {
      setStatus("bad", `error ${res.status}`);
      banner(body.error || `The dashboard answered ${res.status}.`);
    } else {
      last = body;
      banner("");
      if (!body.workers.length) setStatus("wait", "no data yet");
      else setStatus(body.workers_alive ? "ok" : "bad", body.workers_alive ? "live" : "no live worker");
      render(body);
      $("updated").textContent = `updated ${new Date(body.time * 1000).toLocaleTimeString()}`;
    }
  } catch (err) {
    setStatus("bad", "dashboard unreachable");
    banner(`Cannot reach the dashboard server: ${err}.`);
  }
  setTimeout(poll, POLL_MS);
}

$("link-json").href = withToken("api/stats");
$("link-metrics").href = withToken("metrics");
poll();

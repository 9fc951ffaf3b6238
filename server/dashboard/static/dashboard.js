// fedge dashboard: polls api/state and redraws. Text goes in through textContent only (site names
// and refusal reasons come from the network), and the chart is plain SVG: no library, no CDN.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "fedge-dashboard-token";

function $(id) { return document.getElementById(id); }

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(n >= 100 ? 0 : n >= 10 ? 1 : 2)) + " " + units[i];
}

function num(n, digits) { return n === null || n === undefined ? "" : Number(n).toFixed(digits); }

function clock(seconds) { return new Date(seconds * 1000).toLocaleTimeString(); }

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [key, value] of Object.entries(attrs || {})) tr.setAttribute(key, value);
  for (const cell of cells) {
    const td = document.createElement("td");
    if (typeof cell === "object" && cell !== null) {
      td.textContent = cell.text;
      if (cell.cls) td.className = cell.cls;
    } else {
      td.textContent = cell;
    }
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ticks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function drawChart(history) {
  const svg = $("auc-chart");
  const points = history.filter((r) => typeof r.auc === "number").map((r) => ({ x: r.cumulative_uplink_bytes / 1e6, y: r.auc, round: r.round }));
  $("auc-empty").hidden = points.length > 0;
  svg.replaceChildren();
  if (!points.length) return;
  const W = 760, H = 300, left = 52, right = 16, top = 12, bottom = 42;
  const xmax = Math.max(...points.map((p) => p.x)) || 1;
  let ylo = Math.floor(Math.min(...points.map((p) => p.y)) * 20) / 20;
  let yhi = Math.ceil(Math.max(...points.map((p) => p.y)) * 20) / 20;
  if (yhi - ylo < 0.05) { ylo = Math.max(0, ylo - 0.05); yhi = Math.min(1, yhi + 0.05); }
  const sx = (x) => left + (x / xmax) * (W - left - right);
  const sy = (y) => top + (1 - (y - ylo) / (yhi - ylo || 1)) * (H - top - bottom);
  for (const t of ticks(ylo, yhi, 5)) {
    svg.appendChild(el("line", { class: "grid", x1: left, x2: W - right, y1: sy(t), y2: sy(t) }));
    svg.appendChild(el("text", { class: "tick", x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, t.toFixed(2)));
  }
  for (const t of ticks(0, xmax, 6)) {
    svg.appendChild(el("line", { class: "grid", x1: sx(t), x2: sx(t), y1: top, y2: H - bottom }));
    svg.appendChild(el("text", { class: "tick", x: sx(t), y: H - bottom + 16, "text-anchor": "middle" }, String(t)));
  }
  svg.appendChild(el("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }));
  svg.appendChild(el("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }));
  svg.appendChild(el("text", { class: "label", x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle" }, "cumulative uplink (MB)"));
  svg.appendChild(el("text", { class: "label", x: 14, y: (top + H - bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(top + H - bottom) / 2})` }, "test AUC"));
  svg.appendChild(el("polyline", { class: "curve", points: points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") }));
  for (const p of points) {
    const dot = el("circle", { class: "point", cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 3.5, "data-round": p.round });
    dot.appendChild(el("title", {}, `round ${p.round}: AUC ${p.y.toFixed(4)} after ${p.x.toFixed(3)} MB`));
    svg.appendChild(dot);
  }
}

let lastStatus = null;

function render(state) {
  lastStatus = state.status;
  $("stopped").hidden = true;
  $("federation").textContent = state.federation;
  $("run").textContent = state.run.slice(0, 12);
  $("round").textContent = state.round;
  $("rounds").textContent = state.rounds;
  const status = $("status");
  status.textContent = state.status;
  status.className = "status " + state.status;
  $("total-uplink").textContent = bytes(state.totals.uplink_bytes);
  $("total-downlink").textContent = bytes(state.totals.downlink_bytes);
  $("updated").textContent = clock(state.generated_at);

  $("sites-online").textContent = state.sites.filter((s) => s.online).length;
  fill("sites", state.sites.map((s) => row([
    s.site,
    { text: s.online ? "online" : "offline", cls: s.online ? "online" : "offline" },
    { text: s.last_round === null ? "" : String(s.last_round), cls: "last-round" },
    s.updates,
    { text: bytes(s.upload_bytes), cls: "bytes" },
    num(s.last_upload_seconds, 3),
    num(s.upload_seconds, 3),
  ], { "data-site": s.site, "data-online": String(s.online) })));

  drawChart(state.history);

  const rejections = state.rejections;
  const total = $("rejections-total");
  total.textContent = rejections.total;
  total.className = "badge" + (rejections.total ? " alert" : "");
  fill("rejections", Object.entries(rejections.by_reason).map(([reason, count]) => row([reason, { text: String(count), cls: "count" }], { "data-reason": reason })));
  $("recent-rejections").replaceChildren(...rejections.recent.map((r) => {
    const li = document.createElement("li");
    const kind = document.createElement("b");
    kind.textContent = r.reason;
    li.append(kind, ": " + r.detail);
    return li;
  }));

  fill("history", state.history.slice().reverse().map((r) => row([
    r.round, r.clients.length, bytes(r.uplink_bytes), bytes(r.downlink_bytes), r.rejected, num(r.seconds, 1), num(r.auc, 4), num(r.accuracy, 4),
  ], { "data-round": r.round })));

  fill("checkpoints", state.checkpoints.slice().reverse().map((c) => row([c.round, c.file, bytes(c.bytes), clock(c.written_at)])));
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function poll() {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  try {
    const response = await fetch("api/state", { headers, cache: "no-store" });
    if (response.status === 401) {
      $("token-form").hidden = false;
      showError(token() ? "The token was refused." : "This dashboard needs its bearer token (--dashboard-token).");
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    $("token-form").hidden = true;
    showError("");
    render(await response.json());
  } catch (err) {
    if (lastStatus === "finished") {
      showError("");
      $("stopped").hidden = false;  // the server exits when its federation ends: this is the final state
    } else {
      showError("Cannot reach the server: " + err.message + " (retrying)");
    }
  }
}

function start() {
  // A token may come in the URL's fragment (never sent to the server): #token=...
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    poll();
  });
  // Every 2 s (the page's data-poll-ms), or ?poll_ms=N (at least 250).
  const asked = Number(new URLSearchParams(location.search).get("poll_ms"));
  const every = Math.max(250, asked || Number(document.body.dataset.pollMs) || 2000);
  poll();
  setInterval(poll, every);
}

document.addEventListener("DOMContentLoaded", start);

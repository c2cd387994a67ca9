// The coordinator's live view: polls /api/run and redraws. Read-only; builds the page with
// textContent and createElement only, so nothing from the run is ever parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function stageText(s) {
  if (s.pending === "statistics") return "data statistics";
  if (s.pending === "final") return "final test";
  if (s.pending === "done") return "done";
  return `round ${Math.min(s.round + 1, s.rounds)} of ${s.rounds}`;
}

function drawSilos(s) {
  const body = document.querySelector("#silos tbody");
  body.replaceChildren();
  const names = new Set([...(s.connected || []), ...(s.members || []), ...Object.keys(s.departed || {})]);
  for (const name of [...names].sort()) {
    let state = "connected, idle", cls = "idle";
    if (s.departed && name in s.departed) { state = `departed: ${s.departed[name]}`; cls = "departed"; }
    else if ((s.done || []).includes(name)) { state = `${s.phase}: done`; cls = "done"; }
    else if ((s.members || []).includes(name)) { state = `${s.phase}: working`; cls = "waiting"; }
    const seen = (s.last_contact || {})[name];
    const row = el("tr");
    row.append(el("td", name), el("td", state, cls), el("td", seen ? seen.slice(11, 19) : ""));
    body.append(row);
  }
}

function drawCurve(rounds, total) {
  const box = document.getElementById("curve");
  box.replaceChildren();
  const left = 40, right = 630, top = 10, bottom = 210;
  const n = Math.max(total || 1, 1);
  const x = (r) => left + (right - left) * (r + 1) / n;
  const y = (v) => bottom - (bottom - top) * v;
  box.append(svg("line", { x1: left, y1: bottom, x2: right, y2: bottom, stroke: "#8895a7" }));
  box.append(svg("line", { x1: left, y1: top, x2: left, y2: bottom, stroke: "#8895a7" }));
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    box.append(svg("text", { x: 8, y: y(v) + 4 }, v.toFixed(2)));
    box.append(svg("line", { x1: left, y1: y(v), x2: right, y2: y(v), stroke: "#e3e8ef" }));
  }
  const step = Math.max(1, Math.ceil(n / 10));
  for (let r = step - 1; r < n; r += step) box.append(svg("text", { x: x(r) - 4, y: bottom + 14 }, String(r + 1)));
  box.append(svg("text", { x: (left + right) / 2, y: 238 }, "round"));
  const points = rounds.filter((r) => r.val);
  for (const [key, color] of [["macro_auroc", "#3b7dd8"], ["accuracy", "#d8753b"]]) {
    const pts = points.filter((r) => typeof r.val[key] === "number");
    if (!pts.length) continue;
    box.append(svg("polyline", {
      points: pts.map((r) => `${x(r.round)},${y(r.val[key])}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2,
    }));
    for (const r of pts) box.append(svg("circle", { cx: x(r.round), cy: y(r.val[key]), r: 3, fill: color }));
  }
}

function drawEvents(events) {
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of events.slice(-30).reverse()) {
    list.append(el("li", `${(e.time || "").slice(11, 19)} ${e.message}`, e.level));
  }
}

function drawRuns(runs) {
  document.getElementById("runs-section").hidden = runs.length === 0;
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  for (const r of runs.slice().reverse()) {
    const row = el("tr");
    row.append(el("td", r.id), el("td", r.state), el("td", r.submitted || ""), el("td", r.ended || ""),
      el("td", r.message || ""));
    body.append(row);
  }
}

async function refresh() {
  try {
    const runs = await fetch("api/runs", { cache: "no-store" });
    drawRuns(await runs.json());
  } catch (err) {
    drawRuns([]);
  }
  let snap;
  try {
    const response = await fetch("api/run", { cache: "no-store" });
    snap = await response.json();
  } catch (err) {
    document.getElementById("updated").textContent = `(not reachable: ${err})`;
    return;
  }
  const s = snap.status;
  if (!s) {
    document.getElementById("run").textContent = "no run yet";
    return;
  }
  document.getElementById("run").textContent = `${s.federation} · run ${s.run_id}`;
  const deadline = s.deadline ? ` · until ${s.deadline.slice(11, 19)} UTC` : "";
  const where = s.pending === "done" ? "done" : `${stageText(s)} · ${s.phase} · attempt ${Math.max(s.attempt, 0)}${deadline}`;
  document.getElementById("stage").textContent = `${where} · ${s.rounds_recorded} of ${s.rounds} rounds recorded`;
  document.getElementById("bar-fill").style.width = `${(100 * s.rounds_recorded) / Math.max(s.rounds, 1)}%`;
  const o = snap.outcome;
  document.getElementById("outcome").textContent = o
    ? `${o.status}: ${o.message}` + (o.final_test && typeof o.final_test.accuracy === "number"
      ? ` · test accuracy ${o.final_test.accuracy.toFixed(3)}` : "")
    : (s.failure ? `failure: ${s.failure}` : "");
  drawSilos(s);
  drawCurve(snap.rounds, s.rounds);
  drawEvents(snap.events);
  document.getElementById("updated").textContent = `Last update ${new Date().toLocaleTimeString()}.`;
}

refresh();
setInterval(refresh, 2000);

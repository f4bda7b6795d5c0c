// imgsearch page: upload a photo, POST /search, show the ranked map images, the location and a map sketch.
// Vanilla JS, no build step, no third-party code: every byte comes from this service.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
let currentFile = null;
let queryUrl = null;
let seq = 0; // only the latest search may draw its answer

// Small DOM helper: el("div", {class: "x"}, "text", child, ...)
function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = (x, digits = 0) => Number(x).toLocaleString("en-GB", { minimumFractionDigits: digits, maximumFractionDigits: digits });

function setStatus(text) {
  $("#status").textContent = text;
}

function showError(status, body) {
  const box = $("#error");
  box.replaceChildren();
  const code = body && typeof body.code === "string" ? body.code : `HTTP ${status}`;
  const detail = body && typeof body.detail === "string" ? body.detail : "the service gave an unexpected answer";
  const where = status ? ` (HTTP ${status})` : "";
  box.append(el("strong", {}, `The search failed${where}: `), el("code", {}, code), el("span", { class: "detail" }, detail));
  box.dataset.code = code;
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error").replaceChildren();
}

// --- service info -------------------------------------------------------------------------------

async function loadServiceInfo() {
  try {
    const r = await fetch("/readyz");
    const b = await r.json();
    $("#service").textContent = r.ok
      ? `Index ${b.index_version} · ${fmt(b.size)} map images · preset ${b.preset}`
      : `Not ready: ${b.reason || "no index loaded"}`;
  } catch {
    $("#service").textContent = "The service cannot be reached.";
  }
}

// --- search -------------------------------------------------------------------------------------

async function search(file) {
  const mine = ++seq;
  currentFile = file;
  const k = $("#k").value;
  clearError();
  document.body.classList.add("busy");
  setStatus(`Searching the map for ${file.name}…`);
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);

  const form = new FormData();
  form.append("file", file, file.name);
  let r, body;
  try {
    r = await fetch(`/search?k=${encodeURIComponent(k)}`, { method: "POST", body: form });
    body = await r.json().catch(() => null);
  } catch {
    if (mine !== seq) return;
    showError(0, { code: "network_error", detail: "the service cannot be reached" });
    setStatus("");
    $("#answer").hidden = true;
    return;
  } finally {
    if (mine === seq) document.body.classList.remove("busy");
  }
  if (mine !== seq) return;
  if (!r.ok || !body || !Array.isArray(body.results)) {
    showError(r.status, body);
    setStatus("");
    $("#answer").hidden = true;
    return;
  }
  render(file, body);
  setStatus(`${body.results.length} map images in ${fmt(body.took_ms)} ms · preset ${body.preset} · index ${body.index_version}`);
}

function render(file, body) {
  $("#query-img").src = queryUrl;
  $("#query-name").textContent = file.name;
  renderLocation(body.query_location);
  sketchZoom = body.query_location.status === "estimated";
  renderSketch(body.results, body.query_location);
  $("#results").replaceChildren(...body.results.map(hitCard));
  $("#answer").hidden = false;
}

function hitCard(h) {
  const bar = el("span");
  bar.style.width = `${Math.round(h.score * 100)}%`;
  const verified = h.inliers === null || h.inliers === undefined
    ? el("span", { class: "muted" }, "not verified")
    : el("span", { class: "verified", title: "RANSAC inliers of ORB matches with your photo" }, `${h.inliers} inliers`);
  const loc = h.location;
  return el("li", { class: "hit-card", "data-rank": h.rank, "data-id": h.id, "data-path": h.path },
    el("img", { src: `/images/${encodeURIComponent(h.id)}/thumbnail`, alt: h.path, loading: "lazy" }),
    el("span", { class: "rank" }, `#${h.rank}`),
    el("div", { class: "body" },
      el("div", { class: "score", title: "predicted probability that it shows the same place" },
        `score ${h.score.toFixed(3)}`, el("span", { class: "bar" }, bar)),
      el("div", { class: "meta" }, verified, ` · distance ${h.distance.toFixed(3)}`),
      el("div", { class: "meta" }, `E ${fmt(loc.easting, 1)} · N ${fmt(loc.northing, 1)} · ${fmt(loc.heading)}°`),
      el("div", { class: "path" }, `id ${h.id} · ${h.path}`)));
}

function renderLocation(q) {
  const box = $("#location");
  box.replaceChildren();
  box.className = `location ${q.status}`;
  box.dataset.status = q.status;
  if (q.status !== "estimated") {
    box.append(el("h3", {}, "Location: unknown"),
      el("p", { class: "muted" }, `No map image is likely enough to show this place (best score ${q.confidence.toFixed(2)}, needs 0.50).`));
    return;
  }
  const osm = `https://www.openstreetmap.org/?mlat=${q.latitude.toFixed(6)}&mlon=${q.longitude.toFixed(6)}#map=18/${q.latitude.toFixed(6)}/${q.longitude.toFixed(6)}`;
  const rows = [
    ["latitude, longitude", `${q.latitude.toFixed(6)}, ${q.longitude.toFixed(6)}`],
    ["UTM easting", `${fmt(q.easting, 1)} m`],
    ["UTM northing", `${fmt(q.northing, 1)} m`],
    ["heading", `${fmt(q.heading)}°`],
    ["confidence", q.confidence.toFixed(2)],
    ["support", `${q.support} hit${q.support === 1 ? "" : "s"} within 25 m`],
  ];
  const dl = el("dl");
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
  box.append(el("h3", {}, "Probably taken here"), dl,
    el("p", { class: "muted" }, el("a", { href: osm, target: "_blank", rel: "noopener noreferrer" }, "open in OpenStreetMap")));
}

// --- map sketch: hits by UTM position, equal scale on both axes, distances in metres ------------

function niceStep(span, ticks = 4) {
  const raw = span / ticks;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
}

const ZOOM_M = 100; // "around the estimate": the hits within this many metres of it
let sketchZoom = true;

function renderSketch(hits, q) {
  const W = 320, H = 280, PAD = { l: 44, r: 12, t: 12, b: 34 };
  const est = q.status === "estimated" ? [q.easting, q.northing] : null;
  const zoom = Boolean(est && sketchZoom);
  const near = (h) => Math.hypot(h.location.easting - est[0], h.location.northing - est[1]) <= ZOOM_M;
  const shown = zoom ? hits.filter(near) : hits;
  const pts = shown.map((h) => [h.location.easting, h.location.northing]);
  if (est) pts.push([est[0] - 25, est[1] - 25], [est[0] + 25, est[1] + 25]); // its 25 m circle fits
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const cx = (Math.min(...xs) + Math.max(...xs)) / 2, cy = (Math.min(...ys) + Math.max(...ys)) / 2;
  const iw = W - PAD.l - PAD.r, ih = H - PAD.t - PAD.b;
  // One scale for both axes so the sketch keeps real distances; at least 50 m (80 m zoomed) across.
  const span = Math.max(zoom ? 80 : 50, (Math.max(...xs) - Math.min(...xs)) * 1.1, (Math.max(...ys) - Math.min(...ys)) * 1.1 * iw / ih);
  const scale = iw / span;
  const x0 = cx - span / 2, y0 = cy - (ih / scale) / 2;
  const X = (e) => PAD.l + (e - x0) * scale, Y = (n) => PAD.t + ih - (n - y0) * scale;

  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "map sketch of the hits" },
    el("svg:clipPath", { id: "plot-area" }, el("svg:rect", { x: PAD.l, y: PAD.t, width: iw, height: ih })));
  const plot = el("svg:g", { "clip-path": "url(#plot-area)" }); // hits out of the zoomed view are cut off
  const step = niceStep(span);
  const ox = Math.floor(x0), oy = Math.floor(y0); // axis labels: metres from the lower-left corner
  for (let d = 0; d <= span + 1e-9; d += step) {
    svg.append(el("svg:line", { class: "grid", x1: X(x0 + d), x2: X(x0 + d), y1: PAD.t, y2: PAD.t + ih }),
      el("svg:text", { x: X(x0 + d), y: H - PAD.b + 14, "text-anchor": "middle" }, fmt(d)));
  }
  for (let d = 0; d <= ih / scale + 1e-9; d += step) {
    svg.append(el("svg:line", { class: "grid", x1: PAD.l, x2: PAD.l + iw, y1: Y(y0 + d), y2: Y(y0 + d) }),
      el("svg:text", { x: PAD.l - 4, y: Y(y0 + d) + 3, "text-anchor": "end" }, fmt(d)));
  }
  svg.append(
    el("svg:line", { class: "axis", x1: PAD.l, x2: PAD.l + iw, y1: PAD.t + ih, y2: PAD.t + ih }),
    el("svg:line", { class: "axis", x1: PAD.l, x2: PAD.l, y1: PAD.t, y2: PAD.t + ih }),
    el("svg:text", { x: PAD.l + iw / 2, y: H - 4, "text-anchor": "middle" }, `east (m) from E ${fmt(ox)}, N ${fmt(oy)}`),
    el("svg:text", { x: 10, y: PAD.t + ih / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${PAD.t + ih / 2})` }, "north (m)"));

  if (est) {
    const r = Math.max(6, 25 * scale); // the 25 m relevance radius
    plot.append(el("svg:circle", { class: "est", cx: X(est[0]), cy: Y(est[1]), r, "stroke-dasharray": "4 3", "data-role": "estimate" },
      el("svg:title", {}, `estimated location (25 m radius), confidence ${q.confidence.toFixed(2)}`)));
  }
  // Worst first, so the best hits are drawn on top.
  for (const h of [...hits].reverse()) {
    const x = X(h.location.easting), y = Y(h.location.northing);
    const a = (h.location.heading * Math.PI) / 180; // compass: 0 = north, clockwise
    const g = el("svg:g", { class: "hit", "data-rank": h.rank },
      el("svg:title", {}, `#${h.rank} id ${h.id} · score ${h.score.toFixed(3)}`),
      el("svg:line", { x1: x, y1: y, x2: x + 14 * Math.sin(a), y2: y - 14 * Math.cos(a) }),
      el("svg:circle", { cx: x, cy: y, r: 7 }),
      el("svg:text", { x, y: y + 3, "text-anchor": "middle" }, h.rank));
    plot.append(g);
  }
  if (est) plot.append(el("svg:circle", { class: "est-dot", cx: X(est[0]), cy: Y(est[1]), r: 3.5 }));
  svg.append(plot);

  const bar = el("div", { class: "sketch-bar" }, el("strong", {}, "Map sketch"));
  if (est) {
    for (const [label, z] of [["near the estimate", true], ["all hits", false]]) {
      const b = el("button", { type: "button", "aria-pressed": z === zoom }, label);
      b.addEventListener("click", () => { sketchZoom = z; renderSketch(hits, q); });
      bar.append(b);
    }
  }
  const legend = est ? "blue: hits (rank, heading) · red: estimated location, 25 m circle" : "blue: hits (rank, heading)";
  const note = el("p", { class: "muted" }, `${legend} · ${shown.length} of ${hits.length} hits in view`);
  $("#map-sketch").replaceChildren(bar, svg, note);
}

// --- input: file picker, drag and drop, k --------------------------------------------------------

function init() {
  const drop = $("#drop"), input = $("#file");
  input.addEventListener("change", () => input.files[0] && search(input.files[0]));
  $("#k").addEventListener("change", () => currentFile && search(currentFile));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) search(file);
  });
  // A file dropped outside the box would make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  loadServiceInfo();
}

document.addEventListener("DOMContentLoaded", init);

// imgsearch page: upload a photo, POST /search, show the ranked map images, the location on a map of
// every map image, an optional position prior (a click on the map, or the browser's position) and the
// matches that verified a hit. Vanilla JS, no build step, no third-party code: every byte comes from
// this service.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
const M_PER_DEG = 111320; // metres per degree of latitude (and of longitude at the equator)
const RELEVANCE_M = 25; // the estimate's radius: a hit within it shows the same place
const MAX_LINES = 200; // the API lists at most this many matches per hit
const RADIUS_LIMITS = [1, 5000];

let currentFile = null;
let queryUrl = null;
let seq = 0; // only the latest search may draw its answer
let evidenceSeq = 0; // only the latest evidence may draw
let points = null; // /map/points, plus byId: id -> [lat, lon] and bounds
let mapNote = "";
let prior = null; // {lat, lon, radius, accuracy (null: the service's default)}
let answer = null; // the body of the search on show
let selectedId = null; // the hit whose matches the evidence panel draws
// "whole": every map image; "around": the estimate and the prior; "free": where wheel and drag left it.
const view = { mode: "whole", lat0: 0, lon0: 0, mpp: 1 };
let mapSize = { W: 0, H: 0 };

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
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));
const rad = (deg) => (deg * Math.PI) / 180;
const r1 = (x) => Math.round(x * 10) / 10; // what an attribute needs: 0.1 px
const isSize = (s) => Array.isArray(s) && s.length === 2 && s[0] > 0 && s[1] > 0;

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

// --- service info and the map images' positions ------------------------------------------------

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

async function loadPoints() {
  try {
    const r = await fetch("/map/points");
    const b = await r.json().catch(() => null);
    if (!r.ok || !b || !Array.isArray(b.ids)) throw new Error((b && b.detail) || `HTTP ${r.status}`);
    const byId = new Map();
    let s = 90, n = -90, w = 180, e = -180; // a loop, not Math.min(...): 200,000 arguments overflow the stack
    for (let i = 0; i < b.ids.length; i++) {
      const lat = b.latitude[i], lon = b.longitude[i];
      byId.set(b.ids[i], [lat, lon]);
      s = Math.min(s, lat); n = Math.max(n, lat); w = Math.min(w, lon); e = Math.max(e, lon);
    }
    points = { ...b, byId, bounds: b.ids.length ? { s, n, w, e } : null };
    mapNote = b.ids.length === 0 ? "The index has no map images." : "";
  } catch (err) {
    mapNote = `The positions of the map images are not available (${err.message}).`;
  }
  drawMap();
}

// --- search -------------------------------------------------------------------------------------

function searchUrl(k) {
  const q = new URLSearchParams({ k });
  if (prior) {
    q.set("lat", prior.lat.toFixed(7));
    q.set("lon", prior.lon.toFixed(7));
    q.set("radius_m", String(prior.radius));
    if (prior.accuracy !== null) q.set("accuracy_m", String(prior.accuracy));
  }
  q.set("explain", "true");
  return `/search?${q}`;
}

// fresh: a new photo (the map then turns to its answer); otherwise k or the prior changed.
async function search(file, fresh = false) {
  const mine = ++seq;
  currentFile = file;
  const k = $("#k").value;
  clearError();
  document.body.classList.add("busy");
  setStatus(`Searching the map for ${file.name}…`);
  if (fresh || !queryUrl) {
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = URL.createObjectURL(file);
  }

  const form = new FormData();
  form.append("file", file, file.name);
  let r, body;
  try {
    r = await fetch(searchUrl(k), { method: "POST", body: form });
    body = await r.json().catch(() => null);
  } catch {
    if (mine !== seq) return;
    failed(0, { code: "network_error", detail: "the service cannot be reached" });
    return;
  } finally {
    if (mine === seq) document.body.classList.remove("busy");
  }
  if (mine !== seq) return;
  if (!r.ok || !body || !Array.isArray(body.results) || !body.query_location) {
    failed(r.status, body);
    return;
  }
  answer = body;
  const verified = body.results.find((h) => Array.isArray(h.matches) && h.matches.length > 0);
  selectedId = verified ? verified.id : null;
  if (fresh) view.mode = estimate() || prior ? "around" : "whole";
  render(file, body);
  const echo = body.prior ? ` · ${fmt(body.prior.candidates)} map images within the prior` : "";
  setStatus(`${body.results.length} map images in ${fmt(body.took_ms)} ms${echo} · preset ${body.preset} · index ${body.index_version}`);
  // The positions were not available yet (the index was loading), or an image added online after
  // the page loaded is not on the map. (When the list is thinned, a missing id is expected: asking
  // again would not bring it.)
  if (!points || (points.shown === points.total && body.results.some((h) => !points.byId.has(h.id)))) {
    await loadPoints();
  }
}

function failed(status, body) {
  showError(status, body);
  setStatus("");
  $("#answer").hidden = true;
  answer = null;
  selectedId = null;
  drawMap();
}

function render(file, body) {
  $("#query-img").src = queryUrl;
  $("#query-name").textContent = file.name;
  renderLocation(body.query_location, body.results.length);
  const none = $("#no-hits");
  none.hidden = body.results.length > 0;
  none.textContent = prior ? `No map image lies within ${fmt(prior.radius)} m of the prior.` : "No map images.";
  $("#results").replaceChildren(...body.results.map(hitCard));
  $("#answer").hidden = false;
  renderPriorInfo();
  renderEvidence();
  drawMap();
}

function hitCard(h) {
  const bar = el("span");
  bar.style.width = `${Math.round(h.score * 100)}%`;
  const verified = h.inliers === null || h.inliers === undefined
    ? el("span", { class: "muted" }, "not verified")
    : el("span", { class: "verified", title: "RANSAC inliers of ORB matches with your photo" }, `${h.inliers} inliers`);
  const loc = h.location;
  const card = el("li", {
    class: "hit-card", "data-rank": h.rank, "data-id": h.id, "data-path": h.path, tabindex: 0,
    title: "show how it matches your photo",
  },
  el("img", { src: `/images/${encodeURIComponent(h.id)}/thumbnail`, alt: h.path, loading: "lazy" }),
  el("span", { class: "rank" }, `#${h.rank}`),
  el("div", { class: "body" },
    el("div", { class: "score", title: "predicted probability that it shows the same place" },
      `score ${h.score.toFixed(3)}`, el("span", { class: "bar" }, bar)),
    el("div", { class: "meta" }, verified, ` · distance ${h.distance.toFixed(3)}`),
    el("div", { class: "meta" }, `E ${fmt(loc.easting, 1)} · N ${fmt(loc.northing, 1)} · ${fmt(loc.heading)}°`),
    el("div", { class: "path" }, `id ${h.id} · ${h.path}`)));
  card.classList.toggle("selected", h.id === selectedId);
  card.addEventListener("click", () => select(h.id));
  card.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(h.id); }
  });
  return card;
}

function select(id) {
  selectedId = id;
  for (const c of document.querySelectorAll("#results .hit-card")) c.classList.toggle("selected", Number(c.dataset.id) === id);
  renderEvidence();
  drawMap();
}

function renderLocation(q, nHits) {
  const box = $("#location");
  box.replaceChildren();
  box.className = `location ${q.status}`;
  box.dataset.status = q.status;
  if (q.status !== "estimated") {
    const why = nHits === 0 && prior
      ? `No map image lies within ${fmt(prior.radius)} m of the prior.`
      : `No map image is likely enough to show this place (best score ${q.confidence.toFixed(2)}, needs 0.50).`;
    box.append(el("h3", {}, "Location: unknown"), el("p", { class: "muted" }, why));
    return;
  }
  const osm = `https://www.openstreetmap.org/?mlat=${q.latitude.toFixed(6)}&mlon=${q.longitude.toFixed(6)}#map=18/${q.latitude.toFixed(6)}/${q.longitude.toFixed(6)}`;
  const rows = [
    ["latitude, longitude", `${q.latitude.toFixed(6)}, ${q.longitude.toFixed(6)}`],
    ["UTM easting", `${fmt(q.easting, 1)} m`],
    ["UTM northing", `${fmt(q.northing, 1)} m`],
    ["heading", `${fmt(q.heading)}°`],
  ];
  // Absent from a service that does not estimate it; null when it cannot say.
  if ("heading_confidence" in q) {
    const hc = q.heading_confidence;
    rows.push(["heading confidence", hc === null || hc === undefined ? "not known" : hc.toFixed(2)]);
  }
  rows.push(["confidence", q.confidence.toFixed(2)], ["support", `${q.support} hit${q.support === 1 ? "" : "s"} within 25 m`]);
  const dl = el("dl");
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
  box.append(el("h3", {}, "Probably taken here"), dl,
    el("p", { class: "muted" }, el("a", { href: osm, target: "_blank", rel: "noopener noreferrer" }, "open in OpenStreetMap")));
}

// --- evidence: the selected hit's matches, drawn between the two images -------------------------

function loaded(src) {
  const img = new Image();
  img.src = src;
  return img.decode().then(() => img);
}

async function renderEvidence() {
  const mine = ++evidenceSeq;
  const box = $("#evidence");
  const hit = answer ? answer.results.find((h) => h.id === selectedId) : undefined;
  const head = el("h2", {}, "Why it matches");
  box.dataset.count = "0";
  delete box.dataset.id;
  const nothing = (why) => box.replaceChildren(head, el("p", { class: "muted", "data-role": "no-matches" }, why));
  if (!hit || !Array.isArray(hit.matches) || hit.matches.length === 0 || !isSize(hit.image_size)) {
    let why = "no matches to show";
    if (hit) why += ` for #${hit.rank}: ${hit.inliers === null || hit.inliers === undefined ? "not verified" : "no matches listed"}`;
    else if (answer && answer.results.length) why += ": no hit was verified against your photo";
    nothing(why);
    return;
  }
  const thumbUrl = `/images/${encodeURIComponent(hit.id)}/thumbnail`;
  let thumb, photo;
  try {
    [thumb, photo] = await Promise.all([loaded(thumbUrl), loaded(queryUrl)]);
  } catch {
    if (mine === evidenceSeq) nothing(`no matches to show: the images of #${hit.rank} cannot be shown`);
    return;
  }
  if (mine !== evidenceSeq) return;
  // The matches' pixels refer to the upright photo (query_size) and the full map image (image_size).
  const [qw, qh] = isSize(answer.query_size) ? answer.query_size : [photo.naturalWidth, photo.naturalHeight];
  const tw = thumb.naturalWidth, th = thumb.naturalHeight;
  const GAP = 16;
  const fullW = (th * qw) / qh + GAP + tw; // the photo as tall as the thumbnail
  const f = Math.min(1, Math.max(200, box.clientWidth) / fullW);
  const H = th * f, qW = ((th * qw) / qh) * f, mX = qW + GAP * f, mW = tw * f, W = fullW * f;
  const sq = qW / qw, sm = mW / hit.image_size[0];

  const pair = el("div", { class: "pair", "data-role": "pair" });
  const qImg = el("img", { class: "ev-query", src: queryUrl, alt: "your photo" });
  const mImg = el("img", { class: "ev-map", src: thumbUrl, alt: `map image #${hit.rank}` });
  // Sizes through the CSSOM: the page's CSP refuses style attributes.
  pair.style.width = `${W}px`;
  pair.style.height = `${H}px`;
  Object.assign(qImg.style, { left: "0px", width: `${qW}px`, height: `${H}px` });
  Object.assign(mImg.style, { left: `${mX}px`, width: `${mW}px`, height: `${th * f}px` });
  const lines = el("svg:g", { "data-role": "matches" });
  for (const m of hit.matches.slice(0, MAX_LINES)) {
    lines.append(el("svg:line", {
      class: "match",
      x1: r1(m.query[0] * sq), y1: r1(m.query[1] * sq), x2: r1(mX + m.map[0] * sm), y2: r1(m.map[1] * sm),
    }));
  }
  const svg = el("svg:svg", { class: "ev-lines", viewBox: `0 0 ${W} ${H}`, width: W, height: H, "aria-hidden": "true" }, lines);
  pair.append(qImg, mImg, svg);

  const n = hit.matches.length;
  const parts = [el("strong", { "data-role": "match-count" }, `${n} match${n === 1 ? "" : "es"}`),
    ` between your photo (left) and #${hit.rank}, map image ${hit.id} (right)`];
  const t = hit.transform;
  if (Array.isArray(t) && t.length === 2) {
    // A similarity [[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]: its scale and rotation.
    const s = Math.hypot(t[0][0], t[1][0]), a = (Math.atan2(t[1][0], t[0][0]) * 180) / Math.PI;
    parts.push(` · the photo maps onto it scaled ×${s.toFixed(2)}, turned ${a.toFixed(1)}°`);
  }
  box.replaceChildren(head, el("p", { class: "muted" }, ...parts), pair);
  box.dataset.count = String(Math.min(n, MAX_LINES));
  box.dataset.id = String(hit.id);
}

// --- the prior ----------------------------------------------------------------------------------

// The radius and accuracy inputs: {radius, accuracy} or {why} when one is not acceptable.
function priorInputs() {
  const rIn = $("#radius"), aIn = $("#accuracy");
  const radius = Number(rIn.value);
  if (rIn.value.trim() === "" || !Number.isFinite(radius) || radius < RADIUS_LIMITS[0] || radius > RADIUS_LIMITS[1]) {
    return { why: `The radius must be ${RADIUS_LIMITS[0]} to ${fmt(RADIUS_LIMITS[1])} m.` };
  }
  if (aIn.value.trim() === "") return { radius, accuracy: null };
  const accuracy = Number(aIn.value);
  if (!Number.isFinite(accuracy) || accuracy <= 0 || accuracy > RADIUS_LIMITS[1]) {
    return { why: `The accuracy must be above 0 and at most ${fmt(RADIUS_LIMITS[1])} m (empty: radius / 3).` };
  }
  return { radius, accuracy };
}

function setPrior(lat, lon) {
  const p = priorInputs();
  if (p.why) { renderPriorInfo(p.why); return; }
  prior = { lat, lon, radius: p.radius, accuracy: p.accuracy };
  priorChanged();
}

function priorChanged() {
  renderPriorInfo();
  $("#clear-prior").disabled = !prior;
  drawMap();
  if (currentFile) search(currentFile);
}

function renderPriorInfo(note) {
  const box = $("#prior-info");
  box.classList.toggle("warn", Boolean(note));
  if (note) { box.textContent = note; return; }
  if (!prior) { box.textContent = "No prior: the whole map is searched."; return; }
  const acc = prior.accuracy === null ? `accuracy ${fmt(prior.radius / 3, 1)} m (radius / 3)` : `accuracy ${fmt(prior.accuracy, 1)} m`;
  let text = `Prior: ${prior.lat.toFixed(6)}, ${prior.lon.toFixed(6)} · radius ${fmt(prior.radius, 1)} m · ${acc}`;
  // The service's echo, if this answer was made with this very prior.
  const e = answer && answer.prior;
  if (e && Math.abs(e.latitude - prior.lat) < 1e-6 && Math.abs(e.longitude - prior.lon) < 1e-6 && e.radius_m === prior.radius) {
    text += ` · ${fmt(e.candidates)} map image${e.candidates === 1 ? "" : "s"} inside`;
  }
  box.textContent = text;
}

function usePosition() {
  if (!navigator.geolocation) { renderPriorInfo("This browser cannot tell its position."); return; }
  renderPriorInfo("Asking the browser for your position…");
  navigator.geolocation.getCurrentPosition(
    (pos) => {
      const acc = pos.coords.accuracy;
      // The fix is within about its accuracy: search three times that far (20 m to 5 km).
      const radius = r1(clamp(acc * 3, 20, RADIUS_LIMITS[1]));
      const accuracy = acc > 0 ? r1(Math.min(Math.max(acc, 0.1), RADIUS_LIMITS[1])) : null;
      $("#radius").value = String(radius);
      $("#accuracy").value = accuracy === null ? "" : String(accuracy);
      prior = { lat: pos.coords.latitude, lon: pos.coords.longitude, radius, accuracy };
      view.mode = "around";
      priorChanged();
    },
    (err) => renderPriorInfo(`Your position is not available: ${err.message || "permission denied"}.`),
    { enableHighAccuracy: true, timeout: 15000, maximumAge: 60000 },
  );
}

function priorInputChanged() {
  const p = priorInputs();
  if (p.why) { renderPriorInfo(p.why); return; }
  if (!prior) { renderPriorInfo(); return; }
  if (p.radius === prior.radius && p.accuracy === prior.accuracy) return;
  prior = { ...prior, radius: p.radius, accuracy: p.accuracy };
  priorChanged();
}

// --- the map: local equirectangular projection around the view's centre, metres on both axes ----

function estimate() {
  const q = answer && answer.query_location;
  if (!q || q.status !== "estimated" || typeof q.latitude !== "number" || typeof q.longitude !== "number") return null;
  return { lat: q.latitude, lon: q.longitude, heading: q.heading, confidence: q.confidence };
}

function projection() {
  const { W, H } = mapSize;
  const kx = M_PER_DEG * Math.cos(rad(view.lat0)), ky = M_PER_DEG;
  return {
    x: (lon) => W / 2 + ((lon - view.lon0) * kx) / view.mpp,
    y: (lat) => H / 2 - ((lat - view.lat0) * ky) / view.mpp,
    lon: (x) => view.lon0 + ((x - W / 2) * view.mpp) / kx,
    lat: (y) => view.lat0 - ((y - H / 2) * view.mpp) / ky,
    px: (m) => m / view.mpp,
  };
}

// A lat/lon box of `r` metres around a point; unions of them.
function box(lat, lon, r) {
  const dlat = r / M_PER_DEG, dlon = r / (M_PER_DEG * Math.cos(rad(lat)));
  return { s: lat - dlat, n: lat + dlat, w: lon - dlon, e: lon + dlon };
}

function union(a, b) {
  if (!a) return b;
  if (!b) return a;
  return { s: Math.min(a.s, b.s), n: Math.max(a.n, b.n), w: Math.min(a.w, b.w), e: Math.max(a.e, b.e) };
}

function fit(b, minSpan) {
  const { W, H } = mapSize, PAD = 28;
  view.lat0 = (b.s + b.n) / 2;
  view.lon0 = (b.w + b.e) / 2;
  const spanX = Math.max((b.e - b.w) * M_PER_DEG * Math.cos(rad(view.lat0)), minSpan);
  const spanY = Math.max((b.n - b.s) * M_PER_DEG, minSpan);
  view.mpp = Math.max(spanX / Math.max(W - 2 * PAD, 50), spanY / Math.max(H - 2 * PAD, 50));
}

function applyView() {
  if (view.mode === "free") return;
  const est = estimate();
  if (view.mode === "around" && (prior || est)) {
    let b = prior ? box(prior.lat, prior.lon, prior.radius * 1.1) : null;
    if (est) b = union(b, box(est.lat, est.lon, 50));
    fit(b, 100);
    return;
  }
  // The whole map leaves the prior out, so that a click on it does not move it.
  const b = (points && points.bounds) || (prior && box(prior.lat, prior.lon, prior.radius * 1.1)) || (est && box(est.lat, est.lon, 60));
  if (b) fit(b, 50);
}

function niceLength(m) {
  const p = 10 ** Math.floor(Math.log10(m));
  return [5, 2, 1].map((x) => x * p).find((s) => s <= m) || p;
}

function drawMap() {
  const host = $("#map");
  const W = Math.max(280, Math.round(host.clientWidth || 640));
  const H = Math.round(clamp(W * 0.6, 260, 620));
  mapSize = { W, H };
  applyView();
  const P = projection();
  const svg = el("svg:svg", { id: "map-svg", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": "map of the map images, the hits, the estimate and the prior" });
  svg.append(el("svg:rect", { class: "bg", width: W, height: H }));

  // Every map image as a dot: one path of zero-length strokes with round caps, not thousands of nodes.
  if (points) {
    const d = [];
    for (let i = 0; i < points.ids.length; i++) {
      const x = P.x(points.longitude[i]), y = P.y(points.latitude[i]);
      if (x > -4 && y > -4 && x < W + 4 && y < H + 4) d.push(`M${r1(x)} ${r1(y)}h0`);
    }
    svg.append(el("svg:path", { class: "pts", "data-role": "map-points", "data-count": d.length, d: d.join("") }));
  }

  if (prior) {
    svg.append(el("svg:circle", { class: "prior-area", "data-role": "prior", cx: r1(P.x(prior.lon)), cy: r1(P.y(prior.lat)),
      r: r1(Math.max(2, P.px(prior.radius))) }, el("svg:title", {}, `prior: within ${fmt(prior.radius, 1)} m of here`)));
  }

  const est = estimate();
  if (est) {
    const x = P.x(est.lon), y = P.y(est.lat), r = P.px(RELEVANCE_M);
    const g = el("svg:g", { class: "est-group" },
      el("svg:circle", { class: "est", "data-role": "estimate", cx: r1(x), cy: r1(y), r: r1(Math.max(4, r)), "stroke-dasharray": "5 4" },
        el("svg:title", {}, `estimated location (25 m radius), confidence ${est.confidence.toFixed(2)}`)));
    if (typeof est.heading === "number") {
      const a = rad(est.heading), dx = Math.sin(a), dy = -Math.cos(a); // compass: 0 = north, clockwise
      const len = Math.max(r, 16) + 12, tx = x + len * dx, ty = y + len * dy;
      const bx = tx - 9 * dx, by = ty - 9 * dy;
      g.append(el("svg:line", { class: "est-heading", "data-role": "estimate-heading", x1: r1(x), y1: r1(y), x2: r1(bx), y2: r1(by) }),
        el("svg:polygon", { class: "est-arrow", points: `${r1(tx)},${r1(ty)} ${r1(bx - 5 * dy)},${r1(by + 5 * dx)} ${r1(bx + 5 * dy)},${r1(by - 5 * dx)}` }));
    }
    g.append(el("svg:circle", { class: "est-dot", cx: r1(x), cy: r1(y), r: 3.5 }));
    svg.append(g);
  }

  // Worst first, so the best hits are drawn on top; a hit whose position is not listed is left out.
  const hits = answer ? answer.results : [];
  let placed = 0;
  for (const h of [...hits].reverse()) {
    const ll = points && points.byId.get(h.id);
    if (!ll) continue;
    placed += 1;
    const x = P.x(ll[1]), y = P.y(ll[0]), a = rad(h.location.heading);
    svg.append(el("svg:g", { class: h.id === selectedId ? "hit selected" : "hit", "data-rank": h.rank, "data-id": h.id },
      el("svg:title", {}, `#${h.rank} id ${h.id} · score ${h.score.toFixed(3)}`),
      el("svg:line", { x1: r1(x), y1: r1(y), x2: r1(x + 15 * Math.sin(a)), y2: r1(y - 15 * Math.cos(a)) }),
      el("svg:circle", { cx: r1(x), cy: r1(y), r: 7.5 }),
      el("svg:text", { x: r1(x), y: r1(y + 3), "text-anchor": "middle" }, h.rank)));
  }

  if (prior) {
    svg.append(el("svg:circle", { class: "prior-dot", "data-role": "prior-marker", cx: r1(P.x(prior.lon)), cy: r1(P.y(prior.lat)), r: 5.5 }));
  }

  // Scale bar (bottom left) and north (top right).
  const metres = niceLength(view.mpp * W / 5), len = P.px(metres);
  const sy = H - 14;
  svg.append(el("svg:g", { class: "scale", "data-role": "scale", "data-metres": metres, "data-px": r1(len) },
    el("svg:rect", { class: "scale-bg", x: 6, y: sy - 18, width: r1(len + 12), height: 26, rx: 4 }),
    el("svg:path", { d: `M12 ${sy - 5}V${sy}H${r1(12 + len)}V${sy - 5}` }),
    el("svg:text", { x: r1(12 + len / 2), y: sy - 6, "text-anchor": "middle" }, metres >= 1000 ? `${fmt(metres / 1000)} km` : `${fmt(metres)} m`)));
  svg.append(el("svg:g", { class: "north" },
    el("svg:polygon", { points: `${W - 20},10 ${W - 26},26 ${W - 20},22 ${W - 14},26` }),
    el("svg:text", { x: W - 20, y: 38, "text-anchor": "middle" }, "N")));

  const notes = [];
  if (mapNote) notes.push(mapNote);
  if (placed < hits.length) notes.push(`${hits.length - placed} of ${hits.length} hits are not on the map: their positions are not listed.`);
  host.replaceChildren(svg, el("p", { class: "muted map-note" }, notes.join(" ")));

  const around = $("#view-around");
  around.disabled = !(prior || est);
  around.textContent = est && prior ? "around estimate & prior" : prior ? "around the prior" : "around the estimate";
  around.setAttribute("aria-pressed", String(view.mode === "around"));
  $("#view-whole").setAttribute("aria-pressed", String(view.mode === "whole"));
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawMap(); });
}

// A pointer event's position in the map's own units (its viewBox), or null outside it.
function mapPoint(e) {
  const svg = $("#map svg");
  if (!svg) return null;
  const r = svg.getBoundingClientRect();
  if (!r.width || !r.height) return null;
  const x = ((e.clientX - r.left) * mapSize.W) / r.width, y = ((e.clientY - r.top) * mapSize.H) / r.height;
  return x >= 0 && y >= 0 && x <= mapSize.W && y <= mapSize.H ? { x, y, scale: mapSize.W / r.width } : null;
}

function initMap() {
  const host = $("#map");
  let drag = null;
  host.addEventListener("pointerdown", (e) => {
    const p = e.button === 0 ? mapPoint(e) : null;
    if (p) drag = { x: e.clientX, y: e.clientY, lat0: view.lat0, lon0: view.lon0, scale: p.scale, moved: false, id: e.pointerId };
  });
  host.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = (e.clientX - drag.x) * drag.scale, dy = (e.clientY - drag.y) * drag.scale;
    if (!drag.moved && Math.hypot(dx, dy) < 5) return; // a click that trembled is still a click
    if (!drag.moved) { drag.moved = true; host.setPointerCapture(drag.id); host.classList.add("dragging"); }
    view.mode = "free";
    view.lat0 = drag.lat0 + (dy * view.mpp) / M_PER_DEG;
    view.lon0 = drag.lon0 - (dx * view.mpp) / (M_PER_DEG * Math.cos(rad(drag.lat0)));
    scheduleDraw();
  });
  host.addEventListener("pointerup", (e) => {
    const d = drag;
    drag = null;
    host.classList.remove("dragging");
    if (!d || d.moved) return;
    // A click: the prior is the clicked point.
    const p = mapPoint(e);
    if (!p) return;
    const P = projection();
    setPrior(P.lat(p.y), P.lon(p.x));
  });
  host.addEventListener("pointercancel", () => { drag = null; host.classList.remove("dragging"); });
  host.addEventListener("wheel", (e) => {
    const p = mapPoint(e);
    if (!p) return;
    e.preventDefault();
    const P = projection();
    const lat = P.lat(p.y), lon = P.lon(p.x);
    view.mpp = clamp(view.mpp * Math.exp(e.deltaY * 0.0015), 0.02, 20000);
    // Zoom about the pointer: the point under it stays there.
    view.lat0 = lat + ((p.y - mapSize.H / 2) * view.mpp) / M_PER_DEG;
    view.lon0 = lon - ((p.x - mapSize.W / 2) * view.mpp) / (M_PER_DEG * Math.cos(rad(view.lat0)));
    view.mode = "free";
    scheduleDraw();
  }, { passive: false });
  // Redrawn at the width it gets: one unit of the map is one CSS pixel.
  new ResizeObserver(() => { if (Math.round(host.clientWidth) !== mapSize.W) scheduleDraw(); }).observe(host);
  $("#view-around").addEventListener("click", () => { view.mode = "around"; drawMap(); });
  $("#view-whole").addEventListener("click", () => { view.mode = "whole"; drawMap(); });
  $("#use-position").addEventListener("click", usePosition);
  $("#clear-prior").addEventListener("click", () => { prior = null; if (view.mode === "around" && !estimate()) view.mode = "whole"; priorChanged(); });
  for (const id of ["#radius", "#accuracy"]) $(id).addEventListener("change", priorInputChanged);
  drawMap();
}

// --- input: file picker, drag and drop, k --------------------------------------------------------

function init() {
  const drop = $("#drop"), input = $("#file");
  input.addEventListener("change", () => input.files[0] && search(input.files[0], true));
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
    if (file) search(file, true);
  });
  // A file dropped outside the box would make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  initMap();
  loadServiceInfo();
  loadPoints();
}

document.addEventListener("DOMContentLoaded", init);

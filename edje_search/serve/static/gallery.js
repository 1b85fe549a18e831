// edje-search gallery: text or image search, reranked vs first-stage order, a viewer per image.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { result: null, order: "reranked", kind: "text" };

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    const retry = response.headers.get("Retry-After");
    throw new Error(retry ? `${message} (retry after ${retry} s)` : message);
  }
  return body;
}

async function loadInfo() {
  try {
    const info = await api("info");
    $("index-info").textContent = `${info.images} images · model ${info.model_name} · generation ${info.generation}`;
    $("query").maxLength = info.limits.max_query_chars;
    $("k").max = info.limits.max_k;
    $("rerank-k").max = info.limits.max_rerank_k;
    $("rerank-k").value = info.default_rerank_k;
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
  }
}

function moveBadge(hit) {
  // reranked view: how many places reranking moved the image (first-stage rank -> reranked rank)
  const span = document.createElement("span");
  span.className = "move";
  if (state.kind !== "text") return span;
  if (state.order === "reranked") {
    const d = hit.first_stage_rank - hit.rank;
    span.classList.add(d > 0 ? "up" : d < 0 ? "down" : "same");
    span.textContent = d > 0 ? `▲ ${d}` : d < 0 ? `▼ ${-d}` : "=";
    span.title = `first stage #${hit.first_stage_rank} → reranked #${hit.rank}`;
  } else {
    span.classList.add("same");
    span.textContent = `→ #${hit.rank}`;
    span.title = `reranked position ${hit.rank}`;
  }
  return span;
}

function card(hit) {
  const el = document.createElement("div");
  el.className = "card";
  el.tabIndex = 0;
  el.dataset.row = hit.row;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.src = hit.thumbnail_url;
  img.alt = hit.path.split("/").pop();
  img.loading = "lazy";
  img.decoding = "async";
  thumb.appendChild(img);
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${state.order === "first" ? hit.first_stage_rank : hit.rank}`;
  const scores = document.createElement("span");
  scores.className = "scores";
  scores.textContent = state.kind === "text"
    ? `prob ${fmt(hit.prob, 2)} · score ${fmt(hit.score)} · first ${fmt(hit.first_stage_score)}`
    : `similarity ${fmt(hit.first_stage_score)}`;
  meta.append(rank, moveBadge(hit), scores);
  el.append(thumb, meta);
  el.addEventListener("click", () => openViewer(hit));
  el.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openViewer(hit); });
  return el;
}

function render() {
  const r = state.result;
  const grid = $("grid");
  grid.replaceChildren();
  if (!r) return;
  const hits = state.kind === "text" && state.order === "first" ? r.first_stage : r.hits;
  for (const hit of hits) grid.appendChild(card(hit));
  $("order-reranked").classList.toggle("active", state.order === "reranked");
  $("order-first").classList.toggle("active", state.order === "first");
  $("order-reranked").setAttribute("aria-pressed", state.order === "reranked");
  $("order-first").setAttribute("aria-pressed", state.order === "first");
  $("order-first").disabled = state.kind !== "text";
  $("order-reranked").disabled = state.kind !== "text";
  const t = r.timings;
  const stages = Object.entries(t.stages_ms).map(([name, ms]) =>
    `<span class="stage">${name} <b>${ms.toFixed(1)}</b> ms</span>`);
  stages.push(`<span class="stage">queue <b>${t.queue_ms.toFixed(1)}</b> ms</span>`);
  stages.push(`<span class="stage">batch <b>${t.batch_queries}</b></span>`);
  $("timings").innerHTML = stages.join("");
  if (state.kind === "text") {
    const moved = r.hits.filter((h) => h.first_stage_rank !== h.rank).length;
    $("summary").textContent = `${r.hits.length} results · reranking moved ${moved} of them`;
  } else {
    $("summary").textContent = `${r.hits.length} nearest images by first-stage embedding`;
  }
  $("toolbar").hidden = false;
}

function quoted(text) {
  // a string literal of the filter language: backslash before quotes and backslashes
  return `"${text.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

function filterExpression() {
  // the filter fields, combined into one `where` expression (the server parses and binds it)
  const parts = [];
  const folder = $("f-folder").value.trim();
  if (folder) parts.push(`folder glob ${quoted(/[*?[]/.test(folder) ? folder : `*${folder}*`)}`);
  if ($("f-from").value) parts.push(`taken >= ${quoted($("f-from").value)}`);
  if ($("f-to").value) parts.push(`taken <= ${quoted($("f-to").value)}`);
  const camera = $("f-camera").value.trim();
  if (camera) parts.push(`(make = ${quoted(camera)} or model = ${quoted(camera)})`);
  const where = $("f-where").value.trim();
  if (where) parts.push(`(${where})`);
  return parts.join(" and ");
}

function minProb() {
  // the slider's value, or null at 0 (no cutoff)
  const p = Number($("min-prob").value);
  return p > 0 ? p : null;
}

function showFilter(where) {
  $("active-filter").hidden = !where;
  $("active-filter").textContent = where ? `filter: ${where}` : "";
}

async function searchText(ev) {
  if (ev) ev.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  const where = filterExpression();
  const params = new URLSearchParams({ q, k: $("k").value, rerank_k: $("rerank-k").value });
  if (where) params.set("where", where);
  const cutoff = minProb();
  if (cutoff !== null) params.set("min_prob", cutoff);
  if ($("sort").value) params.set("sort", $("sort").value);
  showFilter(where);
  setStatus("searching…");
  try {
    state.result = await api(`search?${params}`);
    state.kind = "text";
    const none = !state.result.hits.length;
    setStatus(none && cutoff !== null ? "no image matches"
      : none && where ? "no image passes the filter" : "");
    render();
  } catch (e) {
    setStatus(e.message, true);
  }
}

function showMinProb() {
  const p = minProb();
  $("min-prob-value").textContent = p === null ? "off" : p.toFixed(2);
}

async function searchImage(form) {
  form.append("k", $("k").value);
  const where = filterExpression();
  if (where) form.append("where", where);
  showFilter(where);
  setStatus("searching by image…");
  try {
    state.result = await api("search/image", { method: "POST", body: form });
    state.kind = "image";
    state.order = "reranked";
    const like = state.result.query_row !== null ? `images like row ${state.result.query_row}` : "";
    setStatus(where && !state.result.hits.length ? `${like ? `${like}: ` : ""}no image passes the filter` : like);
    render();
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function showDuplicates() {
  setStatus("looking for duplicates…");
  try {
    const found = await api("duplicates");
    const groups = [...found.exact, ...found.near];
    state.result = null;
    render();
    $("toolbar").hidden = true;
    const grid = $("grid");
    for (const g of groups) grid.appendChild(groupCard(g));
    setStatus(groups.length ? `${found.exact.length} groups of exact copies, ${found.near.length} of near-duplicates`
      + ` (similarity ≥ ${found.threshold})` : "no duplicates");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function groupCard(group) {
  // one duplicate group: its first image and how many there are; a click shows them all
  const plain = card({ ...group.images[0], first_stage_score: group.similarity, rank: 1, first_stage_rank: 1 });
  const fresh = plain.cloneNode(true);  // a copy without the plain card's viewer handlers
  fresh.classList.add("group");
  fresh.querySelector(".move").remove();
  fresh.querySelector(".rank").textContent = `${group.images.length} images`;
  fresh.querySelector(".scores").textContent = group.kind === "exact" ? "exact copies"
    : `near-duplicates · ${fmt(group.similarity, 4)}`;
  const open = () => {
    state.kind = "group";
    state.result = { hits: group.images.map((img, i) => ({ ...img, rank: i + 1, first_stage_score: group.similarity })),
                     first_stage: [], timings: { stages_ms: {}, queue_ms: 0, batch_queries: 0 } };
    render();
    $("summary").textContent = `${group.images.length} ${group.kind === "exact" ? "exact copies" : "near-duplicates"}`;
    setStatus("");
  };
  fresh.addEventListener("click", open);
  fresh.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
  return fresh;
}

function openViewer(hit) {
  $("viewer-image").src = hit.image_url;
  $("viewer-image").alt = hit.path;
  const table = $("viewer-scores");
  table.replaceChildren();
  const entries = state.kind === "text"
    ? [["reranked rank", hit.rank], ["first-stage rank", hit.first_stage_rank],
       ["match probability", fmt(hit.prob)], ["score", fmt(hit.score)],
       ["rerank score", fmt(hit.rerank_score)], ["first-stage score", fmt(hit.first_stage_score, 4)], ["row", hit.row]]
    : [["rank", hit.rank], ["similarity", fmt(hit.first_stage_score, 4)], ["row", hit.row]];
  for (const [name, value] of entries) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = name;
    const td = document.createElement("td");
    td.textContent = value;
    tr.append(th, td);
    table.appendChild(tr);
  }
  $("viewer-path").textContent = hit.path;
  $("viewer-similar").onclick = () => {
    $("viewer").close();
    const form = new FormData();
    form.append("row", hit.row);
    searchImage(form);
  };
  $("viewer").showModal();
}

function setOrder(order) {
  if (state.kind !== "text") return;
  state.order = order;
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", searchText);
  $("order-reranked").addEventListener("click", () => setOrder("reranked"));
  $("order-first").addEventListener("click", () => setOrder("first"));
  $("duplicates-button").addEventListener("click", showDuplicates);
  $("min-prob").addEventListener("input", showMinProb);
  for (const id of ["min-prob", "sort"]) {  // a new cutoff or order searches again at once
    $(id).addEventListener("change", () => { if ($("query").value.trim()) searchText(); });
  }
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    searchImage(form);
    $("upload").value = "";
  });
  loadInfo();
});

// The search page: the index's slides, a Deep Zoom viewer, searches by upload or drawn region.
// Everything it shows comes from the JSON API under /api/ (see /docs); slides go by their index id.
"use strict";

const $ = (selector) => document.querySelector(selector);
const PAGE_SIZE = 100;  // slides asked for at a time: the list grows by a page as one scrolls to its end
const FILTER_DELAY_MS = 250;  // the name search asks the server once typing pauses this long
const state = {
  summary: null, slides: new Map(), search: null,  // slides: every slide row the page has read, by id
  list: { query: "", rows: [], total: null, loading: false, generation: 0 },  // the slide list, as far as read
  viewer: null, slideId: null, pendingBox: null,
  drawing: false, drawStart: null, region: null, regionBox: null, heatItem: null, heatUrl: null,
};

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function api(url, options = {}) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail
        : (body.detail || []).map((item) => `${item.loc.slice(-1)[0]}: ${item.msg}`).join("; ");
    } catch (error) { /* not JSON: keep the status text */ }
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return response;
}

const similarity = (value) => value.toFixed(3);

// ------------------------------------------------------------------ the index and its slides
// The list asks the server for one page of slides at a time (filtered by name there): an archive's
// 100,000 slides are never all read. A sentinel after the last item loads the next page when it
// scrolls into view.
async function loadIndex() {
  const listed = resetSlideList();  // the list's first page and the summary are asked for together
  const summary = await (await api("/api/index")).json();
  state.summary = summary;
  $("#summary").textContent = `${summary.slides} slide(s), ${summary.patches.toLocaleString()} patches of `
    + `${summary.patch_size} px at ${summary.mpp} µm/px · ${summary.model_name} · ${summary.index_type} index`;
  $("#upload-hint").textContent = `A patch at ${summary.mpp} µm/px (about ${summary.patch_size} px); the model `
    + `sees its central ${summary.crop_size} px. PNG, JPEG or TIFF, at most 20 MB and 4096 x 4096 pixels.`;
  if (summary.folders) {
    const shown = 20;
    const folders = await (await api(`/api/slides?kind=folder&limit=${shown}`)).json();
    $("#folders").textContent = `Also indexed: ${summary.folders} folder(s) of patch images (`
      + folders.map((f) => f.name).join(", ") + (summary.folders > shown ? ", …" : "") + ").";
  }
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadSlides();
  }, { root: $("aside"), rootMargin: "200px" }).observe($("#more"));
  await listed;
}

// Start the list again for the filter's text, from its first page.
async function resetSlideList() {
  const list = state.list;
  list.generation += 1;
  list.query = $("#filter").value.trim();
  list.rows = [];
  list.total = null;
  list.loading = false;
  $("#slide-list").replaceChildren();
  await loadSlides();
}

// The list's next page, unless it is being read or complete; an answer for an older filter is dropped.
async function loadSlides() {
  const list = state.list;
  if (list.loading || (list.total !== null && list.rows.length >= list.total)) return;
  list.loading = true;
  const generation = list.generation;
  const params = new URLSearchParams({ kind: "slide", offset: list.rows.length, limit: PAGE_SIZE });
  if (list.query) params.set("q", list.query);
  try {
    const response = await api(`/api/slides?${params}`);
    const rows = await response.json();
    if (generation !== list.generation) return;
    list.total = Number(response.headers.get("X-Total-Count"));
    list.rows.push(...rows);
    for (const slide of rows) state.slides.set(slide.id, slide);
    appendSlides(rows);
  } catch (error) {
    if (generation === list.generation) setStatus(`The slides could not be listed: ${error.message}`, true);
    return;
  } finally {
    if (generation === list.generation) list.loading = false;
  }
  const more = $("#more");  // still in view after this page (a tall window): the observer will not fire again
  more.hidden = list.rows.length >= list.total;
  if (!more.hidden) {
    const box = more.getBoundingClientRect(), aside = $("aside").getBoundingClientRect();
    if (box.top < aside.bottom + 200) loadSlides();
  }
}

function appendSlides(rows) {
  const list = $("#slide-list");
  for (const slide of rows) {
    const link = element("a", { href: `#/slide/${slide.id}`, "data-slide": slide.id,
                                class: slide.id === state.slideId ? "open" : "" },
      element("img", { src: slide.thumbnail_url, alt: "", loading: "lazy" }),
      element("div", {}, slide.name,
        element("small", {}, `${slide.width.toLocaleString()} × ${slide.height.toLocaleString()} px · `
          + `${slide.patch_count} patches`
          + (slide.label ? ` · ${slide.label}${slide.patient ? ` (patient ${slide.patient})` : ""}` : ""))));
    list.append(element("li", {}, link));
  }
  const { rows: shown, total, query } = state.list;
  if (!total) list.replaceChildren(element("li", { class: "hint" }, query ? "No slide matches." : "No slides indexed."));
  $("#slide-count").textContent = total ? `${shown.length.toLocaleString()} of ${total.toLocaleString()} slide(s)`
    + (query ? ` matching “${query}”` : "") : "";
}

function markOpenSlide() {
  for (const link of document.querySelectorAll("#slide-list a[data-slide]")) {
    link.classList.toggle("open", Number(link.dataset.slide) === state.slideId);
  }
}

// A slide's row: from the list when it was read there, else asked for (a link may name any slide).
async function slideRow(id) {
  if (!state.slides.has(id)) {
    try {
      state.slides.set(id, await (await api(`/api/slides/${id}`)).json());
    } catch (error) {
      return null;
    }
  }
  return state.slides.get(id);
}

// ------------------------------------------------------------------ the viewer
function imageRect(box) {
  return state.viewer.viewport.imageToViewportRectangle(box.x, box.y, box.width, box.height);
}

function createViewer() {
  const viewer = OpenSeadragon({
    element: $("#viewer"), prefixUrl: "/vendor/openseadragon/images/", showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT", animationTime: 0.4, maxZoomPixelRatio: 2, gestureSettingsMouse: { clickToZoom: false },
  });
  viewer.addHandler("open", () => {
    drawOverlays();
    if (state.pendingBox) goTo(state.pendingBox);
    state.pendingBox = null;
    if ($("#heat").checked) showHeat();
  });
  viewer.addHandler("open-failed", (event) => setStatus(`The slide could not be opened: ${event.message}`, true));
  viewer.addHandler("canvas-press", (event) => {
    if (!state.drawing) return;
    state.drawStart = viewer.viewport.viewerElementToImageCoordinates(event.position);
  });
  viewer.addHandler("canvas-drag", (event) => {
    if (!state.drawing || !state.drawStart) return;
    event.preventDefaultAction = true;  // draw instead of panning
    setRegion(state.drawStart, viewer.viewport.viewerElementToImageCoordinates(event.position));
  });
  viewer.addHandler("canvas-release", (event) => {
    if (!state.drawing || !state.drawStart) return;
    setRegion(state.drawStart, viewer.viewport.viewerElementToImageCoordinates(event.position));
    state.drawStart = null;
    setDrawing(false);
  });
  return viewer;
}

function currentSlide() { return state.slides.get(state.slideId); }

function setRegion(a, b) {
  const slide = currentSlide();
  const clamp = (value, high) => Math.max(0, Math.min(high, Math.round(value)));
  const x0 = clamp(Math.min(a.x, b.x), slide.width), x1 = clamp(Math.max(a.x, b.x), slide.width);
  const y0 = clamp(Math.min(a.y, b.y), slide.height), y1 = clamp(Math.max(a.y, b.y), slide.height);
  state.region = { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
  const ok = state.region.width > 0 && state.region.height > 0;
  if (!state.regionBox) {
    state.regionBox = element("div", { class: "region-box" });
    state.viewer.addOverlay(state.regionBox, imageRect(state.region));
  } else {
    state.viewer.updateOverlay(state.regionBox, imageRect(state.region));
  }
  $("#search-region").disabled = !ok;
  $("#region-text").textContent = ok ? `region ${x0}, ${y0}, ${x1 - x0} × ${y1 - y0} px` : "";
}

function setDrawing(on) {
  state.drawing = on;
  $("#draw").classList.toggle("active", on);
  $("#viewer").classList.toggle("drawing", on);
  $("#draw").textContent = on ? "Drag on the slide…" : "Draw a region";
}

async function openSlide(id, box) {
  const slide = await slideRow(id);
  if (!slide || slide.kind !== "slide") { setStatus(`Slide ${id} is not in the index.`, true); return; }
  $("#welcome").hidden = true;
  $("#viewer-section").hidden = false;
  $("#slide-name").textContent = slide.name;
  if (!state.viewer) state.viewer = createViewer();
  if (state.slideId === id && state.viewer.world.getItemCount()) {
    drawOverlays();
    if (box) goTo(box);
  } else {
    state.slideId = id;
    state.pendingBox = box || null;
    state.region = null;
    state.regionBox = null;
    state.heatItem = null;
    $("#search-region").disabled = true;
    $("#region-text").textContent = "";
    $("#heat-legend").textContent = "";
    hideSimilar();
    state.viewer.open(slide.dzi_url);
  }
  markOpenSlide();
}

function goTo(box) {
  const margin = Math.max(box.width, box.height) * 1.5;
  state.viewer.viewport.fitBounds(imageRect({ x: box.x - margin, y: box.y - margin,
                                              width: box.width + 2 * margin, height: box.height + 2 * margin }));
}

function drawOverlays() {
  const viewer = state.viewer;
  viewer.clearOverlays();
  state.regionBox = null;
  if (state.region) setRegion({ x: state.region.x, y: state.region.y },
                              { x: state.region.x + state.region.width, y: state.region.y + state.region.height });
  const search = state.search;
  if (!search) return;
  if (search.kind === "region" && search.source_id === state.slideId) {
    for (const [x, y, width, height] of search.query_boxes) {
      viewer.addOverlay(element("div", { class: "query-box" }), imageRect({ x, y, width, height }));
    }
  }
  search.matches.filter((m) => m.source_id === state.slideId).forEach((match, i) => {
    const box = element("div", { class: "match-box" + (i === 0 ? " first" : ""), "data-patch": match.patch_id,
                                 title: `#${match.rank} similarity ${similarity(match.similarity)}` });
    viewer.addOverlay(box, imageRect(match));
  });
}

async function showHeat() {
  hideHeat();
  if (!state.search || state.slideId === null) return;
  try {
    const response = await api(`/api/searches/${state.search.id}/heatmap/${state.slideId}.png`);
    const low = Number(response.headers.get("X-Similarity-Low")), high = Number(response.headers.get("X-Similarity-High"));
    state.heatUrl = URL.createObjectURL(await response.blob());
    state.viewer.addSimpleImage({ url: state.heatUrl, x: 0, y: 0, width: 1, opacity: 0.55,
                                  success: (event) => { state.heatItem = event.item; } });
    $("#heat-legend").textContent = `dark ${similarity(low)} → bright ${similarity(high)}`;
  } catch (error) {
    setStatus(`Heat map: ${error.message}`, true);
  }
}

function hideHeat() {
  if (state.heatItem) state.viewer.world.removeItem(state.heatItem);
  if (state.heatUrl) URL.revokeObjectURL(state.heatUrl);
  state.heatItem = state.heatUrl = null;
  $("#heat-legend").textContent = "";
}

// ------------------------------------------------------------------ searches
async function searchWith(request, label) {
  setStatus(`Searching with ${label}…`);
  try {
    const search = await (await api(request.url, request.options)).json();
    state.search = search;
    renderResults(search);
    setStatus(`${search.matches.length} match(es) for ${search.name}.`);
    $("#heat").disabled = false;
    if (state.viewer && state.slideId !== null) {
      drawOverlays();
      if ($("#heat").checked) showHeat();
    }
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  }
}

function searchUpload(file) {
  const form = new FormData();
  form.append("file", file);
  searchWith({ url: "/api/search/upload", options: { method: "POST", body: form } }, file.name);
}

function searchRegion() {
  if (!state.region) return;
  const body = JSON.stringify({ slide_id: state.slideId, ...state.region });
  searchWith({ url: "/api/search/region", options: { method: "POST", body,
                                                     headers: { "Content-Type": "application/json" } } },
             `a region of ${currentSlide().name}`);
}

function place(match) {
  return match.file_name || `${match.x.toLocaleString()}, ${match.y.toLocaleString()}`;
}

function renderResults(search) {
  $("#results").hidden = false;
  $("#welcome").hidden = true;
  $("#query").replaceChildren(
    element("img", { src: search.query_image_url, alt: "the query" }),
    element("div", {}, element("strong", {}, search.kind === "upload" ? "Uploaded patch" : "Region"),
      element("div", {}, search.name),
      element("div", { class: "hint" }, search.query_class ? `class ${search.query_class}` : ""),
      element("div", { class: "hint" }, search.kind === "region" ? `${search.query_boxes.length} query patch(es)` : "")));
  const grid = $("#matches");
  grid.replaceChildren();
  for (const match of search.matches) {
    const verdict = search.query_class && match.class_name
      ? (match.class_name === search.query_class ? " right" : " wrong") : "";
    const onSlide = match.source_kind === "slide";  // a folder's patch has no slide to open
    const card = element(onSlide ? "button" : "div", { class: "match" + verdict, "data-patch": match.patch_id,
                                                       title: onSlide ? "Open this place on its slide" : match.file_name },
      element("img", { src: match.image_url, alt: "", loading: "lazy" }),
      element("strong", {}, `#${match.rank} · ${similarity(match.similarity)}`),
      element("span", {}, match.source_name),
      element("span", {}, place(match)),
      element("span", {}, match.class_name || ""));
    if (onSlide) {
      card.type = "button";
      card.addEventListener("click", () => {
        location.hash = `#/slide/${match.source_id}/${match.x},${match.y},${match.width},${match.height}`;
      });
    }
    grid.append(card);
  }
  const body = $("#ranking tbody");
  body.replaceChildren();
  for (const row of search.slides) {
    body.append(element("tr", {}, element("td", {}, String(row.rank)),
      element("td", {}, element("a", { href: `#/slide/${row.source_id}` }, row.name)),
      element("td", {}, String(row.votes)), element("td", {}, similarity(row.score))));
  }
}

// ------------------------------------------------------------------ similar slides
// The open slide's own stored patches (its mosaic when the index was built with --mosaic) search the
// index; the other slides come back ranked as `retrieve.py query` of the slide ranks them.
async function findSimilar() {
  const slideId = state.slideId;
  if (slideId === null) return;
  setStatus(`Finding slides like ${currentSlide().name}…`);
  try {
    const found = await (await api(`/api/slides/${slideId}/similar`)).json();
    if (state.slideId !== slideId) return;  // another slide was opened meanwhile
    renderSimilar(found);
    setStatus(`${found.slides.length} slide(s) like ${found.name}.`);
  } catch (error) {
    setStatus(`Finding similar slides failed: ${error.message}`, true);
  }
}

function renderSimilar(found) {
  $("#similar-section").hidden = false;
  $("#similar-title").textContent = `Slides like ${found.name}` + (found.label ? ` (${found.label})` : "");
  $("#similar-hint").textContent = `Its ${found.query_patches} stored patch(es) searched the index; slides ranked `
    + "by the votes of their first matches, then by mean similarity.";
  const list = $("#similar-list");
  list.replaceChildren();
  for (const slide of found.slides) {
    const same = found.label && slide.label ? (slide.label === found.label ? " same" : "") : "";
    list.append(element("li", { "data-slide": slide.id },
      element("a", { href: `#/slide/${slide.id}`, title: "Open this slide" },
        element("img", { src: slide.thumbnail_url, alt: "", loading: "lazy" }),
        element("strong", {}, `#${slide.rank} · ${similarity(slide.score)}`),
        element("div", {}, slide.name),
        element("span", {}, `${slide.votes} vote(s)`),
        element("span", { class: "label" + same },
                slide.label ? slide.label + (slide.patient ? ` · patient ${slide.patient}` : "") : ""))));
  }
  if (!found.slides.length) list.append(element("li", { class: "hint" }, "No other slide matched."));
}

function hideSimilar() {
  $("#similar-section").hidden = true;
  $("#similar-list").replaceChildren();
}

// ------------------------------------------------------------------ wiring
function route() {
  const found = location.hash.match(/^#\/slide\/(\d+)(?:\/(\d+),(\d+),(\d+),(\d+))?$/);
  if (!found) return;
  const box = found[2] === undefined ? null
    : { x: Number(found[2]), y: Number(found[3]), width: Number(found[4]), height: Number(found[5]) };
  openSlide(Number(found[1]), box);
}

function wire() {
  let typing = null;
  $("#filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(resetSlideList, FILTER_DELAY_MS);
  });
  $("#file").addEventListener("change", (event) => { if (event.target.files[0]) searchUpload(event.target.files[0]); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) searchUpload(event.dataTransfer.files[0]);
  });
  $("#draw").addEventListener("click", () => setDrawing(!state.drawing));
  $("#search-region").addEventListener("click", searchRegion);
  $("#similar").addEventListener("click", findSimilar);
  $("#heat").addEventListener("change", (event) => (event.target.checked ? showHeat() : hideHeat()));
  window.addEventListener("hashchange", route);
}

wire();
loadIndex().then(route).catch((error) => setStatus(`The index could not be loaded: ${error.message}`, true));

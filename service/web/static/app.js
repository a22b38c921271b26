// segserve's web page: pick a model, send an image to POST /segment?format=json, show the
// result. The overlay and the per-class toggles are drawn here from the label PNG the
// server returns (each class has its own palette colour), so toggling costs no request.
"use strict";

const KEY = "segserve-api-key"; // sessionStorage; docs.js (Swagger UI) reads it too
const $ = (id) => document.getElementById(id);

const EXPLAIN = {
  400: "The server could not read this file as an image.",
  401: "This server needs its API key.",
  404: "That model is not served (any more): reload the page.",
  408: "The upload took too long.",
  413: "This image is too large for this server.",
  415: "This kind of file is not accepted: send a JPEG, PNG, WebP or another common image.",
  422: "The request was not understood.",
  499: "The request was cancelled.",
  503: "The server is busy or not ready yet.",
  504: "The server did not finish in time.",
};

const VIEW_PIXELS = 2_000_000;

const state = {
  view: { scale: 1, width: 0, height: 0 }, // the size the result is drawn at
  models: [],
  model: null, // the summary from /models
  result: null, // the JSON answer
  ids: null, // Uint8Array: class id per pixel (255: unknown colour)
  pixels: null, // ImageData of the original at the label size
  hidden: new Set(),
  last: null, // {blob, name}: retried after an API key is given
  urls: [], // object URLs to revoke on the next result
};

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body.detail || `HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) {
    let body = {};
    try {
      body = await response.json();
    } catch {
      body = { detail: response.statusText };
    }
    if (response.status === 401) askForKey(sessionStorage.getItem(KEY) !== null);
    throw new ApiError(response.status, body, response.headers.get("Retry-After"));
  }
  return response;
}

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
  if (kind) document.body.dataset.state = kind;
}

function showError(err) {
  if (!(err instanceof ApiError)) {
    setStatus("Something went wrong: " + err.message, "error");
    return;
  }
  let text = `${err.status}: ${EXPLAIN[err.status] || "The server refused the request."}`;
  if (err.body.detail) text += ` (${err.body.detail})`;
  if (err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
  if (err.body.request_id) text += ` Request id: ${err.body.request_id}.`;
  setStatus(text, "error");
}

function askForKey(wrong) {
  $("key-form").hidden = false;
  $("key-button").hidden = false;
  if (wrong) $("key").placeholder = "that key was refused";
  $("key").focus();
}

// --- models --------------------------------------------------------------------------

async function loadModels() {
  let listing;
  try {
    listing = await (await api("/models")).json();
  } catch (err) {
    showError(err);
    return;
  }
  state.models = listing.models;
  const select = $("model");
  select.replaceChildren(
    ...listing.models.map((m, i) => {
      const option = new Option(`${m.name} v${m.version}`, String(i));
      option.selected = m.name === listing.default;
      return option;
    }),
  );
  select.disabled = listing.models.length === 0;
  chooseModel();
  if (listing.models.length === 0) setStatus("No model is served yet.", "error");
  else setStatus("Ready: drop an image.", "ready");
}

function chooseModel() {
  state.model = state.models[Number($("model").value)] || null;
  const m = state.model;
  $("model-info").textContent = m
    ? `${m.architecture}, ${m.classes.length} classes, ${m.variant} on ` +
      `${m.provider.replace("ExecutionProvider", "")}, ` +
      (m.scale.policy === "native"
        ? `native scale (tiles of ${m.scale.tile} px past one tile)`
        : `fit scale (${(m.scale.fit_pixels / 1e6).toFixed(1)} MP)`)
    : "";
}

// --- segmenting --------------------------------------------------------------------------

function parseServerTiming(header) {
  const out = [];
  for (const part of (header || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    const dur = params.find((p) => p.trim().startsWith("dur="));
    if (name && dur) out.push([name, Number(dur.trim().slice(4))]);
  }
  return out;
}

async function segment(blob, name) {
  if (!state.model) return;
  state.last = { blob, name };
  setStatus(`Segmenting ${name} with ${state.model.name} v${state.model.version} …`, "busy");
  const m = state.model;
  const query = new URLSearchParams({ format: "json", model: m.name, version: m.version });
  if ($("scale").value) query.set("scale", $("scale").value);
  const started = performance.now();
  try {
    const response = await api("/segment?" + query, {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    const text = await response.text();
    const timings = parseServerTiming(response.headers.get("Server-Timing"));
    timings.push(["round trip (browser)", performance.now() - started]);
    await show(blob, name, JSON.parse(text), text, timings);
    setStatus(`${name}: ${state.result.width}×${state.result.height}`, "done");
    describeInference(state.result);
  } catch (err) {
    showError(err);
  }
}

function decodeImage(src) {
  const img = new Image();
  img.src = src;
  return img.decode().then(() => img);
}

function pixelsOf(img, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height);
}

async function show(blob, name, result, text, timings) {
  for (const url of state.urls) URL.revokeObjectURL(url);
  const original = URL.createObjectURL(blob);
  const labelPng = Uint8Array.from(atob(result.label_png), (c) => c.charCodeAt(0));
  const labelUrl = URL.createObjectURL(new Blob([labelPng], { type: "image/png" }));
  const jsonUrl = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  state.urls = [original, labelUrl, jsonUrl];

  const [img, labelImg] = await Promise.all([decodeImage(original), decodeImage(labelUrl)]);
  // Large images (a 12 MP photo) are shown scaled to at most VIEW_PIXELS: the per-pixel
  // drawing below stays quick; the labels are sampled nearest, so classes stay classes.
  const scale = Math.min(1, Math.sqrt(VIEW_PIXELS / (result.width * result.height)));
  const width = Math.max(1, Math.round(result.width * scale));
  const height = Math.max(1, Math.round(result.height * scale));
  state.view = { scale, width, height };
  // The label PNG is in palette mode: its colours are the model's palette, one per class.
  const colours = new Map(state.model.classes.map((c) => [rgbKey(c.color), c.id]));
  const rgba = pixelsOf(labelImg, width, height).data;
  const ids = new Uint8Array(width * height);
  for (let p = 0, q = 0; p < ids.length; p += 1, q += 4) {
    const id = colours.get((rgba[q] << 16) | (rgba[q + 1] << 8) | rgba[q + 2]);
    ids[p] = id === undefined ? 255 : id;
  }
  state.result = result;
  state.ids = ids;
  state.pixels = pixelsOf(img, width, height);
  state.hidden = new Set(result.classes.filter((c) => c.name === "background").map((c) => c.id));

  $("original").src = original;
  const stem = name.replace(/\.[^.]*$/, "") || "image";
  $("download-png").href = labelUrl;
  $("download-png").download = `${stem}-labels.png`;
  $("download-json").href = jsonUrl;
  $("download-json").download = `${stem}-segmentation.json`;
  fillLegend(result.classes);
  fillTimings(timings);
  $("result").hidden = false;
  draw();
}

// What the server did to the image (the JSON's `inference`) and how the page shows it.
function describeInference(result) {
  const inf = result.inference;
  let text =
    inf.policy === "native"
      ? `Segmented at its own resolution, ${inf.width}×${inf.height}`
      : `Segmented scaled down to ${inf.width}×${inf.height}, labels scaled back`;
  if (inf.tiles > 1) text += `, in ${inf.tiles} tiles of ${inf.tile} px (halo ${inf.halo} px)`;
  text += ".";
  if (state.view.scale < 1) {
    text += ` Shown at ${Math.round(100 * state.view.scale)} % (${state.view.width}×${state.view.height}); the label PNG download is full size.`;
  }
  $("inference").textContent = text;
}

function rgbKey([r, g, b]) {
  return (r << 16) | (g << 8) | b;
}

function fillLegend(classes) {
  const rows = classes.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.classId = c.id;
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.checked = !state.hidden.has(c.id);
    toggle.setAttribute("aria-label", `show ${c.name}`);
    toggle.addEventListener("change", () => {
      if (toggle.checked) state.hidden.delete(c.id);
      else state.hidden.add(c.id);
      draw();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${c.color.join(",")})`;
    tr.append(
      cell(toggle),
      cell(swatch, document.createTextNode(c.name)),
      cell(`${(100 * c.fraction).toFixed(1)} %`, "num"),
      cell(c.pixels.toLocaleString(), "num"),
    );
    return tr;
  });
  $("legend").tBodies[0].replaceChildren(...rows);
}

function cell(...content) {
  const td = document.createElement("td");
  if (typeof content[0] === "string") {
    td.textContent = content[0];
    if (content[1]) td.className = content[1];
  } else {
    td.append(...content);
  }
  return td;
}

function fillTimings(timings) {
  $("timings").tBodies[0].replaceChildren(
    ...timings.map(([name, ms]) => {
      const tr = document.createElement("tr");
      tr.append(cell(name), cell(ms.toFixed(1), "num"));
      return tr;
    }),
  );
}

function draw() {
  const { width, height } = state.view;
  const alpha = Number($("opacity").value) / 100;
  $("opacity-value").textContent = `${Math.round(alpha * 100)} %`;
  const palette = new Map(state.model.classes.map((c) => [c.id, c.color]));
  const src = state.pixels.data;
  const overlay = new ImageData(width, height);
  const labels = new ImageData(width, height);
  for (let p = 0, q = 0; p < state.ids.length; p += 1, q += 4) {
    const id = state.ids[p];
    const colour = state.hidden.has(id) ? null : palette.get(id);
    for (let k = 0; k < 3; k += 1) {
      overlay.data[q + k] = colour ? (1 - alpha) * src[q + k] + alpha * colour[k] : src[q + k];
      labels.data[q + k] = colour ? colour[k] : 40;
    }
    overlay.data[q + 3] = 255;
    labels.data[q + 3] = 255;
  }
  for (const [id, data] of [["overlay", overlay], ["labels", labels]]) {
    const canvas = $(id);
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(data, 0, 0);
  }
}

// --- samples and input ----------------------------------------------------------------

async function loadSamples() {
  try {
    const { samples } = await (await fetch("/samples")).json();
    $("samples").replaceChildren(
      ...samples.map((s) => {
        const button = document.createElement("button");
        button.type = "button";
        button.title = s.name;
        const img = document.createElement("img");
        img.src = s.url;
        img.alt = s.name;
        button.append(img);
        button.addEventListener("click", async () => {
          const blob = await (await fetch(s.url)).blob();
          segment(blob, s.name);
        });
        return button;
      }),
    );
    $("samples-box").hidden = samples.length === 0;
  } catch {
    $("samples-box").hidden = true; // samples are a nicety; the page works without them
  }
}

function wireInput() {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) segment(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) segment(file, file.name);
  });
  $("model").addEventListener("change", chooseModel);
  $("opacity").addEventListener("input", () => state.result && draw());
  $("key-button").addEventListener("click", () => askForKey(false));
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    $("key-form").hidden = true;
    await loadModels();
    if (state.last && state.models.length) segment(state.last.blob, state.last.name);
  });
}

wireInput();
loadModels();
loadSamples();

// The page at `/` of `sdlab serve`: plain JavaScript, no build step, nothing fetched from elsewhere.
// Jobs go through sdlab's job API (POST /v1/jobs, then its Server-Sent Events: progress, previews,
// images); the lists of samplers and schedulers and the PNG reader come from the AUTOMATIC1111 API.
// Every request is same-origin, so a server started with --auth works through the browser's login box.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  samplers: [],       // /sdapi/v1/samplers: {name, aliases, options: {scheduler}}
  schedulers: [],     // /sdapi/v1/schedulers: {name, label}
  models: [],         // /v1/models: {name, title, hash, selected}
  job: null,          // the job being followed
  init: null,         // the image to edit: {dataURL, width, height}
  maskPainted: false,
};

// --- messages --------------------------------------------------------------------------------------
function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}
function notice(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

// --- HTTP ------------------------------------------------------------------------------------------
class ApiError extends Error {}

async function errorMessage(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const said = body && (body.errors || (typeof body.detail === "string" ? body.detail : null));
  switch (response.status) {
    case 401: return "The server wants credentials: reload the page to sign in.";
    case 413: return `The request is too large${said ? ": " + said : ""}.`;
    case 422: return `Invalid request: ${said || response.statusText}`;
    case 429: {
      const wait = response.headers.get("Retry-After") || (body && body.retry_after);
      return `The server is busy (its queue is full)${wait ? `; try again in ${wait} s` : ""}.`;
    }
    default: return `The server answered ${response.status}${said ? ": " + said : " " + response.statusText}`;
  }
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method, credentials: "same-origin",
      headers: body === undefined ? {} : {"Content-Type": "application/json"},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(`Cannot reach the server (${e.message}).`);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}
const getJSON = async (path) => (await api("GET", path)).json();
const postJSON = async (path, body) => (await api("POST", path, body)).json();

// --- the form's lists ------------------------------------------------------------------------------
function fillSelect(select, items, value, label) {
  select.replaceChildren(...items.map((item) => new Option(label(item), value(item))));
}

async function loadLists() {
  const [samplers, schedulers, models] = await Promise.all(
    [getJSON("/sdapi/v1/samplers"), getJSON("/sdapi/v1/schedulers"), getJSON("/v1/models")]);
  state.samplers = samplers;
  state.schedulers = schedulers;
  state.models = models;
  fillSelect($("sampler"), samplers, (s) => s.name, (s) => s.name);
  fillSelect($("scheduler"), schedulers, (s) => s.name, (s) => s.label);
  fillSelect($("model"), models, (m) => m.name, (m) => m.title);
  if (samplers.some((s) => s.name === "DPM++ 2M")) $("sampler").value = "DPM++ 2M";  // sdlab's default
  $("scheduler").value = "automatic";
  const selected = models.find((m) => m.selected);
  if (selected) $("model").value = selected.name;
}

// AUTOMATIC1111's scheduler -> sdlab's schedule: "Automatic" is the sampler's own (its `options`),
// "Uniform" is the sampler's default spacing.
function scheduleFor(scheduler, samplerName) {
  const sampler = state.samplers.find((s) => s.name === samplerName);
  if (scheduler === "automatic") return (sampler && sampler.options && sampler.options.scheduler) || "default";
  if (scheduler === "uniform") return "default";
  return scheduler;
}

// --- the request -----------------------------------------------------------------------------------
function number(id, label, {integer = false, optional = false} = {}) {
  const text = $(id).value.trim();
  if (text === "" && optional) return null;
  const value = Number(text);
  if (text === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new ApiError(`${label}: enter ${integer ? "a whole number" : "a number"}.`);
  }
  return value;
}

function buildRequest() {
  const seed = number("seed", "Seed", {integer: true});
  const body = {
    prompt: $("prompt").value,
    negative: $("negative").value,
    sampler: $("sampler").value,
    schedule: scheduleFor($("scheduler").value, $("sampler").value),
    steps: number("steps", "Steps", {integer: true}),
    guidance: number("cfg", "Guidance", {}),
    width: number("width", "Width", {integer: true, optional: true}),
    height: number("height", "Height", {integer: true, optional: true}),
    seed: seed < 0 ? null : seed,
    batch: number("batch", "Batch size", {integer: true}),
    model: $("model").value || null,
  };
  if (state.init) {
    body.image = state.init.dataURL;
    body.strength = Number($("strength").value);
    if (state.maskPainted) {
      body.mask = maskPNG();
      body.fill = $("fill").value;
      body.only_masked = $("only-masked").checked;
      body.mask_blur = number("mask-blur", "Mask blur", {integer: true});
      body.padding = number("padding", "Padding", {integer: true});
    }
  }
  return body;
}

// --- a job: submit, follow its events, show its images ---------------------------------------------
function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  $("cancel").disabled = false;
  document.body.classList.toggle("busy", busy);
}

function seconds(s) {
  if (!Number.isFinite(s)) return "?";
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
}

function showProgress(p, started) {
  const fraction = Math.min(1, (p.image + (p.total ? p.step / p.total : 0)) / Math.max(1, p.images));
  $("progress").value = fraction;
  const elapsed = (performance.now() - started) / 1000;
  const eta = fraction > 0 ? elapsed * (1 - fraction) / fraction : NaN;
  const image = p.images > 1 ? `image ${p.image + 1}/${p.images} · ` : "";
  $("progress-text").textContent =
    `${image}step ${p.step}/${p.total} · ${Math.round(fraction * 100)}% · ETA ${seconds(eta)}`;
}

async function generate(event) {
  if (event) event.preventDefault();
  if (state.job) return;
  clearError();
  notice("");
  let body;
  try {
    body = buildRequest();
  } catch (e) {
    showError(e.message);
    return;
  }
  setBusy(true);
  $("progress").value = 0;
  $("progress-text").textContent = "Submitting…";
  try {
    const job = await postJSON("/v1/jobs", body);
    state.job = job;
    await follow(job);
  } catch (e) {
    showError(e.message);
    $("progress-text").textContent = "Stopped";
  } finally {
    state.job = null;
    setBusy(false);
  }
}

function follow(job) {
  const group = document.createElement("div");
  group.className = "job";
  group.dataset.job = job.id;
  $("gallery").prepend(group);
  $("gallery-empty").hidden = true;
  $("progress-text").textContent = job.position ? `Queued: ${job.position} job(s) ahead` : "Queued";
  let results = Promise.resolve();  // cards are added in the order the images were made
  let started = performance.now();

  return new Promise((resolve, reject) => {
    const events = new EventSource(job.events);
    const finish = (error) => {
      events.close();
      $("preview").hidden = true;
      results.then(() => (error ? reject(error) : resolve()), reject);
    };
    const data = (e) => JSON.parse(e.data);
    events.addEventListener("started", () => {
      started = performance.now();
      $("progress-text").textContent = "Loading…";
    });
    events.addEventListener("progress", (e) => showProgress(data(e), started));
    events.addEventListener("preview", (e) => {
      $("preview").src = "data:image/png;base64," + data(e).png;
      $("preview").hidden = false;
    });
    events.addEventListener("image", (e) => {
      const {index} = data(e);
      results = results.then(() => addResult(group, job.id, index));
    });
    events.addEventListener("done", () => {
      $("progress").value = 1;
      $("progress-text").textContent = `Done in ${seconds((performance.now() - started) / 1000)}`;
      finish();
    });
    events.addEventListener("cancelled", (e) => {
      const kept = data(e).images.length;
      $("progress-text").textContent = "Cancelled";
      notice(kept ? `Cancelled; the ${kept} image(s) finished before are kept.` : "Cancelled.");
      finish();
    });
    events.addEventListener("failed", (e) => finish(new ApiError(`The job failed: ${data(e).error}`)));
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        finish(new ApiError("Lost the connection to the server's progress stream."));
      } else {
        $("progress-text").textContent = "Reconnecting…";  // EventSource resumes with Last-Event-ID
      }
    };
  });
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    await api("DELETE", `/v1/jobs/${state.job.id}`);
  } catch (e) {
    showError(e.message);
  }
}

function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function addResult(group, jobId, index) {
  const view = await getJSON(`/v1/jobs/${jobId}`);
  const blob = await (await api("GET", view.images[index])).blob();  // kept here: the server forgets jobs
  const parameters = view.parameters[index] || "";
  const url = URL.createObjectURL(blob);

  const card = document.createElement("figure");
  card.className = "card";
  const image = document.createElement("img");
  image.src = url;
  image.alt = parameters.split("\n")[0] || "generated image";
  const text = document.createElement("pre");
  text.className = "params";
  text.textContent = parameters;
  const buttons = document.createElement("div");
  buttons.className = "card-actions";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Reuse these settings";
  reuse.addEventListener("click", () => applyParameters(parseInfotext(parameters)));
  const edit = document.createElement("button");
  edit.type = "button";
  edit.className = "to-edit";
  edit.textContent = "Edit this image";
  edit.addEventListener("click", async () => setInitImage(await blobToDataURL(blob)));
  const save = document.createElement("a");
  save.href = url;
  save.download = `sdlab-${view.seeds[index]}.png`;
  save.textContent = "Download";
  buttons.append(reuse, edit, save);
  card.append(image, text, buttons);
  group.append(card);
}

// --- parameters: A1111's infotext -> the form --------------------------------------------------------
// The same reading as sdlab.pipelines.metadata.parse_parameters.
const PAIR = /\s*([\w ()\-/.]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;

function parseInfotext(text) {
  const lines = text.replace(/^\n+|\n+$/g, "").split("\n");
  const last = lines[lines.length - 1];
  const isSettings = lines.length > 1 && new RegExp("^" + PAIR.source).test(last) && last.includes("Steps: ");
  const body = isSettings ? lines.slice(0, -1) : lines;
  const prompt = [], negative = [];
  let inNegative = false;
  for (let line of body) {
    if (!inNegative && line.startsWith("Negative prompt: ")) {
      inNegative = true;
      line = line.slice("Negative prompt: ".length);
    }
    (inNegative ? negative : prompt).push(line);
  }
  const out = {"Prompt": prompt.join("\n"), "Negative prompt": negative.join("\n")};
  if (isSettings) {
    for (const [, key, raw] of last.matchAll(PAIR)) {
      const value = raw.trim();
      out[key.trim()] = value.startsWith('"') ? JSON.parse(value) : value;
    }
  }
  return out;
}

function hasOption(select, value) {
  return Array.from(select.options).some((o) => o.value === value);
}

// Fill the form from {Prompt, "Negative prompt", Steps, Sampler, ...} (png-info's `parameters`, or a parsed infotext).
function applyParameters(p) {
  const skipped = [];
  const set = (id, value) => { if (value !== undefined && value !== null && value !== "") $(id).value = value; };
  if (p["Prompt"] !== undefined) $("prompt").value = p["Prompt"];
  $("negative").value = p["Negative prompt"] || "";
  set("steps", p["Steps"]);
  set("cfg", p["CFG scale"]);
  set("seed", p["Seed"]);
  if (p["Size"] && /^\d+x\d+$/.test(p["Size"])) {
    const [width, height] = p["Size"].split("x");
    set("width", width);
    set("height", height);
  }
  let sampler = p["Sampler"], scheduleLabel = p["Schedule type"];
  if (sampler && !hasOption($("sampler"), sampler)) {  // older infotexts: "DPM++ 2M Karras"
    const m = /^(.*) (Karras|Exponential)$/.exec(sampler);
    if (m && hasOption($("sampler"), m[1])) [sampler, scheduleLabel] = [m[1], scheduleLabel || m[2]];
  }
  if (sampler) {
    if (hasOption($("sampler"), sampler)) $("sampler").value = sampler; else skipped.push(`sampler ${sampler}`);
  }
  if (scheduleLabel) {
    const found = state.schedulers.find((s) => s.label.toLowerCase() === scheduleLabel.toLowerCase()
                                            || s.name === scheduleLabel.toLowerCase());
    if (found) $("scheduler").value = found.name; else skipped.push(`schedule ${scheduleLabel}`);
  } else if (sampler) {  // no schedule written: the sampler's default spacing
    const own = state.samplers.find((s) => s.name === $("sampler").value);
    $("scheduler").value = own && own.options && own.options.scheduler ? "uniform" : "automatic";
  }
  if (p["Model"] || p["Model hash"]) {
    const model = state.models.find((m) => m.name === p["Model"] || (p["Model hash"] && m.hash === p["Model hash"]));
    if (model) $("model").value = model.name; else skipped.push(`model ${p["Model"] || p["Model hash"]}`);
  }
  if (p["Denoising strength"] !== undefined) {
    $("strength").value = p["Denoising strength"];
    $("strength-value").value = $("strength").value;
  }
  if (p["Mask blur"] !== undefined) {
    set("mask-blur", p["Mask blur"]);
    const fills = {"fill": "fill", "original": "original", "latent noise": "noise", "latent nothing": "nothing"};
    if (fills[p["Masked content"]]) $("fill").value = fills[p["Masked content"]];
    $("only-masked").checked = p["Inpaint area"] === "Only masked";
    set("padding", p["Masked area padding"]);
  }
  notice(skipped.length ? `Settings filled in, except what this server lacks: ${skipped.join(", ")}.`
                        : "Settings filled in.");
}

// --- reading a PNG's parameters --------------------------------------------------------------------
async function readPngInfo(file) {
  clearError();
  try {
    const info = await postJSON("/sdapi/v1/png-info", {image: await blobToDataURL(file)});
    const text = $("pnginfo-text");
    text.hidden = false;
    if (!info.info) {
      text.textContent = `${file.name}: no generation parameters in this image.`;
      notice("");
      return;
    }
    text.textContent = info.info;
    applyParameters(info.parameters);
  } catch (e) {
    showError(e.message);
  }
}

// --- the image to edit and its mask ----------------------------------------------------------------
function setInitImage(dataURL) {
  return new Promise((resolve) => {
    const image = $("init-image");
    image.onload = () => {
      state.init = {dataURL, width: image.naturalWidth, height: image.naturalHeight};
      const canvas = $("mask-canvas");
      canvas.width = image.naturalWidth;   // the mask is sent at the image's own size
      canvas.height = image.naturalHeight;
      clearMask();
      $("editor").hidden = false;
      $("edit").open = true;
      resolve();
    };
    image.onerror = () => {
      showError("That file is not an image the browser can read.");
      resolve();
    };
    image.src = dataURL;
  });
}

async function chooseInit(file) {
  if (!file) return;
  clearError();
  await setInitImage(await blobToDataURL(file));
}

function removeInit() {
  state.init = null;
  $("init-image").removeAttribute("src");
  $("editor").hidden = true;
  $("init-file").value = "";
  clearMask();
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  setMaskPainted(false);
}

function setMaskPainted(painted) {
  state.maskPainted = painted;
  $("mask-state").textContent = painted
    ? "Mask painted: only the painted part is redrawn (inpainting)."
    : "No mask painted: the whole image is redrawn (img2img).";
}

// White where painted, black elsewhere, the image's size: what both APIs take as a mask.
function maskPNG() {
  const source = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const ctx = out.getContext("2d");
  ctx.drawImage(source, 0, 0);
  ctx.globalCompositeOperation = "source-in";  // every painted pixel white, keeping the stroke's coverage
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}

function setUpMaskPainting() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width;
    return {x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale, scale};
  };
  const stroke = (from, to) => {
    ctx.globalCompositeOperation = $("mask-erase").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#ff4040";
    ctx.lineWidth = Number($("brush-size").value) * to.scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);  // a click alone paints a dot
    ctx.stroke();
    if (!$("mask-erase").checked) setMaskPainted(true);
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
    e.preventDefault();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const next = point(e);
    stroke(last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// --- drop zones ------------------------------------------------------------------------------------
function dropZone(zone, input, handle) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    zone.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) handle(file);
  });
  zone.addEventListener("click", (e) => { if (e.target === zone) input.click(); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { if (input.files[0]) handle(input.files[0]); });
}

// --- start -----------------------------------------------------------------------------------------
function start() {
  $("form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
  });
  $("cancel").addEventListener("click", cancel);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("error-close").addEventListener("click", clearError);
  $("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
  $("mask-clear").addEventListener("click", clearMask);
  $("init-clear").addEventListener("click", removeInit);
  dropZone($("init-drop"), $("init-file"), chooseInit);
  dropZone($("pnginfo-drop"), $("pnginfo-file"), readPngInfo);
  // a file dropped beside a zone must not replace the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  setUpMaskPainting();
  loadLists().then(
    () => {
      $("generate").disabled = false;
      document.body.classList.add("ready");
    },
    (e) => showError(`Could not read the server's samplers and models: ${e.message}`));
}

start();

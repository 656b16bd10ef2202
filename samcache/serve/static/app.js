// The page of `samcache serve`: pick an image, prompt a mask with a box and points, compare it with
// the ground truth, save it as a new object, fine-tune a new run with the corrections. Talks to the JSON API of samcache/serve/app.py; every
// coordinate sent is in the image's original pixels (the canvas shows the cache's smaller preview).
"use strict";

// A drag shorter than this (canvas pixels) is a click: a point, not a box.
const DRAG_MIN = 4;
const MASK_RGBA = [30, 110, 255, 115];
const TRUTH_COLORS = [[230, 60, 60], [40, 170, 80], [240, 150, 20], [160, 60, 200], [20, 170, 180], [200, 80, 140]];
const TRUTH_ALPHA = 80;

// What tests read: the last prediction ({segmentation, score, ...}) and the request that made it.
const samcache = (window.samcache = { lastPrediction: null, lastRequest: null });

const view = document.getElementById("view");
const ctx = view.getContext("2d");
const el = (id) => document.getElementById(id);

const state = {
  images: [],        // from /api/images
  image: null,       // the selected image's entry
  preview: null,     // its preview, an <img>
  objects: null,     // /api/objects's answer: {version, objects}
  truthLayer: null,  // the ground truth drawn at original resolution (an offscreen canvas)
  truthMasks: [],    // decoded ground-truth masks, as the objects list them
  box: null,         // [x0, y0, x1, y1], original pixels
  points: [],        // [[x, y, label], ...], original pixels
  drag: null,        // {start, now} in canvas pixels while the mouse is down
  mask: null,        // the decoded predicted mask (Uint8Array, column-major)
  maskLayer: null,
  sent: 0,           // predictions asked for: an older answer arriving late is dropped
};

// ------------------------------------------------------------------------- COCO RLE

// The inverse of pycocotools' rleToString: each count is a signed LEB128-like number, 5 bits a
// character (offset 48, 0x20 = more follows, 0x10 = sign), each from the third on a difference
// from the count two before it.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);  // arithmetic, not bit shifts: counts can pass 2^31
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A COCO RLE ({size: [h, w], counts}) as a Uint8Array of h*w in column-major order (index x*h + y),
// as pycocotools lays masks out: runs alternate background and object, background first.
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let at = 0, value = 0;
  for (const count of rleCounts(rle.counts)) {
    if (value) mask.fill(1, at, at + count);
    at += count;
    value ^= 1;
  }
  if (at !== h * w) throw new Error(`RLE counts sum to ${at}, not ${h}x${w}`);
  return mask;
}

// An offscreen canvas at the mask's resolution, `rgba` where the mask is set.
function maskLayer(mask, h, w, rgba, layer) {
  if (!layer) {
    layer = document.createElement("canvas");
    layer.width = w;
    layer.height = h;
  }
  const lctx = layer.getContext("2d");
  const pixels = lctx.getImageData(0, 0, w, h);
  const data = pixels.data;
  for (let x = 0; x < w; x++) {
    const column = x * h;
    for (let y = 0; y < h; y++) {
      if (mask[column + y]) {
        const i = (y * w + x) * 4;
        data[i] = rgba[0]; data[i + 1] = rgba[1]; data[i + 2] = rgba[2]; data[i + 3] = rgba[3];
      }
    }
  }
  lctx.putImageData(pixels, 0, 0);
  return layer;
}

// The IoU of `mask` with the ground-truth mask it overlaps most (null without overlap).
function truthIou(mask, truths) {
  let best = null;
  for (const truth of truths) {
    let inter = 0, union = 0;
    for (let i = 0; i < mask.length; i++) {
      inter += mask[i] & truth[i];
      union += mask[i] | truth[i];
    }
    if (inter > 0 && (best === null || inter > best.inter)) best = { inter, iou: inter / union };
  }
  return best && best.iou;
}

// ------------------------------------------------------------------------- talking to the server

async function api(method, url, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const answer = await fetch(url, options);
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    const error = new Error(data.error || `${method} ${url}: HTTP ${answer.status}`);
    error.status = answer.status;
    throw error;
  }
  return data;
}

function setStatus(stateName, text) {
  const status = el("status");
  status.dataset.state = stateName;
  status.textContent = text;
}

// ------------------------------------------------------------------------- the image list

function renderImages() {
  const split = el("split").value;
  const order = el("sort").value;
  const category = el("category-filter").value;
  const shown = state.images.filter((im) => (!split || im.split === split) &&
    (!category || im.categories.includes(category)));
  // Worst first: the served model's mean IoU from the run's latest eval; images never scored last.
  const model = el("model").value;
  const score = (im) => (im.scores && model in im.scores ? im.scores[model] : Infinity);
  shown.sort((a, b) => (order === "objects" && b.objects - a.objects) ||
    (order === "worst" && score(a) - score(b)) || a.name.localeCompare(b.name));
  const list = el("images");
  list.replaceChildren();
  for (const image of shown) {
    const item = document.createElement("li");
    item.dataset.name = image.name;
    item.dataset.split = image.split;
    item.classList.toggle("selected", state.image !== null && state.image.name === image.name);
    const iou = image.scores && model in image.scores ? image.scores[model].toFixed(2) : "";
    item.dataset.score = iou;
    for (const [cls, text] of [["name", image.name], ["split", image.split], ["count", `${image.objects} obj`],
                               ["score", iou]]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      item.append(span);
    }
    item.title = image.categories.join(", ");
    item.addEventListener("click", () => selectImage(image));
    list.append(item);
  }
}

async function loadImages() {
  const answer = await api("GET", "/api/images");
  state.images = answer.images;
  for (const split of [...new Set(answer.images.map((im) => im.split))].sort()) {
    el("split").append(new Option(split, split));
  }
  for (const category of [...new Set(answer.images.flatMap((im) => im.categories))].sort()) {
    el("category-filter").append(new Option(category, category));
  }
  for (const model of answer.models) el("model").append(new Option(model, model));
  // The run's decoder when there is one: what the person is checking.
  el("model").value = answer.models.includes("fine_tuned") ? "fine_tuned" : answer.models[0];
  renderImages();
  setStatus("ready", `${answer.images.length} images: pick one`);
}

// ------------------------------------------------------------------------- one image

async function selectImage(image) {
  state.image = image;
  clearPrompts();
  state.objects = null;
  state.truthLayer = null;
  state.truthMasks = [];
  renderImages();
  el("image-name").textContent = image.name;
  setStatus("loading", `loading ${image.name}…`);
  const query = encodeURIComponent(image.name);
  const preview = new Image();
  try {
    await new Promise((resolve, reject) => {
      preview.onload = resolve;
      preview.onerror = () => reject(new Error(`the preview of ${image.name} did not load`));
      preview.src = `/api/preview?image=${query}`;
    });
    if (state.image !== image) return;  // another image was picked meanwhile
    state.preview = preview;
    view.width = preview.naturalWidth;
    view.height = preview.naturalHeight;
    view.dataset.image = image.name;
    await loadObjects();
    draw();
    setStatus("ready", "drag a box or click points");
  } catch (error) {
    setStatus("error", error.message);
  }
}

async function loadObjects() {
  const image = state.image;
  const answer = await api("GET", `/api/objects?image=${encodeURIComponent(image.name)}`);
  if (state.image !== image) return;
  state.objects = answer;
  state.truthMasks = answer.objects.map((o) => decodeRle(o.segmentation));
  state.truthLayer = null;
  answer.objects.forEach((o, i) => {
    const [r, g, b] = TRUTH_COLORS[i % TRUTH_COLORS.length];
    state.truthLayer = maskLayer(state.truthMasks[i], answer.height, answer.width, [r, g, b, TRUTH_ALPHA],
                                 state.truthLayer);
  });
  image.objects = answer.objects.length;
  renderObjects();
  renderImages();
  showScores();
}

function renderObjects() {
  const list = el("objects");
  list.replaceChildren();
  state.objects.objects.forEach((o, i) => {
    const item = document.createElement("li");
    item.dataset.id = o.id;
    item.dataset.category = o.category;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${TRUTH_COLORS[i % TRUTH_COLORS.length].join(",")})`;
    const text = document.createElement("span");
    text.textContent = `#${o.id} ${o.category} (${o.area} px)`;
    item.append(swatch, text);
    // Corrections of this object: its mask replaced by the prediction, its category by the one
    // typed above, or the object deleted. Each names the version the list was loaded at.
    for (const [action, label] of [["replace", "mask ←"], ["rename", "category ←"], ["delete", "delete"]]) {
      const button = document.createElement("button");
      button.className = `edit ${action}`;
      button.textContent = label;
      button.addEventListener("click", () => edit(action, o));
      item.append(button);
    }
    list.append(item);
  });
}

// ------------------------------------------------------------------------- drawing

function draw() {
  ctx.clearRect(0, 0, view.width, view.height);
  if (!state.preview) return;
  ctx.drawImage(state.preview, 0, 0, view.width, view.height);
  if (el("show-truth").checked && state.truthLayer) ctx.drawImage(state.truthLayer, 0, 0, view.width, view.height);
  if (el("show-mask").checked && state.maskLayer) ctx.drawImage(state.maskLayer, 0, 0, view.width, view.height);
  const scale = view.width / state.image.width;
  ctx.lineWidth = 2;
  if (state.box) {
    const [x0, y0, x1, y1] = state.box.map((v) => v * scale);
    ctx.strokeStyle = "#1e6eff";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  if (state.drag) {
    const [[x0, y0], [x1, y1]] = [state.drag.start, state.drag.now];
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#1e6eff";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.setLineDash([]);
  }
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x * scale, y * scale, 5, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#18b040" : "#e02020";
    ctx.fill();
    ctx.strokeStyle = "white";
    ctx.stroke();
  }
}

// ------------------------------------------------------------------------- prompts and masks

// The pointer's position in canvas pixels (the canvas is shown scaled; it has a border, no padding).
function canvasPixel(event) {
  const r = view.getBoundingClientRect();
  return [(event.clientX - r.left - view.clientLeft) * view.width / view.clientWidth,
          (event.clientY - r.top - view.clientTop) * view.height / view.clientHeight];
}

// Canvas pixels to whole original-image pixels, inside the image.
function toOriginal([x, y], limitW, limitH) {
  const scale = state.image.width / view.width;
  return [Math.min(Math.max(Math.round(x * scale), 0), limitW), Math.min(Math.max(Math.round(y * scale), 0), limitH)];
}

function onMouseUp(event) {
  const drag = state.drag;
  state.drag = null;
  if (!drag || !state.image) return;
  const end = canvasPixel(event);
  const { width, height } = state.image;
  if (Math.abs(end[0] - drag.start[0]) >= DRAG_MIN && Math.abs(end[1] - drag.start[1]) >= DRAG_MIN) {
    const [ax, ay] = toOriginal(drag.start, width, height);
    const [bx, by] = toOriginal(end, width, height);
    state.box = [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
    state.points = [];  // a new box starts a new object
    state.feedback = false;
  } else {
    // A point lies inside the image: at most its last pixel.
    const [x, y] = toOriginal(drag.start, width - 1, height - 1);
    state.points.push([x, y, event.shiftKey ? 0 : 1]);
    state.feedback = true;  // a further click refines the mask before it, as SamPredictor's mask_input
  }
  draw();
  predict();
}

async function predict() {
  if (!state.image) return;
  const request = { image: state.image.name, model: el("model").value };
  if (state.box) request.box = state.box;
  if (state.points.length) request.points = state.points;
  if (!request.box && !request.points) return;
  const before = samcache.lastPrediction;
  if (state.feedback && before && before.image === request.image && before.model === request.model) {
    request.previous = before.state;
  }
  const ticket = ++state.sent;
  setStatus("predicting", "predicting…");
  try {
    const answer = await api("POST", "/api/predict", request);
    if (ticket !== state.sent) return;
    samcache.lastRequest = request;
    samcache.lastPrediction = answer;
    const [h, w] = answer.segmentation.size;
    state.mask = decodeRle(answer.segmentation);
    state.maskLayer = maskLayer(state.mask, h, w, MASK_RGBA);
    el("save").disabled = false;
    showScores();
    draw();
    setStatus("predicted", `mask of ${answer.area} px from ${answer.model}`);
  } catch (error) {
    if (ticket === state.sent) setStatus("error", error.message);
  }
}

function showScores() {
  const prediction = samcache.lastPrediction;
  const current = prediction && state.mask && state.image && prediction.image === state.image.name;
  el("score").textContent = current ? prediction.score.toFixed(3) : "–";
  const iou = current ? truthIou(state.mask, state.truthMasks) : null;
  el("truth-iou").textContent = iou === null ? (current ? "no overlap" : "–") : iou.toFixed(3);
}

function clearPrompts() {
  state.box = null;
  state.points = [];
  state.drag = null;
  state.mask = null;
  state.maskLayer = null;
  state.sent++;  // an answer still on its way is for prompts that are gone
  samcache.lastPrediction = null;
  samcache.lastRequest = null;
  el("save").disabled = true;
  showScores();
  draw();
}

// ------------------------------------------------------------------------- saving

async function save() {
  const prediction = samcache.lastPrediction;
  const category = el("category").value.trim();
  if (!prediction || !state.objects) return;
  if (!category) {
    setStatus("error", "type a category first");
    return;
  }
  setStatus("saving", "saving…");
  el("save").disabled = true;
  try {
    const saved = await api("POST", "/api/objects", {
      image: prediction.image, version: state.objects.version,
      segmentation: prediction.segmentation, category,
    });
    await loadObjects();
    draw();
    setStatus("saved", `saved as object #${saved.object_id} (${category})`);
  } catch (error) {
    // A 409: the annotations changed since they were loaded; show them as they are now.
    setStatus("error", error.message);
    if (error.status === 409) await loadObjects().then(draw).catch(() => {});
  } finally {
    el("save").disabled = !samcache.lastPrediction;
  }
}

async function edit(action, object) {
  const prediction = samcache.lastPrediction;
  const body = { image: state.image.name, version: state.objects.version };
  if (action === "replace") {
    if (!prediction || prediction.image !== state.image.name) {
      setStatus("error", "draw a box for the new mask first");
      return;
    }
    body.segmentation = prediction.segmentation;
  } else if (action === "rename") {
    body.category = el("category").value.trim();
    if (!body.category) {
      setStatus("error", "type the new category first");
      return;
    }
  }
  setStatus("saving", "saving…");
  try {
    const url = `/api/objects/${object.id}`;
    if (action === "delete") {
      const query = new URLSearchParams({ image: body.image, version: body.version });
      await api("DELETE", `${url}?${query}`);
    } else {
      await api("PATCH", url, body);
    }
    await loadObjects();
    draw();
    setStatus("saved", `object #${object.id}: ${action === "delete" ? "deleted" : action + "d"}`);
  } catch (error) {
    setStatus("error", error.message);
    if (error.status === 409) await loadObjects().then(draw).catch(() => {});
  }
}

// ------------------------------------------------------------------------- fine-tuning

// A fine-tune runs in processes of the server's: the page follows its status through server-sent
// events (/api/finetune/events) and, once it is done, predicts with the new run's decoder.
const FINETUNE_RUNNING = ["refreshing", "training", "evaluating"];
const FINETUNE_SPLITS = ["val", "test"];
let finetuneEvents = null;

const fixed = (value, digits = 4) => (typeof value === "number" ? value.toFixed(digits) : "–");

function finetuneLine(status) {
  const run = status.run;
  switch (status.phase) {
    case "refreshing": return `${run}: taking the saved corrections into the cache…`;
    case "training": {
      const epoch = status.epoch === undefined ? "–" : `${status.epoch}/${status.epochs ?? "?"}`;
      return `${run}: training, epoch ${epoch}, step ${status.global_step ?? "–"}, loss ${fixed(status.loss)}, ` +
             `validation mIoU ${fixed(status.val_miou)}`;
    }
    case "evaluating": return `${run}: trained (validation mIoU ${fixed(status.val_miou)}); evaluating on ${status.split}…`;
    case "done": return `${run} done: ${status.note}`;
    case "failed": return `${run} failed: ${status.error}`;
    case "cancelled": return `${run}: ${status.note}`;
    default: return "trains a new run from the cache, with the saved corrections";
  }
}

function renderFinetuneTable(rows) {
  const table = el("finetune-table");
  table.hidden = !rows;
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const row of rows || []) {
    const line = document.createElement("tr");
    line.dataset.model = row.model;
    for (const text of [row.model, row.objects, fixed(row.miou), fixed(row.mdice), fixed(row.boundary_f)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      line.append(cell);
    }
    body.append(line);
  }
}

function showFinetune(status) {
  const line = el("finetune-status");
  line.dataset.phase = status.phase;
  line.textContent = finetuneLine(status);
  const running = FINETUNE_RUNNING.includes(status.phase);
  el("finetune-start").disabled = running;
  el("finetune-cancel").disabled = !running;
  renderFinetuneTable(status.phase === "done" ? status.table : null);
}

// The server serves the new run as fine_tuned now: select it, and ask again for the current prompts.
async function useNewRun() {
  const answer = await api("GET", "/api/images");
  const byName = new Map(answer.images.map((im) => [im.name, im]));
  for (const image of state.images) Object.assign(image, byName.get(image.name) || {});  // the refreshed counts
  renderImages();
  const select = el("model");
  for (const model of answer.models) {
    if (![...select.options].some((o) => o.value === model)) select.append(new Option(model, model));
  }
  select.value = "fine_tuned";
  await predict();
}

function watchFinetune() {
  if (finetuneEvents) finetuneEvents.close();
  const events = (finetuneEvents = new EventSource("/api/finetune/events"));
  events.onmessage = (message) => {
    const status = JSON.parse(message.data);
    showFinetune(status);
    if (FINETUNE_RUNNING.includes(status.phase)) return;
    events.close();  // the stream ends with the job: no reconnecting
    if (finetuneEvents === events) finetuneEvents = null;
    if (status.phase === "done") useNewRun().catch((error) => setStatus("error", error.message));
  };
}

async function startFinetune() {
  const body = {};
  const epochs = el("finetune-epochs").value.trim();
  if (epochs) body.epochs = Number(epochs);
  // The evaluation's split: the one the list shows, when it has ground truth to score.
  if (FINETUNE_SPLITS.includes(el("split").value)) body.split = el("split").value;
  el("finetune-start").disabled = true;
  try {
    await api("POST", "/api/finetune", body);
    watchFinetune();
  } catch (error) {
    el("finetune-status").textContent = error.message;
    el("finetune-start").disabled = false;
  }
}

async function cancelFinetune() {
  el("finetune-cancel").disabled = true;
  try {
    showFinetune(await api("POST", "/api/finetune/cancel"));
  } catch (error) {
    el("finetune-status").textContent = error.message;
  }
}

async function loadFinetune() {
  const status = await api("GET", "/api/finetune");
  showFinetune(status);
  if (FINETUNE_RUNNING.includes(status.phase)) watchFinetune();  // started before the page was (re)loaded
}

// ------------------------------------------------------------------------- wiring

view.addEventListener("mousedown", (event) => {
  if (event.button !== 0 || !state.image) return;
  const start = canvasPixel(event);
  state.drag = { start, now: start };
});
view.addEventListener("mousemove", (event) => {
  if (!state.drag) return;
  state.drag.now = canvasPixel(event);
  draw();
});
view.addEventListener("mouseup", onMouseUp);
view.addEventListener("mouseleave", () => {
  if (state.drag) {
    state.drag = null;
    draw();
  }
});
el("split").addEventListener("change", renderImages);
el("sort").addEventListener("change", renderImages);
el("category-filter").addEventListener("change", renderImages);
el("show-truth").addEventListener("change", draw);
el("show-mask").addEventListener("change", draw);
el("model").addEventListener("change", () => { renderImages(); predict(); });
el("clear").addEventListener("click", clearPrompts);
el("save").addEventListener("click", save);
el("finetune-start").addEventListener("click", startFinetune);
el("finetune-cancel").addEventListener("click", cancelFinetune);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") clearPrompts();
});

loadImages().then(loadFinetune).catch((error) => setStatus("error", error.message));

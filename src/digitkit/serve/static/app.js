// The drawing page: strokes in, /v1/predict while drawing, /v1/explain when a stroke ends; the Read number button
// sends the drawing to /v1/read, which reads several digits as one number (with the server's row reader when it has
// one, else by cutting the drawing into digits).
//
// State the tests read from <body>: data-state (idle | busy | ready | error), data-drawing (a counter bumped by
// every change to the drawing), data-answered (the drawing counter the shown answer belongs to), data-strokes,
// and data-predictions (answers shown so far). "ready" means: the pen is up and the answer, saliency
// included, is for the drawing on screen. The number read: data-reading (idle | busy | done | error) and
// data-read-for (the drawing counter the reading on screen belongs to).
"use strict";

const THROTTLE_MS = 120; // at most one prediction per this interval while drawing
const REASONS = {
  "empty": () => "Draw a digit",
  "no-ink": () => "Draw a digit (no ink found)",
  "not-a-digit": () => "That does not look like a digit",
  "unreadable": (a) => "Could not read the drawing" + (a.error ? ": " + a.error : ""),
  "low-confidence": (a) => a.predicted ? `Not sure: looks like ${a.predicted} (${pct(maxProb(a))})` : "Not sure",
};

// Why /v1/read gave no (sure) number: its `rejected` reasons.
const READ_REASONS = {
  "empty": "Nothing to read: write some digits",
  "no-ink": "Nothing to read (no ink found)",
  "too-wide": "The row is too wide to read",
  "no-match": "No reading matches the pattern",
  "low-confidence": "Not sure of this number",
  "unreadable": "Could not read the drawing",
};

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const body = document.body;

let classes = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
let strokes = []; // each a list of [x, y] in canvas pixels
let pointerId = null; // the pointer drawing the current stroke; others are ignored
let version = 0; // bumped by every change to the drawing
let inFlight = null; // {version, kind} of the request under way
let timer = null;
let lastSentAt = 0;
let apiKey = sessionStorage.getItem("digitkit-api-key") || "";
let lastAnswer = null;
let readInFlight = false;

function pct(p) {
  return (100 * p).toFixed(p >= 0.995 || p < 0.1 ? 0 : 1) + "%";
}

function maxProb(a) {
  return a.probabilities && a.probabilities.length ? Math.max(...a.probabilities) : a.confidence || 0;
}

function setState(state) {
  body.dataset.state = state;
}

// ------------------------------------------------------------------------------------------ drawing
function redraw() {
  ctx.fillStyle = "#fff"; // exported with the PNG: preprocessing sees dark ink on white
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = ctx.fillStyle = "#111";
  ctx.lineWidth = canvas.width / 14; // ~2 px at 28x28 after preprocessing, like MNIST's pen
  ctx.lineCap = ctx.lineJoin = "round";
  for (const pts of strokes) {
    if (pts.length === 1) {
      ctx.beginPath();
      ctx.arc(pts[0][0], pts[0][1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
      continue;
    }
    // Quadratic curves through the midpoints: smooth strokes from jittery pointer samples.
    ctx.beginPath();
    ctx.moveTo(pts[0][0], pts[0][1]);
    for (let i = 1; i < pts.length - 1; i++) {
      const [x, y] = pts[i];
      ctx.quadraticCurveTo(x, y, (x + pts[i + 1][0]) / 2, (y + pts[i + 1][1]) / 2);
    }
    const last = pts[pts.length - 1];
    ctx.lineTo(last[0], last[1]);
    ctx.stroke();
  }
}

let frameRequested = false;
function redrawSoon() {
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(() => { frameRequested = false; redraw(); });
  }
}

function point(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}

canvas.addEventListener("pointerdown", (e) => {
  if (pointerId !== null || (e.pointerType === "mouse" && e.button !== 0)) return;
  e.preventDefault();
  pointerId = e.pointerId;
  try {
    canvas.setPointerCapture(e.pointerId); // keep the stroke when the pointer leaves the canvas
  } catch (_) { /* a synthetic event has no capturable pointer; drawing works without capture */ }
  strokes.push([point(e)]);
  changed();
});

canvas.addEventListener("pointermove", (e) => {
  if (e.pointerId !== pointerId) return;
  e.preventDefault();
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
  const stroke = strokes[strokes.length - 1];
  for (const ev of events.length ? events : [e]) stroke.push(point(ev));
  changed();
});

function endStroke(e) {
  if (e.pointerId !== pointerId) return;
  pointerId = null;
  changed();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
canvas.addEventListener("lostpointercapture", endStroke);

function undo() {
  if (pointerId !== null || !strokes.length) return;
  strokes.pop();
  changed();
}

function clearDrawing() {
  if (pointerId !== null || !strokes.length) return;
  strokes = [];
  changed();
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearDrawing);
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement) return;
  if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  } else if (e.key === "Escape" || e.key === "Delete") {
    clearDrawing();
  }
});

// ------------------------------------------------------------------------------------------ predicting
function changed() {
  version++;
  body.dataset.drawing = version;
  body.dataset.strokes = strokes.length;
  $("undo").disabled = $("clear").disabled = strokes.length === 0;
  $("read").disabled = strokes.length === 0 || readInFlight;
  hideReading(); // a number read from an earlier drawing is not this drawing's
  redrawSoon();
  schedule(pointerId === null);
}

// At most one request in flight; the latest drawing wins. While the pen is down, predictions are throttled;
// when it lifts, the drawing is explained (prediction + saliency) at once.
function schedule(now) {
  if (inFlight) return; // its completion calls schedule again if the drawing moved on
  if (!strokes.length) {
    clearTimeout(timer);
    timer = null;
    showEmpty();
    return;
  }
  setState("busy");
  if (timer !== null && !now) return;
  clearTimeout(timer);
  const wait = now ? 0 : Math.max(0, THROTTLE_MS - (performance.now() - lastSentAt));
  timer = setTimeout(send, wait);
}

async function send() {
  timer = null;
  if (!strokes.length) return schedule(true);
  redraw(); // the export must hold every point, not wait for the next frame
  const kind = pointerId === null ? "explain" : "predict";
  const sent = { version, kind };
  inFlight = sent;
  lastSentAt = performance.now();
  const image = canvas.toDataURL("image/png");
  const payload = kind === "explain"
    ? { image, methods: ["saliency"] }
    : { image, top_k: 3, return_input: true, preview: true }; // a half-drawn digit: kept out of drift statistics
  let answer = null;
  try {
    answer = await api("/v1/" + kind, payload);
  } catch (err) {
    inFlight = null;
    showError(err);
    return;
  }
  inFlight = null;
  const current = sent.version === version;
  if (strokes.length) show(answer, sent.version, current && kind === "explain");
  if (!current || (kind === "predict" && pointerId === null)) schedule(pointerId === null);
  else if (kind === "explain") setState("ready");
}

async function api(path, payload) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers["X-API-Key"] = apiKey;
  let response;
  try {
    response = await fetch(path, payload === undefined ? { headers } : {
      method: "POST", headers, body: JSON.stringify(payload),
    });
  } catch (e) {
    throw { status: 0, error: "server unreachable", detail: "is digitkit serve still running? (" + e.message + ")" };
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) { /* not JSON: reported below by status */ }
  if (!response.ok) {
    throw { status: response.status, error: (data && data.error) || response.statusText,
            detail: data && data.detail };
  }
  return data;
}

// ------------------------------------------------------------------------------------------ reading a number
$("read").addEventListener("click", readNumber);

async function readNumber() {
  if (readInFlight || pointerId !== null || !strokes.length) return;
  redraw(); // the export must hold every point, not wait for the next frame
  const image = canvas.toDataURL("image/png");
  const sent = version;
  readInFlight = true;
  $("read").disabled = true;
  body.dataset.reading = "busy";
  let answer = null;
  let failure = null;
  try {
    answer = await api("/v1/read", { image });
  } catch (err) {
    failure = err;
  }
  readInFlight = false;
  $("read").disabled = strokes.length === 0;
  if (sent !== version) { // the drawing changed meanwhile: this reading is not of what is on screen
    body.dataset.reading = "idle";
    return;
  }
  if (failure) showReadError(failure);
  else await showReading(answer, image, sent);
}

async function showReading(a, image, drawingVersion) {
  const text = a.text || "";
  $("read-text").textContent = text || "\u2013";
  const whole = typeof a.confidence === "number"; // the row reader: the probability of the whole string
  $("read-confidence").textContent = !text ? "" : whole ? `${pct(a.confidence)} sure of the number`
    : `${pct(a.mean_confidence)} sure per digit (mean)`;
  let message = "";
  if (a.rejected) message = (READ_REASONS[a.rejected] || a.rejected) + (a.why ? ": " + a.why : "");
  else if (!a.complete && text) message = "Some digits could not be read (shown as ?)";
  $("read-message").textContent = message;
  await drawBoxes(image, a.digits || []);
  if (drawingVersion !== version) { // the drawing changed while the picture decoded
    body.dataset.reading = "idle";
    return;
  }
  const how = a.reader === "sequence" ? "row reader" : "digits cut out and classified";
  $("read-status").textContent = `${a.latency_ms.toFixed(1)} ms · ${how} · ${a.model_version}`;
  $("reading").hidden = false;
  body.dataset.readFor = drawingVersion;
  body.dataset.reading = "done";
}

// The drawing as it was sent, with each digit's box (the boxes are in the sent image's pixels).
async function drawBoxes(image, digits) {
  const out = $("read-boxes");
  const g = out.getContext("2d");
  const img = new Image();
  img.src = image;
  try {
    await img.decode();
    g.drawImage(img, 0, 0, out.width, out.height);
  } catch (_) {
    g.fillStyle = "#fff";
    g.fillRect(0, 0, out.width, out.height);
  }
  const sx = out.width / canvas.width;
  const sy = out.height / canvas.height;
  g.lineWidth = 3;
  g.font = "bold 22px system-ui, sans-serif";
  g.textBaseline = "bottom";
  for (const d of digits) {
    const [x0, y0, x1, y1] = d.box;
    g.strokeStyle = g.fillStyle = d.digit === null || d.rejected ? "#b91c1c" : "#1d4ed8";
    g.strokeRect(x0 * sx, y0 * sy, Math.max(1, (x1 - x0) * sx), Math.max(1, (y1 - y0) * sy));
    g.fillText(d.digit === null ? "?" : d.digit, x0 * sx, Math.max(22, y0 * sy - 2));
  }
  out.dataset.boxes = String(digits.length);
}

function showReadError(err) {
  body.dataset.reading = "error";
  if (err.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
  }
  const detail = typeof err.detail === "string" ? err.detail : err.detail ? JSON.stringify(err.detail) : "";
  $("read-text").textContent = "";
  $("read-confidence").textContent = "";
  $("read-message").textContent = "";
  $("read-boxes").getContext("2d").clearRect(0, 0, $("read-boxes").width, $("read-boxes").height);
  $("read-boxes").dataset.boxes = "0";
  const code = err.status ? " " + err.status : "";
  $("read-status").textContent = `Error${code}: ${err.error}${detail ? ": " + detail : ""}`;
  $("reading").hidden = false;
}

function hideReading() {
  $("reading").hidden = true;
  if (body.dataset.reading !== "busy") body.dataset.reading = "idle";
}

// ------------------------------------------------------------------------------------------ showing
function buildBars() {
  const bars = $("bars");
  bars.replaceChildren();
  for (const c of classes) {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.digit = c;
    row.dataset.p = "0";
    row.setAttribute("role", "listitem");
    row.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span>' +
      '<span class="value">0%</span>';
    row.querySelector(".label").textContent = c;
    bars.append(row);
  }
  const fb = $("feedback-buttons");
  fb.replaceChildren();
  for (const c of classes) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = c;
    b.setAttribute("aria-label", "the right answer is " + c);
    b.addEventListener("click", () => sendFeedback(c));
    fb.append(b);
  }
}

function setBars(probs) {
  const top = probs.length ? probs.indexOf(Math.max(...probs)) : -1;
  $("bars").querySelectorAll(".bar").forEach((row, i) => {
    const p = probs[i] || 0;
    row.dataset.p = String(p);
    row.classList.toggle("top", i === top);
    row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    row.querySelector(".value").textContent = pct(p);
    row.setAttribute("aria-label", `${classes[i]}: ${pct(p)}`);
  });
}

function setImage(id, b64) {
  const img = $(id);
  if (b64) {
    img.src = "data:image/png;base64," + b64;
    img.hidden = false;
  } else {
    img.removeAttribute("src");
    img.hidden = true;
  }
}

function show(a, drawingVersion, final) {
  lastAnswer = a;
  $("digit").textContent = a.digit !== null ? a.digit : "?";
  $("confidence").textContent = a.digit !== null ? pct(a.confidence) + " sure" : "";
  $("message").textContent = a.rejected ? (REASONS[a.rejected] || (() => a.rejected))(a) : "";
  setBars(a.probabilities || []);
  setImage("input-image", a.input_png);
  if (final) {
    const overlay = a.overlays && a.overlays.saliency;
    setImage("saliency-image", overlay);
    $("feedback").hidden = !a.request_id;
    $("feedback-result").textContent = "";
  }
  $("status").textContent = `${a.latency_ms.toFixed(1)} ms${a.cached ? " (cached)" : ""} · model ${a.model_version}`;
  body.dataset.answered = drawingVersion;
  body.dataset.predictions = Number(body.dataset.predictions) + 1;
}

function showEmpty() {
  lastAnswer = null;
  $("digit").textContent = "";
  $("confidence").textContent = "";
  $("message").textContent = "Draw a digit";
  setBars([]);
  setImage("input-image", null);
  setImage("saliency-image", null);
  $("feedback").hidden = true;
  $("status").textContent = "";
  body.dataset.answered = version;
  setState("idle");
}

function showError(err) {
  setState("error");
  if (err.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
  }
  const detail = typeof err.detail === "string" ? err.detail : err.detail ? JSON.stringify(err.detail) : "";
  $("status").textContent = `Error${err.status ? " " + err.status : ""}: ${err.error}${detail ? ": " + detail : ""}`;
}

async function sendFeedback(label) {
  if (!lastAnswer || !lastAnswer.request_id) return;
  try {
    const out = await api("/v1/feedback", { request_id: lastAnswer.request_id, true_label: label });
    $("feedback-result").textContent = out.correct ? "Thanks: the model had it right." : `Thanks: noted as ${label}.`;
  } catch (err) {
    $("feedback-result").textContent = "Feedback not recorded: " + err.error;
  }
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem("digitkit-api-key", apiKey);
  $("key-form").hidden = true;
  $("status").textContent = "";
  schedule(true);
});

async function loadModel() {
  try {
    const m = await api("/v1/model");
    if (Array.isArray(m.classes) && m.classes.join() !== classes.join()) {
      classes = m.classes.map(String);
      buildBars();
    }
    const acc = m.metrics && (m.metrics.test_accuracy ?? m.metrics.val_accuracy);
    const which = m.metrics && m.metrics.test_accuracy !== undefined ? "test" : "validation";
    const rows = m.reader && m.reader.kind === "sequence" ? ` · numbers read by ${m.reader.name} (row reader)` : "";
    const score = acc !== undefined ? ` · ${(100 * acc).toFixed(2)}% ${which} accuracy` : "";
    $("model-info").textContent = `model ${m.name}` + score + rows;
  } catch (err) {
    $("model-info").textContent = "model information unavailable (" + err.error + ")";
  }
  body.dataset.loaded = "1";
}

buildBars();
redraw();
loadModel();

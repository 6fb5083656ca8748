// ferflow demo page: plain JavaScript (fetch, getUserMedia, canvas), nothing loaded from elsewhere.
"use strict";

const PHOTO_TIMEOUT_MS = 60000;
const FRAME_TIMEOUT_MS = 10000;
const VIDEO_TIMEOUT_MS = 15 * 60 * 1000;
const FPS_WINDOW_MS = 2000; // frames/s shown: labelled frames over the last 2 s

let info = null; // GET /api/info: classes and upload limits
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showMessage(node, text, kind = "error") {
  node.textContent = text;
  node.className = `message ${kind === "error" ? "" : kind}`.trim();
  node.hidden = !text;
}

const megabytes = (n) => `${(n / 1e6).toFixed(1)} MB`;

// POST a file or blob; resolve to the JSON answer or reject with a sentence for the page.
async function post(url, body, timeoutMs) {
  const control = new AbortController();
  const timer = setTimeout(() => control.abort(), timeoutMs);
  try {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        body,
        signal: control.signal,
        headers: { "Content-Type": "application/octet-stream" },
      });
    } catch (err) {
      throw new Error(control.signal.aborted
        ? `the server did not answer within ${timeoutMs / 1000} s`
        : `cannot reach the demo server (${err.message}); is \`ferflow demo\` still running?`);
    }
    let payload;
    try {
      payload = await response.json();
    } catch (err) {
      throw new Error(control.signal.aborted
        ? `the server did not answer within ${timeoutMs / 1000} s`
        : `the server answered ${response.status} ${response.statusText} without a readable reason`);
    }
    if (!response.ok) throw new Error(payload.error || `the server answered ${response.status}`);
    return payload;
  } finally {
    clearTimeout(timer);
  }
}

// Boxes as absolutely placed elements, in % of the picture: they stay on the faces when the
// picture is scaled, and the page (and its tests) can read every label as text.
function drawBoxes(stage, faces, width, height) {
  stage.querySelectorAll(".face-box").forEach((node) => node.remove());
  for (const face of faces) {
    const [x, y, w, h] = face.box;
    const found = face.found !== false;
    const box = el("div", `face-box${found ? "" : " whole"}${y < height * 0.08 ? " top" : ""}`);
    Object.assign(box.style, {
      left: `${(100 * x) / width}%`, top: `${(100 * y) / height}%`,
      width: `${(100 * w) / width}%`, height: `${(100 * h) / height}%`,
    });
    const id = face.id === undefined ? "" : `#${face.id} `;
    const text = `${id}${face.label} ${face.confidence.toFixed(2)}${found ? "" : " (no face found)"}`;
    box.append(el("span", "label", text));
    box.dataset.label = face.label;
    stage.append(box);
  }
}

// ------------------------------------------------------------------ photos

function photoFaces(result) {
  return result.faces.map((f) => ({
    box: f.face_box, label: f.label, confidence: f.confidence, found: f.face_found, top3: f.top3,
  }));
}

async function showPhoto(file) {
  const card = el("div", "photo-result");
  card.append(el("h3", "", file.name));
  const message = el("p", "message info", "classifying...");
  card.append(message);
  $("photos").prepend(card);
  if (info && file.size > info.max_photo_bytes) {
    showMessage(message, `${file.name}: ${megabytes(file.size)}, over the limit of ${megabytes(info.max_photo_bytes)} a photo`);
    return;
  }
  let result;
  try {
    result = await post(`/api/photo?name=${encodeURIComponent(file.name)}`, file, PHOTO_TIMEOUT_MS);
  } catch (err) {
    showMessage(message, err.message);
    return;
  }
  const faces = photoFaces(result);
  const found = faces.filter((f) => f.found).length;
  showMessage(message, found ? `${found} face${found > 1 ? "s" : ""}` : "no face found: the whole picture was classified", "info");
  const stage = el("div", "stage");
  const img = el("img");
  img.alt = file.name;
  stage.append(img);
  card.append(stage);
  const list = el("ul");
  for (const f of faces) {
    list.append(el("li", "", `${f.label} ${f.confidence.toFixed(2)}; top 3: ${f.top3.map(([c, p]) => `${c} ${p.toFixed(2)}`).join(", ")}`));
  }
  card.append(list);
  img.src = URL.createObjectURL(file);
  try {
    await img.decode();
    drawBoxes(stage, faces, img.naturalWidth, img.naturalHeight);
  } catch (err) {
    stage.remove(); // a format the server reads but this browser cannot show (TIFF): the list stays
  }
  card.dataset.done = "true";
}

function setUpPhotos() {
  const drop = $("drop");
  const input = $("photo-input");
  input.addEventListener("change", () => {
    [...input.files].forEach(showPhoto);
    input.value = "";
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    [...e.dataTransfer.files].forEach(showPhoto);
  });
  // a file dropped beside the drop zone must not make the browser leave the page
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
}

// ------------------------------------------------------------------ webcam

const camera = { stream: null, running: false, id: "", frames: 0, labelled: 0, times: [] };
window.ferflowDemo = { camera }; // read by tests/test_demo.py

function updateFps() {
  const now = performance.now();
  while (camera.times.length && camera.times[0] < now - FPS_WINDOW_MS) camera.times.shift();
  const span = Math.min(FPS_WINDOW_MS, now - camera.startedAt);
  camera.fps = span > 0 ? (1000 * camera.times.length) / span : 0;
  const badge = $("fps");
  badge.hidden = false;
  badge.textContent = `${camera.fps.toFixed(1)} labelled frames/s`;
}

async function cameraLoop(video, stage) {
  const canvas = el("canvas");
  const context = canvas.getContext("2d");
  const message = $("camera-message");
  while (camera.running) {
    if (video.readyState < 2 || !video.videoWidth) {
      await new Promise((r) => setTimeout(r, 20));
      continue;
    }
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    context.drawImage(video, 0, 0);
    const blob = await new Promise((r) => canvas.toBlob(r, "image/jpeg", 0.85));
    let result;
    try {
      result = await post(`/api/frame?stream=${camera.id}`, blob, FRAME_TIMEOUT_MS);
    } catch (err) {
      showMessage(message, err.message);
      await new Promise((r) => setTimeout(r, 500));
      continue;
    }
    if (!camera.running) break;
    showMessage(message, "");
    drawBoxes(stage, result.faces, result.width, result.height);
    camera.frames += 1;
    if (result.faces.length) {
      camera.labelled += 1;
      camera.times.push(performance.now());
    }
    updateFps();
  }
}

async function startCamera() {
  const button = $("camera-toggle");
  const message = $("camera-message");
  const video = $("camera");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage(message, "this browser gives no camera access here (it needs http://127.0.0.1 or https)");
    return;
  }
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    showMessage(message, `cannot use the webcam: ${err.name}: ${err.message}`);
    return;
  }
  video.srcObject = camera.stream;
  $("camera-stage").hidden = false;
  await video.play().catch(() => {});
  Object.assign(camera, { running: true, id: Math.random().toString(36).slice(2, 10), startedAt: performance.now(), times: [] });
  button.textContent = "Turn off the webcam";
  cameraLoop(video, $("camera-stage"));
}

function stopCamera() {
  camera.running = false;
  if (camera.stream) camera.stream.getTracks().forEach((t) => t.stop());
  camera.stream = null;
  $("camera").srcObject = null;
  $("camera-stage").hidden = true;
  $("camera-toggle").textContent = "Turn on the webcam";
}

// ------------------------------------------------------------------ video

function tableRows(table, rows) {
  table.replaceChildren(...rows.map(([key, value]) => {
    const tr = el("tr");
    tr.append(el("th", "", key), el("td", "", String(value)));
    return tr;
  }));
}

const shares = (share) => Object.entries(share).filter(([, v]) => v > 0)
  .sort((a, b) => b[1] - a[1]).map(([c, v]) => `${c} ${(100 * v).toFixed(0)}%`).join(", ") || "-";

function showVideo(result) {
  const s = result.summary;
  tableRows($("video-summary"), [
    ["video", s.source], ["size", `${s.width}x${s.height}, ${s.fps} fps`], ["duration", `${s.duration_s} s`],
    ["frames processed", `${s.frames_processed} (${result.frames_per_second} frames/s)`],
    ["frames with faces", s.frames_with_faces], ["face ids", s.faces],
    ["dominant emotion", s.dominant_emotion || "no faces"], ["emotion shares", shares(s.emotion_share)],
  ]);
  tableRows($("video-faces"), s.per_face.map((f) => [
    `#${f.face_id}`, `${f.dominant_emotion} (${f.first_s}-${f.last_s} s, ${f.detections} frames): ${shares(f.emotion_share)}`,
  ]));
  $("video-timeline").src = result.timeline_png;
  $("video-result").hidden = false;
}

async function uploadVideo(file) {
  const status = $("video-status");
  const message = $("video-message");
  $("video-result").hidden = true;
  showMessage(message, "");
  if (info && file.size > info.max_video_bytes) {
    showMessage(message, `${file.name}: ${megabytes(file.size)}, over the limit of ${megabytes(info.max_video_bytes)} (ferflow demo --max-video-mb)`);
    return;
  }
  status.textContent = `analysing ${file.name} (${megabytes(file.size)})...`;
  try {
    showVideo(await post(`/api/video?name=${encodeURIComponent(file.name)}`, file, VIDEO_TIMEOUT_MS));
    status.textContent = `${file.name}: done`;
  } catch (err) {
    status.textContent = "";
    showMessage(message, err.message);
  }
}

// ------------------------------------------------------------------ start

async function main() {
  setUpPhotos();
  $("camera-toggle").addEventListener("click", () => (camera.running ? stopCamera() : startCamera()));
  const input = $("video-input");
  input.addEventListener("change", () => {
    if (input.files.length) uploadVideo(input.files[0]);
    input.value = "";
  });
  try {
    const response = await fetch("/api/info");
    info = await response.json();
    $("model").textContent = `${info.model}; face detector: ${info.detector}`;
  } catch (err) {
    $("model").textContent = `cannot reach the demo server: ${err.message}`;
  }
}

main();

// lapsam app: the page. Talks only to the local server that served it (see runtime/app/server.py).
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

const view = {
  state: null,        // the server's state (GET /api/state)
  z: 0,               // slice shown
  image: null,        // ImageBitmap of the slice
  mask: null,         // ImageBitmap of the slice's labels (RGBA)
  maskPixels: 0,      // non-transparent pixels in `mask` (tests read it)
  imageKey: "",       // what `image` shows (generation, window, z)
  maskKey: "",        // what `mask` shows (generation, rev, z)
  drag: null,         // {x0, y0, x1, y1} while drawing
  polling: false,
};

// ---- server calls -------------------------------------------------------------------------
async function call(method, url, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let res;
  try { res = await fetch(url, opts); } catch (e) { throw new Error("the lapsam server does not answer"); }
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

async function act(action, body) {
  try {
    const out = await call("POST", `/api/${action}`, body === undefined ? {} : body);
    if (out.state) await apply(out.state);
    return out;
  } catch (e) { showError(e.message); return null; }
}

function showError(msg) { message(msg, false); }
function message(msg, info) {
  const m = $("message");
  m.textContent = msg;
  m.className = info ? "info" : "";
  m.hidden = !msg;
  clearTimeout(message.timer);
  if (msg) message.timer = setTimeout(() => { m.hidden = true; }, info ? 4000 : 9000);
}

async function refresh() {
  try { await apply(await call("GET", "/api/state")); } catch (e) { showError(e.message); }
}

// ---- state -> page --------------------------------------------------------------------------
async function apply(state) {
  const old = view.state;
  view.state = state;
  const img = state.image;
  $("model-name").textContent = `model: ${state.model}`;
  $("image-name").textContent = img ? `${img.name} · ${img.source} · ${img.is_3d ? `${img.depth}×` : ""}${img.height}×${img.width}` +
    (img.modality ? ` · ${img.modality}` : "") : "no image";
  if (img && (!old || old.generation !== state.generation)) {
    view.z = img.is_3d ? Math.floor(img.depth / 2) : 0;
    if (state.message) message(state.message, true);
  }
  $("file-boxes").hidden = !(img && img.boxes_in_file > 0);
  // window
  $("window-section").hidden = !img || (state.windows.length <= 1 && img.rgb);
  const sel = $("window");
  const names = state.windows.map((w) => w.name);
  if (state.window && !names.includes(state.window.name)) names.push(state.window.name);
  if (sel.dataset.names !== names.join("|")) {
    sel.innerHTML = "";
    for (const w of state.windows.concat(state.window && !state.windows.some((x) => x.name === state.window.name) ? [state.window] : [])) {
      const o = document.createElement("option");
      o.value = w.name; o.textContent = w.label; sel.appendChild(o);
    }
    sel.dataset.names = names.join("|");
  }
  if (state.window) sel.value = state.window.name;
  // objects
  const ul = $("objects");
  ul.innerHTML = "";
  for (const o of state.objects) {
    const li = document.createElement("li");
    li.className = o.label === state.current ? "current" : "";
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = o.colour;
    const t = document.createElement("span");
    const nb = Object.keys(o.boxes).length;
    let text = `Object ${o.label}`;
    if (nb) text += ` · ${nb} box${nb > 1 ? "es" : ""}`;
    const nc = o.fg.length + o.bg.length;
    if (nc) text += ` · ${nc} click${nc > 1 ? "s" : ""}`;
    if (img && img.is_3d && (o.z_marks[0] !== null || o.z_marks[1] !== null))
      text += ` · z ${o.z_marks[0] ?? "…"}–${o.z_marks[1] ?? "…"}`;
    if (o.propagated) text += " · 3D";
    t.textContent = text;
    li.append(sw, t);
    li.onclick = () => act("select", { label: o.label });
    ul.appendChild(li);
  }
  $("new-object").disabled = !img;
  $("undo").disabled = !state.undo;
  $("undo").title = state.undo ? `undo: ${state.undo}` : "";
  $("clear").disabled = !img || state.objects.length === 0;
  for (const b of document.querySelectorAll(".save")) b.disabled = !img;
  // 3D
  const is3d = !!(img && img.is_3d);
  $("z-section").hidden = !is3d;
  if (is3d) {
    $("z").max = img.depth - 1;
    $("z").value = view.z;
    $("z-label").textContent = `${view.z} / ${img.depth - 1}`;
  }
  const job = state.job;
  const running = !!(job && job.state === "running");
  $("job").hidden = !running;
  if (running) {
    const bar = $("progress");
    if (job.total > 0) { bar.max = job.total; bar.value = job.done; } else bar.removeAttribute("value");
  }
  for (const id of ["propagate", "propagate-all", "mark-start", "mark-end", "mark-clear"])
    $(id).disabled = running || !is3d || (id !== "propagate-all" && state.current === null);
  if (old && old.job && old.job.state === "running" && job && job.state !== "running")
    message(job.message, job.state === "done");
  if (running && !view.polling) poll();
  // info
  const last = state.last || {};
  const info = [];
  if (last.what === "box")
    info.push(`mask in ${last.ms} ms (${last.cached === null ? "box window encoded" : last.cached ? "embedding kept" : "slice encoded"})`);
  if (last.what === "click") info.push(`click: ${last.ms} ms`);
  if (job && job.state === "done") info.push(`${job.what}: ${job.seconds.toFixed(1)} s`);
  info.push(`kept embeddings: ${state.cache.slices} slice(s), ${state.cache.mb} MiB`);
  $("info").textContent = info.join(" · ");
  await draw();
}

async function poll() {
  view.polling = true;
  try {
    while (view.state && view.state.job && view.state.job.state === "running") {
      await new Promise((r) => setTimeout(r, 300));
      await refresh();
    }
  } finally { view.polling = false; }
}

// ---- drawing -------------------------------------------------------------------------------
async function bitmap(url) {
  const res = await fetch(url, { cache: "no-store" });
  if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error || `HTTP ${res.status}`);
  return createImageBitmap(await res.blob());
}

async function draw() {
  const s = view.state;
  if (!s || !s.image) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  const z = view.z;
  const ikey = `${s.generation}/${s.window && s.window.name}/${z}`;
  const mkey = `${s.generation}/${s.rev}/${z}`;
  try {
    if (ikey !== view.imageKey) { view.image = await bitmap(`/api/slice/${z}.png?k=${encodeURIComponent(ikey)}`); view.imageKey = ikey; }
    if (mkey !== view.maskKey) {
      view.mask = await bitmap(`/api/mask/${z}.png?k=${encodeURIComponent(mkey)}`);
      view.maskKey = mkey;
      view.maskPixels = countPixels(view.mask);
    }
  } catch (e) { showError(e.message); return; }
  if (view.z !== z) return; // the slider moved meanwhile; a newer draw follows
  paint();
}

function countPixels(bmp) {
  const c = document.createElement("canvas");
  c.width = bmp.width; c.height = bmp.height;
  const g = c.getContext("2d");
  g.drawImage(bmp, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}

function paint() {
  const s = view.state;
  if (!view.image) return;
  if (canvas.width !== view.image.width || canvas.height !== view.image.height) {
    canvas.width = view.image.width; canvas.height = view.image.height;
  }
  fit();
  ctx.globalAlpha = 1;
  ctx.drawImage(view.image, 0, 0);
  if (view.mask) { ctx.globalAlpha = 0.45; ctx.drawImage(view.mask, 0, 0); ctx.globalAlpha = 1; }
  const lw = Math.max(1, Math.round(canvas.width / 400));
  for (const o of s.objects) {
    const b = o.boxes[String(view.z)];
    if (!b) continue;
    ctx.strokeStyle = o.colour;
    ctx.lineWidth = o.label === s.current ? 2 * lw : lw;
    ctx.strokeRect(b[0] + 0.5, b[1] + 0.5, b[2] - b[0], b[3] - b[1]);
  }
  const r = Math.max(3, Math.round(canvas.width / 110));
  for (const o of s.objects) {
    for (const [kind, pts] of [["fg", o.fg], ["bg", o.bg]]) {
      for (const p of pts) {
        if (p[0] !== view.z) continue;
        ctx.beginPath();
        ctx.arc(p[2] + 0.5, p[1] + 0.5, r, 0, 2 * Math.PI);
        ctx.fillStyle = kind === "fg" ? "#2ecc40" : "#ff4136";
        ctx.fill();
        ctx.lineWidth = Math.max(1, r / 3);
        ctx.strokeStyle = o.label === s.current ? "#ffffff" : o.colour;
        ctx.stroke();
      }
    }
  }
  if (view.drag && view.drag.tool === "box") {
    const d = view.drag;
    const cur = s.objects.find((o) => o.label === s.current);
    ctx.strokeStyle = cur ? cur.colour : "#ffffff";
    ctx.lineWidth = lw;
    ctx.setLineDash([4 * lw, 3 * lw]);
    ctx.strokeRect(Math.min(d.x0, d.x1) + 0.5, Math.min(d.y0, d.y1) + 0.5, Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0));
    ctx.setLineDash([]);
  }
}

// the canvas keeps the image's pixels and is shown as large as the view allows
function fit() {
  const v = $("view");
  const cs = getComputedStyle(v);
  const w = v.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const h = v.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom);
  const s = Math.max(0.05, Math.min(w / canvas.width, h / canvas.height));
  canvas.style.width = `${Math.floor(canvas.width * s)}px`;
  canvas.style.height = `${Math.floor(canvas.height * s)}px`;
}
window.addEventListener("resize", fit);

// ---- mouse: boxes --------------------------------------------------------------------------
function imagePoint(e) {
  const r = canvas.getBoundingClientRect();
  const x = Math.floor((e.clientX - r.left) * canvas.width / r.width);
  const y = Math.floor((e.clientY - r.top) * canvas.height / r.height);
  return [Math.min(canvas.width - 1, Math.max(0, x)), Math.min(canvas.height - 1, Math.max(0, y))];
}

canvas.addEventListener("mousedown", (e) => {
  if (e.button !== 0 || !view.state || !view.state.image) return;
  const [x, y] = imagePoint(e);
  const tool = document.querySelector('input[name="tool"]:checked').value;
  view.drag = { x0: x, y0: y, x1: x, y1: y, tool };
  call("POST", "/api/prepare", { z: view.z }).catch(() => {}); // encode the slice while the box is drawn
  e.preventDefault();
});
window.addEventListener("mousemove", (e) => {
  if (!view.drag) return;
  [view.drag.x1, view.drag.y1] = imagePoint(e);
  paint();
});
window.addEventListener("mouseup", async (e) => {
  if (!view.drag) return;
  const d = view.drag;
  [d.x1, d.y1] = imagePoint(e);
  view.drag = null;
  if (d.tool !== "box") {
    await act("click", { z: view.z, x: d.x0, y: d.y0, positive: d.tool === "fg" });
    return;
  }
  const box = [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
  if (box[2] - box[0] < 2 || box[3] - box[1] < 2) { paint(); return; }
  await act("box", { z: view.z, box });
});

// ---- slices --------------------------------------------------------------------------------
function setSlice(z) {
  const img = view.state && view.state.image;
  if (!img || !img.is_3d) return;
  view.z = Math.max(0, Math.min(img.depth - 1, z));
  $("z").value = view.z;
  $("z-label").textContent = `${view.z} / ${img.depth - 1}`;
  draw();
}
$("z").addEventListener("input", (e) => setSlice(parseInt(e.target.value, 10)));
canvas.addEventListener("wheel", (e) => { e.preventDefault(); setSlice(view.z + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });

// ---- controls -------------------------------------------------------------------------------
async function upload(files) {
  if (!files.length) return;
  const size = files.reduce((n, f) => n + (f.file || f).size, 0);
  const limit = view.state && view.state.max_upload_mb;
  if (limit && size > limit * 1048576) {
    showError(`${(size / 1048576).toFixed(0)} MiB is over the upload limit of ${limit} MiB (lapsam app --max-upload-mb)`);
    return;
  }
  const fd = new FormData();
  for (const f of files) fd.append("files", f.file || f, f.path || f.webkitRelativePath || f.name);
  message(`opening ${files.length === 1 ? (files[0].name || files[0].file.name) : files.length + " files"} …`, true);
  try { await apply(await call("POST", "/api/open", fd)); message("", true); } catch (e) { showError(e.message); }
}
$("file").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
$("folder").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
$("path-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const path = $("path").value.trim();
  if (!path) return;
  message(`opening ${path} …`, true);
  try { await apply(await call("POST", "/api/open-path", { path })); message("", true); } catch (err) { showError(err.message); }
});
$("file-boxes").onclick = () => act("file-boxes");
$("window").addEventListener("change", (e) => act("window", { name: e.target.value }));
$("custom-window").addEventListener("submit", (e) => {
  e.preventDefault();
  act("window", { name: `${$("level").value},${$("width").value}` });
});
$("new-object").onclick = () => act("object");
$("mark-start").onclick = () => act("mark", { which: "start", z: view.z });
$("mark-end").onclick = () => act("mark", { which: "end", z: view.z });
$("mark-clear").onclick = async () => { if (await act("mark", { which: "start", z: null })) act("mark", { which: "end", z: null }); };
$("propagate").onclick = () => act("propagate", { labels: [view.state.current] });
$("propagate-all").onclick = () => act("propagate", {});
$("cancel").onclick = () => act("cancel");
$("undo").onclick = () => act("undo");
$("clear").onclick = () => act("clear");
for (const b of document.querySelectorAll(".save")) {
  b.addEventListener("click", () => {
    const fmt = b.dataset.format;
    const a = document.createElement("a");
    a.href = `/api/save?format=${encodeURIComponent(fmt)}&z=${view.z}`;
    a.download = "";
    document.body.appendChild(a); a.click(); a.remove();
  });
}
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" && ["text", "number", "file"].includes(e.target.type)) return;
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); act("undo"); }
  else if (e.key === "ArrowUp" || e.key === "PageUp") { e.preventDefault(); setSlice(view.z + 1); }
  else if (e.key === "ArrowDown" || e.key === "PageDown") { e.preventDefault(); setSlice(view.z - 1); }
  else if (e.key === "n" && !e.ctrlKey && !e.metaKey) act("object");
  else if (e.key === "b" || e.key === "+" || e.key === "=" || e.key === "-") {
    const v = e.key === "b" ? "box" : e.key === "-" ? "bg" : "fg";
    document.querySelector(`input[name="tool"][value="${v}"]`).checked = true;
  }
});

// ---- drag and drop (files, or a DICOM folder) -------------------------------------------------
async function entries(entry, prefix) {
  if (entry.isFile) return [{ file: await new Promise((ok, err) => entry.file(ok, err)), path: prefix + entry.name }];
  const reader = entry.createReader();
  const out = [];
  for (;;) {
    const batch = await new Promise((ok, err) => reader.readEntries(ok, err));
    if (!batch.length) break;
    for (const e of batch) out.push(...await entries(e, prefix + entry.name + "/"));
  }
  return out;
}
let dragDepth = 0;
document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-hint").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-hint").hidden = true; } });
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", async (e) => {
  e.preventDefault();
  dragDepth = 0; $("drop-hint").hidden = true;
  const items = [...(e.dataTransfer.items || [])].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  let files = [];
  try {
    if (items.length) for (const it of items) files.push(...await entries(it, ""));
    else files = [...e.dataTransfer.files];
  } catch (err) { showError(`cannot read the dropped files: ${err.message || err}`); return; }
  upload(files);
});

// for tests and scripting
window.lapsam = { view, refresh, setSlice };
refresh();

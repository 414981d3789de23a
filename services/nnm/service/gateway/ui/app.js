// The nnm dashboard: a thin client of the gateway's own /v1 API. No build step, no dependencies.
// The API key is asked once, kept in sessionStorage (this tab only) and sent as a bearer header;
// it never goes into a URL. Every element is built with the DOM API (no innerHTML): names of
// uploaded files and classes are the users' own text.
"use strict";

const KEY_ITEM = "nnm.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const PRESETS = ["auto", "quick", "cpu", "fast", "nnm", "scan"];
const BUILTINS = ["digits", "mnist5k", "cifar10", "cifar20", "stl10"];
const PAGE = 48;
// Jobs whose "Stage outputs" list the user opened: a running job's page is rebuilt on each poll.
const openOutputs = new Set();
let generation = 0; // bumped on every navigation: pollers of an old page stop

// --- small helpers -----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) if (c) el.append(c);
  return el;
}

function short(id) { return id.length > 12 ? id.slice(0, id.indexOf("_") + 9) : id; } // job_1a2b3c4d
function images(n) { return `${n} image${n === 1 ? "" : "s"}`; }
function fmt(x, digits = 3) { return typeof x === "number" ? x.toFixed(digits) : "–"; }
function pct(x) { return typeof x === "number" ? `${Math.round(x * 100)} %` : "–"; }
function when(s) { return s ? new Date(s).toLocaleString() : "–"; }
function bytes(n) {
  if (typeof n !== "number") return "–";
  const u = ["B", "KB", "MB", "GB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function duration(s) {
  if (typeof s !== "number" || !isFinite(s) || s < 0) return "–";
  const m = Math.floor(s / 60), r = Math.round(s % 60);
  return m ? `${m} min ${r} s` : `${r} s`;
}

function say(text, kind = "error") {
  const box = document.getElementById("status");
  box.replaceChildren(text ? h("div", { class: `msg ${kind}`, text }) : "");
}

function progressBar(fraction, label) {
  const inner = h("div");
  inner.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return h("div", { class: "progress", role: "progressbar", "aria-label": label, "aria-valuemin": 0,
    "aria-valuemax": 100, "aria-valuenow": Math.round((fraction || 0) * 100) }, inner);
}

// --- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? problem.detail : `HTTP ${status}`);
    this.status = status; this.problem = problem;
  }
}

function key() { return sessionStorage.getItem(KEY_ITEM) || ""; }
function authHeaders() { return key() ? { Authorization: `Bearer ${key()}` } : {}; }

async function api(path, opts = {}) {
  const headers = { ...authHeaders(), ...(opts.headers || {}) };
  let body = opts.body;
  if (body && !(body instanceof FormData)) { body = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, { method: opts.method || "GET", headers, body });
  if (res.status === 401) { askForKey(key() ? "That API key was not accepted." : ""); throw new ApiError(401, null); }
  const type = res.headers.get("content-type") || "";
  const data = res.status === 204 ? null : type.includes("json") ? await res.json() : await res.blob();
  if (!res.ok) throw new ApiError(res.status, data && data.detail ? data : null);
  return data;
}

async function artifactJSON(job, name) {
  if (!job.artifacts.some((a) => a.name === name)) return null;
  return api(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${name}`);
}

async function download(job, name) {
  const blob = await api(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${name}`);
  const url = URL.createObjectURL(blob instanceof Blob ? blob : new Blob([JSON.stringify(blob, null, 2)]));
  const a = h("a", { href: url, download: name.replaceAll("/", "_") });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// --- the key -----------------------------------------------------------------------------------

function askForKey(message) {
  generation++;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const form = h("form", { class: "row", onsubmit: (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_ITEM, input.value.trim());
    say("");
    route();
  } }, h("label", { for: "api-key" }, "API key", input), h("button", { type: "submit" }, "Continue"));
  show("API key", h("section", { class: "card" },
    h("p", {}, "This service needs an API key. It is kept for this browser tab only and sent as a bearer header."),
    message ? h("p", { class: "error", text: message }) : null, form));
  input.focus();
}

// --- pages -------------------------------------------------------------------------------------

function show(title, ...content) {
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", { text: title }), ...content.filter((c) => c !== null && c !== undefined));
  document.title = `${title} · nnm`;
  const tab = location.hash.split("?")[0].split("/")[1] || "jobs";
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.getAttribute("href") === `#/${tab}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.getElementById("forget-key").hidden = !key();
}

async function datasetsPage() {
  const list = h("tbody");
  const file = h("input", { id: "upload-file", type: "file", accept: ".zip,application/zip", required: true });
  const name = h("input", { id: "upload-name", type: "text", maxlength: 200, placeholder: "optional" });
  const bar = h("div", { id: "upload-progress" });
  const uploadForm = h("form", { class: "row", id: "upload-form", onsubmit: (e) => { e.preventDefault(); upload(); } },
    h("label", { for: "upload-file" }, "Zip of images (a folder per class, or flat)", file),
    h("label", { for: "upload-name" }, "Name", name),
    h("button", { type: "submit" }, "Upload"));
  const builtin = h("select", { id: "builtin" }, BUILTINS.map((b) => h("option", { value: b, text: b })));
  const builtinForm = h("form", { class: "row", onsubmit: async (e) => {
    e.preventDefault();
    try { await api("/v1/datasets", { method: "POST", body: { builtin: builtin.value } }); say(""); load(); } catch (err) { fail(err); }
  } }, h("label", { for: "builtin" }, "Built-in data set", builtin), h("button", { type: "submit" }, "Add"));

  function upload() {
    if (!file.files.length) return;
    const form = new FormData();
    form.append("file", file.files[0]);
    if (name.value.trim()) form.append("name", name.value.trim());
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/datasets");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    const label = h("span", { class: "muted", text: "uploading…" });
    bar.replaceChildren(progressBar(0, "Upload progress"), label);
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      bar.replaceChildren(progressBar(e.loaded / e.total, "Upload progress"), label);
      label.textContent = e.loaded < e.total ? `${bytes(e.loaded)} of ${bytes(e.total)}` : "checking the images…";
    };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status === 401) { askForKey("That API key was not accepted."); return; }
      if (xhr.status >= 400) {
        bar.replaceChildren(h("p", { class: "error", role: "alert", text: `Upload refused: ${data && data.detail ? data.detail : xhr.status}` }));
        return;
      }
      bar.replaceChildren(h("p", { class: "muted", text:
        `Checked: ${data.image_count} images of ${data.image_size} px, ${data.classes ? data.classes.length + " classes" : "no class folders"}.` }));
      uploadForm.reset();
      load();
    };
    xhr.onerror = () => bar.replaceChildren(h("p", { class: "error", text: "The upload failed (network)." }));
    xhr.send(form);
  }

  async function load() {
    const data = await api("/v1/datasets?limit=200");
    const previews = [];
    list.replaceChildren(...data.items.map((d) => h("tr", { "data-dataset": d.id },
      h("td", {}, h("strong", { text: d.name })),
      (() => { const cell = h("td", { class: "protos" }); if (d.kind === "upload") previews.push([d.id, cell]); return cell; })(), h("td", { text: d.kind === "builtin" ? `built-in ${d.builtin}${d.split ? ":" + d.split : ""}` : "upload" }),
      h("td", { text: d.image_count ?? "–" }), h("td", { text: d.image_size ? `${d.image_size} px × ${d.channels}` : "–" }),
      h("td", { text: d.classes ? `${d.classes.length}` : (d.labelled ? "yes" : "none") }), h("td", { text: bytes(d.size_bytes) }),
      h("td", {}, h("a", { href: `#/jobs?dataset=${encodeURIComponent(d.id)}`, text: "train on it" })))));
    if (!data.items.length) list.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "muted", text: "No data sets yet." })));
    await Promise.all(previews.map(async ([id, cell]) => {
      const p = await api(`/v1/datasets/${encodeURIComponent(id)}/preview`).catch(() => null);
      if (p) cell.replaceChildren(...p.images.map((img) => h("img", { src: img.thumbnail, alt: img.name, title: img.name })));
    }));
  }

  show("Datasets",
    h("section", { class: "card" }, h("h2", { text: "Upload a zip" }), uploadForm, bar),
    h("section", { class: "card" }, h("h2", { text: "Or add a built-in" }), builtinForm),
    h("table", { "aria-label": "Datasets" }, h("thead", {}, h("tr", {}, ["Name", "Preview", "Kind", "Images", "Size", "Classes", "Bytes", ""].map((t) => h("th", { text: t })))), list));
  await load();
}

function jobProgress(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return [progressBar(1, `Job ${job.id} progress`), h("span", { class: "muted", text: "done" })];
  if (TERMINAL.has(job.status)) return [h("span", { class: "muted", text: job.error ? job.error.detail : job.status })];
  const stages = job.stages || [];
  const done = stages.filter((s) => s.status === "succeeded").length;
  const within = typeof p.fraction === "number" ? p.fraction : 0;
  const frac = stages.length ? (done + within) / stages.length : within;
  const bits = [];
  if (p.stage) bits.push(p.stage);
  if (p.epoch && p.epochs) bits.push(`epoch ${p.epoch}/${p.epochs}`);
  if (p.images_per_s) bits.push(`${Math.round(p.images_per_s)} img/s`);
  const started = job.started_at ? new Date(job.started_at).getTime() : null;
  if (started && frac > 0.02) bits.push(`about ${duration(((Date.now() - started) / 1000) * (1 - frac) / frac)} left`);
  return [progressBar(frac, `Job ${job.id} progress`), h("span", { class: "muted", text: bits.join(" · ") || job.status })];
}

async function jobsPage(query) {
  const mine = generation;
  const rows = h("tbody");
  const datasets = (await api("/v1/datasets?limit=200")).items;
  const ds = h("select", { id: "job-dataset", required: true },
    datasets.map((d) => h("option", { value: d.id, text: `${d.name} (${d.image_count ?? "?"} images)`, selected: query.get("dataset") === d.id })));
  const preset = h("select", { id: "job-preset" }, PRESETS.map((p) => h("option", { value: p, text: p })));
  const clusters = h("input", { id: "job-clusters", type: "text", inputmode: "numeric", size: 10, pattern: "auto|[0-9]+",
    placeholder: "from the classes", "aria-describedby": "job-clusters-help" });
  const extra = h("input", { id: "job-extra", type: "text", size: 40, spellcheck: "false",
    placeholder: '{"pretext": {"epochs": 10}}', "aria-describedby": "job-extra-help" });
  const form = h("form", { class: "row", id: "start-form", onsubmit: async (e) => {
    e.preventDefault();
    let params = {};
    if (extra.value.trim()) {
      try { params = JSON.parse(extra.value); } catch { say("More settings: not valid JSON."); extra.focus(); return; }
      if (typeof params !== "object" || params === null || Array.isArray(params)) { say("More settings: give a JSON object."); return; }
    }
    params.preset = preset.value;
    const k = clusters.value.trim().toLowerCase();
    if (k) params.cluster = { ...(params.cluster || {}), clusters: k === "auto" ? "auto" : Number(k) };
    try {
      const job = await api("/v1/jobs", { method: "POST", body: { type: "pipeline", dataset_id: ds.value, params } });
      say(`Job ${job.id} queued.`, "info"); refresh();
    } catch (err) { fail(err); }
  } },
  h("label", { for: "job-dataset" }, "Dataset", ds), h("label", { for: "job-preset" }, "Preset", preset),
  h("label", { for: "job-clusters" }, "Clusters", clusters), h("label", { for: "job-extra" }, "More settings (JSON)", extra),
  h("button", { type: "submit", disabled: !datasets.length }, "Start pipeline"),
  h("p", { id: "job-clusters-help", class: "muted" }, "Clusters: a number, ", h("code", { text: "auto" }),
    " to estimate it from the data (2–50; set ", h("code", { text: '{"estimate": {"min_clusters": 5, "max_clusters": 30}}' }),
    " below for another range), or empty for the number of class folders."),
  h("p", { id: "job-extra-help", class: "muted" }, "More settings override the preset, stage by stage, as the API's params do, e.g. ",
    h("code", { text: '{"pretext": {"epochs": 10}, "cluster": {"method": "scan"}}' }), "."));

  async function refresh() {
    if (mine !== generation) return;
    const data = await api("/v1/jobs?limit=100");
    if (mine !== generation) return;
    rows.replaceChildren(...data.items.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("a", { href: `#/jobs/${j.id}`, text: short(j.id) })),
      h("td", { text: j.type }), h("td", {}, h("span", { class: `badge ${j.status}`, text: j.status })),
      h("td", { class: "progress-cell" }, ...jobProgress(j)), h("td", { text: when(j.created_at) }),
      h("td", {}, TERMINAL.has(j.status) ? null : h("button", { class: "danger", type: "button", "aria-label": `Cancel job ${j.id}`,
        onclick: async () => { try { await api(`/v1/jobs/${j.id}/cancel`, { method: "POST" }); refresh(); } catch (err) { fail(err); } } }, "Cancel")))));
    if (!data.items.length) rows.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No jobs yet." })));
    if (data.items.some((j) => !TERMINAL.has(j.status))) setTimeout(() => refresh().catch(fail), 1500);
  }

  show("Jobs", h("section", { class: "card" }, h("h2", { text: "Start a pipeline" }), form),
    h("table", { "aria-label": "Jobs" }, h("thead", {}, h("tr", {}, ["Job", "Type", "Status", "Progress", "Created", ""].map((t) => h("th", { text: t })))), rows));
  await refresh();
}

function lineChart(title, values, opts = {}) {
  // opts: x0 (first x value, 1), xName ("epoch"), what ("loss per epoch"), mark (an x value to circle).
  const { x0 = 1, xName = "epoch", what = "loss per epoch", caption = `${title} loss`, mark = null } = opts;
  const w = 300, hgt = 160, pad = 34;
  const ys = values.filter((v) => typeof v === "number");
  if (!ys.length) return null;
  const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
  const x = (i) => pad + (values.length > 1 ? (i * (w - pad - 8)) / (values.length - 1) : 0);
  const y = (v) => 10 + (hgt - 40) * (1 - (v - lo) / span);
  const d = values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const m = mark === null ? -1 : mark - x0;
  return h("figure", { class: "chart" }, svg("svg", { width: w, height: hgt, role: "img", "aria-label": `${title}: ${what}` },
    svg("path", { class: "line", d }),
    values.length === 1 ? svg("circle", { class: "dot", cx: x(0), cy: y(values[0]), r: 4 }) : null,
    m >= 0 && m < values.length ? svg("circle", { class: "dot", cx: x(m), cy: y(values[m]), r: 5 }) : null,
    svg("text", { x: 2, y: 14 }, hi.toFixed(2)), svg("text", { x: 2, y: hgt - 28 }, lo.toFixed(2)),
    svg("text", { x: pad, y: hgt - 12 }, `${xName} ${x0}`), svg("text", { x: w - 50, y: hgt - 12 }, `${xName} ${x0 + values.length - 1}`)),
  h("figcaption", { class: "muted", text: caption }));
}

function estimateSection(est) {
  // The estimate of the number of clusters (clusters "auto"): the choice and the criterion's curve over K.
  const ks = Object.keys(est.curve).map(Number).sort((a, b) => a - b);
  const chart = lineChart("Number of clusters", ks.map((k) => est.curve[String(k)]),
    { x0: ks[0], xName: "K", what: `${est.criterion} over K`, caption: `${est.criterion} criterion over K; the circle marks the choice`, mark: est.clusters });
  return h("section", { class: "card", id: "estimate" }, h("h2", { text: "Number of clusters" }),
    h("p", {}, `Estimated `, h("strong", { text: String(est.clusters) }), ` clusters without labels (${est.criterion}, searched ${est.min_clusters}–${est.max_clusters})`,
      est.num_classes ? h("span", { class: "muted", text: ` · the data set's folders name ${est.num_classes} classes` }) : null, "."),
    chart);
}

function heatmap(cm) {
  const names = cm.class_names, m = cm.matrix;
  const head = h("tr", {}, h("th", { text: "true \\ cluster→class" }), names.map((n) => h("th", { scope: "col", text: n })));
  const body = m.map((row, i) => h("tr", {}, h("th", { scope: "row", text: names[i] }), row.map((v, j) => {
    const cell = h("td", { title: `true ${names[i]}, predicted ${names[j]}: ${(v * 100).toFixed(1)} %`, text: v >= 0.005 ? Math.round(v * 100) : "" });
    cell.style.background = `rgba(36, 87, 197, ${Math.min(1, v).toFixed(3)})`;
    cell.style.color = v > 0.5 ? "#fff" : "#1d2330";
    return cell;
  })));
  return h("table", { class: "heatmap", id: "confusion", "aria-label": "Confusion matrix, per cent of each true class" }, h("thead", {}, head), h("tbody", {}, body));
}

function metricsTable(m) {
  if (!m) return h("p", { class: "muted", text: "No metrics yet." });
  const rows = [["Evaluated on", m.evaluated_on || "train"], ["Images", m.num_images], ["ACC", fmt(m.acc)], ["NMI", fmt(m.nmi)],
    ["ARI", fmt(m.ari)], ["Mean confidence", fmt(m.mean_confidence)], ["Empty clusters", m.empty_clusters]];
  if (m.train) rows.push(["Training split ACC / NMI / ARI", `${fmt(m.train.acc)} / ${fmt(m.train.nmi)} / ${fmt(m.train.ari)}`]);
  if (m.neighbor_accuracy) rows.push(["Neighbour accuracy (top-k)", Object.entries(m.neighbor_accuracy).map(([k, v]) => `${k}: ${fmt(v)}`).join(", ")]);
  if (m.estimated_clusters) rows.push(["Clusters (estimated)", `${m.estimated_clusters.clusters} by ${m.estimated_clusters.criterion}`]);
  if (m.final_stage) rows.push(["Model kept", m.final_stage]);
  if (m.timings) rows.push(["Total time", duration(m.timings.total_seconds)]);
  return h("div", { class: "kv", id: "metrics" }, rows.filter(([, v]) => v !== undefined).map(([k, v]) => [h("span", { class: "muted", text: k }), h("span", { text: String(v) })]));
}

async function jobPage(id) {
  const mine = generation;
  const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  const took = (s) => (s.started_at && s.finished_at ? (new Date(s.finished_at) - new Date(s.started_at)) / 1000 : null);
  const timeline = h("ol", { class: "timeline", "aria-label": "Stages" }, (job.stages || []).map((s) =>
    h("li", { class: s.status, title: `${s.status}${s.started_at ? ", started " + when(s.started_at) : ""}` },
      s.name, took(s) !== null ? h("span", { class: "took", text: ` ${duration(took(s))}` }) : null)));
  const actions = h("div", { class: "row" },
    TERMINAL.has(job.status) ? null : h("button", { class: "danger", type: "button", onclick: async () => {
      try { await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }); route(); } catch (err) { fail(err); }
    } }, "Cancel job"),
    job.artifacts.some((a) => a.name === "gallery/clusters.json") ? h("a", { href: `#/jobs/${job.id}/clusters`, class: "button", id: "browse-clusters" }, "Browse the clusters →") : null);
  const charts = h("div", { class: "charts" });
  const confusion = h("div");
  const estimate = h("div");
  const item = (a) => h("li", {}, h("button", { type: "button", class: "secondary", onclick: () => download(job, a.name).catch(fail) }, a.name),
    h("span", { class: "muted", text: ` ${bytes(a.size)}` }));
  const main = job.artifacts.filter((a) => !a.name.includes("/") || a.name.startsWith("model/"));
  const stageFiles = job.artifacts.filter((a) => !main.includes(a));
  const artifacts = h("div", {}, h("ul", {}, main.map(item)), stageFiles.length
    ? h("details", { open: openOutputs.has(job.id), ontoggle: (e) => { if (e.target.open) openOutputs.add(job.id); else openOutputs.delete(job.id); } }, h("summary", { text: `Stage outputs (${stageFiles.length} files: checkpoints, neighbours, gallery)` }), h("ul", {}, stageFiles.map(item)))
    : null);
  show(`Job ${short(job.id)}`,
    h("section", { class: "card" }, h("p", {}, h("span", { class: `badge ${job.status}`, text: job.status }), ` ${job.type} on dataset ${short(job.dataset_id)}, preset ${job.params.preset || "–"}`),
      timeline, h("div", { class: "job-progress" }, ...jobProgress(job)), job.error ? h("p", { class: "error", role: "alert", text: `${job.error.title}: ${job.error.detail}` }) : null, actions),
    h("section", { class: "card" }, h("h2", { text: "Metrics" }), metricsTable(job.metrics)),
    estimate,
    h("section", { class: "card" }, h("h2", { text: "Loss per epoch" }), charts),
    h("section", { class: "card" }, h("h2", { text: "Confusion matrix" }), confusion),
    h("section", { class: "card" }, h("h2", { text: "Downloads" }), artifacts));
  for (const stage of ["pretext", "cluster", "selflabel"]) {
    const done = await artifactJSON(job, `${stage}/done.json`).catch(() => null);
    const history = done && done.summary && done.summary.history;
    if (history && history.length) charts.append(lineChart(stage, history.map((e) => e.loss)));
  }
  const est = job.artifacts.some((a) => a.name === "estimate/estimate.json") ? await artifactJSON(job, "estimate/estimate.json").catch(() => null) : null;
  if (est) estimate.replaceWith(estimateSection(est));
  if (!charts.children.length) charts.append(h("p", { class: "muted", text: "No finished stage yet." }));
  const cm = await artifactJSON(job, "confusion_matrix.json").catch(() => null);
  confusion.replaceChildren(cm ? heatmap(cm) : h("p", { class: "muted", text: "Only for data sets with labels, once evaluated." }));
  if (!TERMINAL.has(job.status)) setTimeout(() => { if (mine === generation) route(); }, 2000);
}

function thumb(img, onclick, extra = "") {
  return h("button", { type: "button", class: `thumb ${extra}`, onclick, "data-index": img.index,
    "aria-label": `Image ${img.name}, cluster ${img.cluster}, confidence ${fmt(img.confidence, 2)}${img.label ? ", labelled " + img.label : ""}` },
  h("img", { src: img.thumbnail, alt: "" }), h("div", { text: `${fmt(img.confidence, 2)}${img.label ? " · " + img.label : ""}` }));
}

async function neighboursDialog(jobId, index) {
  const d = await api(`/v1/jobs/${encodeURIComponent(jobId)}/images/${index}`);
  const dialog = h("dialog", { id: "neighbours", "aria-label": `Neighbours of ${d.image.name}` },
    h("h2", { text: `${d.image.name}: cluster ${d.image.cluster}, confidence ${fmt(d.image.confidence, 2)}${d.image.label ? ", " + d.image.label : ""}` }),
    h("div", { class: "grid" }, thumb(d.image, null, "proto-first")),
    h("h2", { text: d.neighbors.length ? `Its ${d.neighbors.length} mined neighbours` : "No mined neighbours for this job" }),
    h("div", { class: "grid" }, d.neighbors.map((n) => thumb(n, () => { dialog.close(); neighboursDialog(jobId, n.index).catch(fail); }))),
    h("form", { method: "dialog" }, h("button", { type: "submit" }, "Close")));
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

async function clustersPage(id) {
  const data = await api(`/v1/jobs/${encodeURIComponent(id)}/clusters`);
  const cards = data.clusters.map((c) => h("a", { class: "cluster-card", href: `#/jobs/${id}/clusters/${c.cluster}`, "aria-label": `Cluster ${c.cluster}, ${images(c.size)}` },
    h("strong", { text: `Cluster ${c.cluster}` }), h("span", { class: "muted", text: ` ${images(c.size)}${c.size ? ` · confidence ${fmt(c.mean_confidence, 2)}` : ""}` }),
    c.size ? null : h("p", { class: "muted", text: "Empty: no image was assigned here." }),
    h("div", { class: "protos" }, c.prototypes.map((p) => h("img", { src: p.thumbnail, alt: "" }))),
    c.majority_class ? h("div", { class: "muted", text: `mostly ${c.majority_class} (${pct(c.purity)})` }) : null));
  show(`Clusters of job ${short(id)}`, h("p", {}, h("a", { href: `#/jobs/${id}`, text: "← the job" }), h("span", { class: "muted", text: ` · ${data.num_images} images in ${data.clusters.length} clusters` })),
    h("div", { class: "clusters" }, cards));
}

async function clusterPage(id, c, query) {
  const offset = Math.max(0, Number(query.get("offset")) || 0);
  const [overview, page] = await Promise.all([api(`/v1/jobs/${encodeURIComponent(id)}/clusters`),
    api(`/v1/jobs/${encodeURIComponent(id)}/clusters/${c}/images?offset=${offset}&limit=${PAGE}`)]);
  const info = overview.clusters[c];
  const link = (o, text) => h("a", { href: `#/jobs/${id}/clusters/${c}?offset=${o}`, text });
  const pager = h("nav", { class: "pager", "aria-label": "Pages" },
    offset > 0 ? link(Math.max(0, offset - PAGE), "← previous") : null,
    h("span", { class: "muted", id: "page-info", text: `images ${page.total ? offset + 1 : 0}–${offset + page.items.length} of ${page.total}` }),
    page.next_offset !== null ? link(page.next_offset, "next →") : null);
  show(`Cluster ${c}`,
    h("p", {}, h("a", { href: `#/jobs/${id}/clusters`, text: "← all clusters" }),
      h("span", { class: "muted", text: ` · ${images(info.size)} · mean confidence ${fmt(info.mean_confidence, 2)}${info.majority_class ? ` · mostly ${info.majority_class} (${pct(info.purity)})` : ""}` })),
    offset === 0 ? h("section", { class: "card" }, h("h2", { text: "Prototypes" }), h("div", { class: "grid", id: "prototypes" }, info.prototypes.map((p) => thumb(p, () => neighboursDialog(id, p.index).catch(fail), "proto-first")))) : null,
    h("h2", { text: "Members, most confident first" }), pager,
    h("div", { class: "grid", id: "members" }, page.items.map((img) => thumb(img, () => neighboursDialog(id, img.index).catch(fail)))));
}

async function assignPage() {
  const models = (await api("/v1/models?limit=200")).items;
  const select = h("select", { id: "assign-model" }, models.map((m) => h("option", { value: m.id, text: `${short(m.id)} · ${m.clusters} clusters · job ${short(m.job_id)}` })));
  const input = h("input", { id: "assign-files", type: "file", accept: "image/*", multiple: true });
  const results = h("div", { id: "assign-results" });
  const drop = h("div", { class: "drop" }, h("label", { for: "assign-files" }, "Drop images here, or choose them: "), input);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); send([...e.dataTransfer.files]); });
  input.addEventListener("change", () => send([...input.files]));

  async function send(files) {
    if (!files.length || !select.value) return;
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    results.replaceChildren(h("p", { class: "muted", text: `assigning ${files.length} image(s)…` }));
    try {
      const answers = await api(`/v1/models/${encodeURIComponent(select.value)}/assign`, { method: "POST", body: form });
      const model = models.find((m) => m.id === select.value);
      const clusters = await api(`/v1/jobs/${encodeURIComponent(model.job_id)}/clusters`).catch(() => null);
      results.replaceChildren(...answers.map((a, i) => {
        const protos = clusters ? clusters.clusters[a.cluster].prototypes : [];
        const url = URL.createObjectURL(files[i]);
        return h("div", { class: "assign-row", "data-file": a.filename },
          h("img", { class: "mine", src: url, alt: a.filename }),
          h("div", {}, h("strong", { text: a.filename }), h("div", { text: `cluster ${a.cluster} · confidence ${fmt(a.confidence, 2)}${a.class_name ? " · class " + a.class_name : ""}` })),
          h("div", { class: "protos" }, protos.map((p) => h("img", { src: p.thumbnail, alt: `prototype of cluster ${a.cluster}` }))));
      }));
    } catch (err) { results.replaceChildren(); fail(err); }
  }

  show("Assign images", models.length
    ? h("section", { class: "card" }, h("form", { class: "row", onsubmit: (e) => e.preventDefault() }, h("label", { for: "assign-model" }, "Model", select)), drop, results)
    : h("p", { class: "muted", text: "No trained model yet: run a pipeline job first." }));
}

// --- routing -----------------------------------------------------------------------------------

function fail(err) {
  if (err instanceof ApiError && err.status === 401) return;
  say(err instanceof ApiError ? `${err.status}: ${err.message}` : String(err && err.message ? err.message : err));
}

async function route() {
  generation++;
  const [path, q] = location.hash.replace(/^#/, "").split("?");
  const query = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  say("");
  try {
    if (parts[0] === "datasets") await datasetsPage();
    else if (parts[0] === "assign") await assignPage();
    else if (parts[0] === "jobs" && parts[1] && parts[2] === "clusters" && parts[3] !== undefined) await clusterPage(parts[1], Number(parts[3]), query);
    else if (parts[0] === "jobs" && parts[1] && parts[2] === "clusters") await clustersPage(parts[1]);
    else if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else await jobsPage(query);
  } catch (err) {
    // The page could not be built: say why in its place rather than leave the previous page standing.
    if (err instanceof ApiError && err.status === 401) return;
    const text = err instanceof ApiError ? `${err.status}: ${err.message}` : String(err && err.message ? err.message : err);
    show(err instanceof ApiError && err.status === 404 ? "Not found" : "Something went wrong",
      h("p", { class: "error", role: "alert", text }), h("p", {}, h("a", { href: "#/jobs", text: "← jobs" })));
  }
}

document.getElementById("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_ITEM); askForKey(""); });
window.addEventListener("hashchange", route);
route();

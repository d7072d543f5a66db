// fedit ui: plain DOM code, no libraries (the page must work with no network).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "dataset") Object.assign(e.dataset, v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function showStatus(text) {
  $("status").textContent = text || "";
  $("status").hidden = !text;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  let data;
  try { data = await r.json(); } catch (e) { throw new Error(`the server answered ${r.status} without JSON`); }
  if (!r.ok || data.error) throw new Error(data.error || `the server answered ${r.status}`);
  return data;
}

// A job: poll its status until done; progress text and seconds go to the status line.
async function runJob(start, label) {
  showError("");
  setBusy(true);
  try {
    let job = await start();
    while (job.state === "queued" || job.state === "running") {
      showStatus(`${label}: ${job.progress} (${job.seconds.toFixed(0)} s)`);
      await new Promise((res) => setTimeout(res, 500));
      job = await api(`/api/jobs/${job.id}`);
    }
    if (job.state === "error") throw new Error(job.error);
    showStatus(`${label}: done in ${job.seconds.toFixed(1)} s`);
    return job.result;
  } catch (e) {
    showStatus("");
    showError(e.message);
    return null;
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  for (const id of ["edit-btn", "trace-btn"]) $(id).disabled = busy;
  $("revert-btn").disabled = busy || !(info && info.edits.some((e) => e.applied));
}

const pct = (p) => (p === null || p === undefined) ? "—" : (p >= 0.001 ? (100 * p).toFixed(1) + "%" : p.toExponential(1));

// --- header and tabs --------------------------------------------------------------------
async function loadInfo() {
  info = await api("/api/info");
  $("model-info").textContent = `${info.model} (${info.model_type}, ${info.layers} layers, ${info.device})`;
  return info;
}

for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === b);
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `panel-${b.dataset.panel}`;
  });
}

// --- edit panel -------------------------------------------------------------------------
function fillMethods() {
  const sel = $("method");
  sel.replaceChildren(...info.methods.map((m) => el("option", {value: m.name}, m.name)));
  const preferred = info.methods.find((m) => m.name === "rome") || info.methods[0];
  if (preferred) sel.value = preferred.name;
  const describe = () => {
    const m = info.methods.find((x) => x.name === sel.value);
    $("method-info").textContent = m ? `${m.family}: ${m.description}${m.needs_training ? " (needs a trained editor)" : ""}` : "";
  };
  sel.addEventListener("change", describe);
  describe();
  if (Object.keys(info.defaults).length)
    $("defaults-info").textContent = `server overrides (--set), where the method has them: ${JSON.stringify(info.defaults)}`;
}

function fillSources() {
  const sel = $("source");
  for (const s of info.sources) sel.append(el("option", {value: s.id, title: s.path}, s.id === "file" ? `${s.kind}: ${s.path}` : `${s.kind} sample`));
  sel.addEventListener("change", () => { $("picker").hidden = !sel.value; searchFacts(); });
  let timer = null;
  $("fact-search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(searchFacts, 250); });
}

let searches = 0;  // only the newest search's answer is shown

async function searchFacts() {
  const source = $("source").value;
  if (!source) return;
  const mine = ++searches;
  try {
    const r = await api(`/api/facts?source=${encodeURIComponent(source)}&q=${encodeURIComponent($("fact-search").value)}`);
    if (mine !== searches) return;
    $("fact-count").textContent = `${r.matches} of ${r.total} records match${r.matches > r.facts.length ? `; first ${r.facts.length} shown` : ""}`;
    $("fact-list").replaceChildren(...r.facts.map((f) => {
      const li = el("li", {}, `${f.prompt.replace("{}", f.subject)} → ${f.target_new}`, el("span", {class: "hint"}, f.target_true ? ` (was ${f.target_true})` : ""));
      li.addEventListener("click", () => pickFact(f, li));
      return li;
    }));
  } catch (e) { showError(e.message); }
}

function pickFact(f, li) {
  for (const x of $("fact-list").children) x.classList.toggle("picked", x === li);
  $("prompt").value = f.prompt; $("subject").value = f.subject;
  $("target_new").value = f.target_new; $("target_true").value = f.target_true || "";
  $("paraphrases").value = f.paraphrases.join("\n"); $("neighbours").value = f.neighbours.join("\n");
}

function renderResult(s) {
  $("result-title").textContent = `edit ${s.id}: ${s.method}, "${s.filled}" → ${s.request.target_new}` +
    (s.request.target_true ? ` (was ${s.request.target_true})` : "") + `, ${s.seconds} s` + (s.applied ? "" : ", reverted");
  const rows = s.before.map((b, i) => {
    const a = s.after[i], r = s.reverted ? s.reverted[i] : null;
    const num = (cls, v) => el("td", {class: `num ${cls}`, dataset: {value: v === null || v === undefined ? "" : String(v)}}, pct(v));
    return el("tr", {class: b.group, dataset: {group: b.group}},
      el("td", {class: "prompt"}, el("span", {class: "tag"}, b.group), " ", b.prompt),
      num("p-new-before", b.p_new), num("p-new-after", a.p_new), num("p-new-reverted", r ? r.p_new : null),
      num("p-true-before", b.p_true), num("p-true-after", a.p_true), num("p-true-reverted", r ? r.p_true : null),
      el("td", {class: "gen gen-before"}, b.generation), el("td", {class: "gen gen-after"}, a.generation));
  });
  $("results").tBodies[0].replaceChildren(...rows);
}

function renderEdits() {
  const rows = [...info.edits].reverse().map((s) => {
    const links = el("td");
    if (s.downloadable) {
      links.append(el("a", {href: `/api/edits/${s.id}/download?format=safetensors`, class: "dl-safetensors"}, "safetensors"));
      if (info.peft && s.weight_edit) links.append(" ", el("a", {href: `/api/edits/${s.id}/download?format=peft`, class: "dl-peft"}, "PEFT adapter"));
    }
    const tr = el("tr", {dataset: {edit: s.id}}, el("td", {}, s.id), el("td", {}, s.method),
      el("td", {}, `${s.filled} → ${s.request.target_new}`), el("td", {class: "num"}, s.seconds),
      el("td", {class: "state"}, s.applied ? "applied" : "reverted"), links);
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") renderResult(s); });
    return tr;
  });
  $("edits").tBodies[0].replaceChildren(...rows);
  setBusy(false);
}

function upsertEdit(s) {
  const i = info.edits.findIndex((e) => e.id === s.id);
  if (i >= 0) info.edits[i] = s; else info.edits.push(s);
  renderResult(s);
  renderEdits();
}

$("edit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  let overrides = null;
  const text = $("overrides").value.trim();
  if (text) {
    try { overrides = JSON.parse(text); } catch (e) { showError(`hyperparameter overrides are not JSON (${e.message}). Fix: write e.g. {"layers": [5]}.`); return; }
  }
  const fact = {prompt: $("prompt").value, subject: $("subject").value, target_new: $("target_new").value,
                target_true: $("target_true").value, paraphrases: $("paraphrases").value, neighbours: $("neighbours").value};
  const s = await runJob(() => api("/api/edit", {fact, method: $("method").value, overrides}), `${$("method").value} edit`);
  if (s) upsertEdit(s);
});

$("revert-btn").addEventListener("click", async () => {
  const s = await runJob(() => api("/api/revert", {}), "revert");
  if (s) upsertEdit(s);
});

// --- trace panel ------------------------------------------------------------------------
$("trace-from-fact").addEventListener("click", () => {
  $("trace-prompt").value = $("prompt").value; $("trace-subject").value = $("subject").value;
});

$("trace-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = {prompt: $("trace-prompt").value, subject: $("trace-subject").value, answer: $("trace-answer").value,
                kind: $("trace-kind").value, samples: $("trace-samples").value};
  showTrace(await runJob(() => api("/api/trace", body), "causal trace"));
});

function showTrace(r) {
  if (!r) return;
  $("trace-out").hidden = false;
  $("trace-img").src = `data:image/png;base64,${r.png}`;
  let text = `answer ${JSON.stringify(r.answer)}: clean p = ${r.clean.toFixed(4)}, corrupted p = ${r.corrupted.toFixed(4)}; ` +
             `largest effect ${r.peak.effect.toFixed(4)} at token ${JSON.stringify(r.peak.token_text)}, layer ${r.peak.layer}`;
  if (r.recommendation) text += `. Recommended edit layers: ROME ${r.recommendation.rome_layer}, MEMIT ${JSON.stringify(r.recommendation.memit_layers)}`;
  $("trace-summary").textContent = text;
}

// --- report panel -----------------------------------------------------------------------
$("report-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  try {
    const r = await api("/api/report", {folder: $("report-folder").value});
    $("report-out").hidden = false;
    $("report-summary").textContent = Object.entries(r.summary).map(([k, v]) => `${k}: ${v}`).join(" · ") || r.folder;
    $("report-metrics").hidden = !r.metrics.length;
    const fmt = (v) => v === null || v === undefined ? "—" : (Math.abs(v) <= 1 ? (100 * v).toFixed(1) : v.toFixed(2));
    $("report-metrics").tBodies[0].replaceChildren(...r.metrics.map((m) =>
      el("tr", {}, el("td", {}, m.metric), el("td", {class: "num"}, fmt(m.pre)), el("td", {class: "num"}, fmt(m.post)))));
    $("report-charts").replaceChildren(...r.charts.map((c) =>
      el("figure", {}, el("img", {src: `data:image/png;base64,${c.png}`, alt: c.name}), el("figcaption", {}, c.name))));
    $("report-md").textContent = r.markdown;
  } catch (e) { $("report-out").hidden = true; showError(e.message); }
});

// --- store panel ------------------------------------------------------------------------
let store = null;

function renderSlot() {
  const s = $("store-slot").value;
  const ids = store.clients.map((c) => c.id);
  const hits = store.hits[s] || {};
  $("store-hits").tHead.replaceChildren(el("tr", {}, el("th", {}, "retrieves ↓ from →"), ...ids.map((c) => el("th", {}, c))));
  $("store-hits").tBodies[0].replaceChildren(...ids.filter((a) => hits[a]).map((a) =>
    el("tr", {}, el("th", {}, a), ...ids.map((b) => el("td", {class: "num"}, a === b ? "·" : String(hits[a][b] ?? 0))))));
  $("store-mkvs").tBodies[0].replaceChildren(...(store.mkvs[s] || []).map((m) =>
    el("tr", {}, el("td", {}, m.id), el("td", {}, m.owner), el("td", {}, m.fact ?? ""),
       el("td", {}, m.request ? `${m.request} → ${m.target}` : "(private)"), el("td", {class: "num"}, m.norm))));
}

$("store-slot").addEventListener("change", renderSlot);

$("store-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  try {
    store = await api("/api/store", {path: $("store-path").value, tau: $("store-tau").value});
    $("store-out").hidden = false;
    $("store-summary").textContent = `${store.path}: ${store.total} MKVs of dimension ${store.dim}, ` +
      `${store.clients.length} clients, slots ${store.slots.join(", ") || "none"}; τ = ${store.tau}`;
    $("store-clients").tHead.replaceChildren(el("tr", {}, el("th", {}, "client"), el("th", {}, "info"),
      ...store.slots.map((s) => el("th", {}, `slot ${s}`))));
    $("store-clients").tBodies[0].replaceChildren(...store.clients.map((c) =>
      el("tr", {}, el("td", {}, c.id), el("td", {}, JSON.stringify(c.info)),
         ...store.slots.map((s) => el("td", {class: "num"}, String(c.per_slot[s] ?? 0))))));
    $("store-slot").replaceChildren(...store.slots.map((s) => el("option", {value: s}, s)));
    renderSlot();
  } catch (e) { $("store-out").hidden = true; showError(e.message); }
});

// A job started before this page was (re)loaded: keep polling it and show what it returns.
async function resumePending() {
  for (const job of info.pending) {
    const r = await runJob(async () => job, job.kind);
    if (r && (job.kind === "edit" || job.kind === "revert")) upsertEdit(r);
    if (r && job.kind === "trace") showTrace(r);
  }
}

// --- start --------------------------------------------------------------------------------
loadInfo().then(() => {
  fillMethods();
  fillSources();
  $("report-folder").value = info.prefill.report;
  $("store-path").value = info.prefill.store;
  renderEdits();
  const last = info.edits[info.edits.length - 1];
  if (last) renderResult(last);
  document.body.dataset.ready = "1";
  resumePending();
}).catch((e) => showError(`cannot reach the fedit server: ${e.message}`));

"use strict";
// The operator page: polls /api/figures, lists the DLQ, and posts replay/purge after a confirmation.
const $ = (id) => document.getElementById(id);
const shown = (v) => (v === null || v === undefined ? "unknown" : String(v));
const PAGE_SIZE = 20;
let page = 0, readOnly = false, detailRef = null;

function spark(id, values) {
  const nums = values.filter((v) => typeof v === "number");
  const max = Math.max(1, ...nums), n = values.length;
  const points = values.map((v, i) => `${n > 1 ? (i * 120) / (n - 1) : 0},${30 - ((v || 0) * 28) / max - 1}`);
  $(id).querySelector("polyline").setAttribute("points", points.join(" "));
}

function rows(tbody, list) {
  tbody.replaceChildren(...list.map((cells) => {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = shown(cell);
      tr.append(td);
    }
    return tr;
  }));
}

function showFigures(f) {
  readOnly = f.read_only;
  document.querySelectorAll(".act").forEach((b) => { b.hidden = readOnly; });
  $("feed-error").textContent = f.error || "";
  const s = f.status;
  if (!s) return;
  $("updated").textContent = "updated " + new Date(f.at * 1000).toLocaleTimeString();
  $("lag").textContent = shown(s.lag);
  $("not-ended").textContent = shown(s.not_ended);
  const rate = (v) => (v === null || v === undefined ? "-" : v.toFixed(1));
  $("ended-rate").textContent = rate(f.ended_per_s);
  $("applied-rate").textContent = rate(f.applied_per_s);
  $("ended-total").textContent = shown(f.ended_total);
  $("applied").textContent = shown((f.outcomes || {}).applied || 0);
  $("queued").textContent = shown(s.queued_tasks);
  const oldest = s.retrying.oldest_age;
  $("retrying").textContent = shown(s.retrying.ops) + (oldest === null ? "" : ` (oldest ${Math.round(oldest)} s)`);
  $("spool").textContent = shown(s.spool.messages);
  $("dlq-pending").textContent = shown(s.dlq_pending);
  spark("lag-trend", f.trend.map((t) => t.lag));
  spark("rate-trend", f.trend.map((t) => t.ended_per_s));
  $("outcomes").replaceChildren(...Object.entries(f.outcomes || {}).map(([k, v]) => {
    const li = document.createElement("li"); li.textContent = `${k}: ${v}`; li.dataset.outcome = k; return li;
  }));
  rows($("partitions").tBodies[0], Object.entries(s.partitions || {}).map(([p, o]) =>
    [p, o.high, o.committed, o.lag, o.not_ended]));
  rows($("targets").tBodies[0], Object.entries(s.targets).map(([name, t]) => {
    const paused = Boolean(t.pause && t.pause.paused);
    const state = document.createElement("span");
    state.className = paused ? "paused" : t.circuit;
    state.textContent = paused ? "paused" : t.circuit;
    state.dataset.target = name;
    const why = paused ? `paused by ${t.pause.by}${t.pause.reason ? ": " + t.pause.reason : ""}` : t.reason || "";
    const button = document.createElement("button");
    button.textContent = paused ? "resume" : "pause";
    button.className = "target-action";
    button.dataset.target = name;
    button.disabled = Boolean(f.read_only);
    button.addEventListener("click", () => onTarget(name, paused ? "resume" : "pause"));
    return [name, state, why, t.waiting, button];
  }));
}

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function poll() {
  try { showFigures(await api("/api/figures")); } catch (e) { $("feed-error").textContent = String(e); }
  setTimeout(poll, 1500);
}

function filters() {
  const form = new FormData($("dlq-filters"));
  const query = new URLSearchParams({ page, size: PAGE_SIZE });
  for (const name of ["reason", "outcome", "command", "target", "key", "older_than", "op_id"]) {
    const value = form.get(name);
    if (value) query.set(name, value);
  }
  return query;
}

async function loadRecords() {
  const data = await api("/api/dlq?" + filters());
  $("dlq-count").textContent = `${data.total} pending`;
  $("page-no").textContent = `page ${page + 1} of ${Math.max(1, Math.ceil(data.total / PAGE_SIZE))}`;
  rows($("records").tBodies[0], data.records.map((r) => {
    const box = document.createElement("input");
    box.type = "checkbox"; box.value = r.ref; box.className = "pick";
    return [box, r.ref, new Date(r.timestamp_ms).toISOString().replace("T", " ").slice(0, 19),
      r.outcome, r.reason, r.attempts, r.op];
  }));
  [...$("records").tBodies[0].rows].forEach((tr, i) => {
    tr.dataset.ref = data.records[i].ref;
    tr.addEventListener("click", (e) => { if (e.target.type !== "checkbox") openDetail(tr.dataset.ref, false); });
  });
}

async function openDetail(ref, values) {
  detailRef = ref;
  const record = await api(`/api/dlq/record?ref=${encodeURIComponent(ref)}&values=${values ? 1 : 0}`);
  $("detail-ref").textContent = ref;
  $("detail-body").textContent = JSON.stringify(record, null, 2);
  $("show-values").hidden = values;
  $("detail").hidden = false;
}

function confirmed(text) {
  return new Promise((resolve) => {
    $("confirm-text").textContent = text;
    $("confirm").addEventListener("close", () => resolve($("confirm").returnValue === "ok"), { once: true });
    $("confirm").showModal();
  });
}

async function onTarget(name, what) {
  const reason = what === "pause" ? $("pause-reason").value : "";
  if (!(await confirmed(`${what} target ${name}?` + (what === "pause" ? " Its ops will wait in Kafka." : "")))) return;
  try {
    const result = await api(`/api/targets/${what}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ target: name, reason }),
    });
    $("target-result").textContent = `target ${result.target} ${result.state}`;
  } catch (e) { $("target-result").textContent = `${what} failed: ${e}`; }
}

async function previewSelected() {
  const refs = [...document.querySelectorAll(".pick:checked")].map((b) => b.value);
  if (!refs.length) { $("action-result").textContent = "select records first"; return; }
  try {
    const result = await api("/api/dlq/preview", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ refs }),
    });
    $("action-result").textContent = result.preview.map((p) => `${p.ref}: ${p.verdict}` +
      (p.detail ? ` (${p.detail})` : "")).join("; ");
  } catch (e) { $("action-result").textContent = `preview failed: ${e}`; }
}

async function act(what) {
  const refs = [...document.querySelectorAll(".pick:checked")].map((b) => b.value);
  if (!refs.length) { $("action-result").textContent = "select records first"; return; }
  if (!(await confirmed(`${what} ${refs.length} record(s): ${refs.join(", ")}?`))) return;
  try {
    const result = await api(`/api/dlq/${what}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ refs }),
    });
    $("action-result").textContent = `${what}: ` + JSON.stringify(result);
  } catch (e) { $("action-result").textContent = `${what} failed: ${e}`; }
  loadRecords();
}

function start() {
  const select = $("dlq-filters").elements.reason;
  api("/api/reasons").then((list) => {
    for (const reason of list) { const o = document.createElement("option"); o.textContent = reason; select.append(o); }
  });
  $("dlq-filters").addEventListener("submit", (e) => { e.preventDefault(); page = 0; loadRecords(); });
  $("newer").addEventListener("click", () => { page = Math.max(0, page - 1); loadRecords(); });
  $("older").addEventListener("click", () => { page += 1; loadRecords(); });
  $("all").addEventListener("change", (e) => document.querySelectorAll(".pick").forEach((b) => { b.checked = e.target.checked; }));
  $("show-values").addEventListener("click", () => openDetail(detailRef, true));
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  $("replay").addEventListener("click", () => act("replay"));
  $("preview").addEventListener("click", previewSelected);
  $("purge").addEventListener("click", () => act("purge"));
  poll();
  loadRecords();
}
start();

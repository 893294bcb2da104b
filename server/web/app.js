// fedbrain dashboard: runs, a live run page with per-round plots, the learning form, bundles.
// No framework, no build step. The API key stays in sessionStorage and travels only in the
// Authorization header (no cookies). Every value from the server is inserted as text.
"use strict";

const API = "/api/v1";
const view = document.getElementById("view");
let cleanup = [];

// ------------------------------------------------------------------------------ helpers

function key() { return sessionStorage.getItem("fedbrain-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + key() }, options.headers || {});
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, Object.assign({}, options, { headers }));
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await response.json();
  if (!response.ok) {
    const error = new Error((body && body.detail) || response.statusText);
    error.status = response.status;
    error.errors = (body && body.errors) || [];
    throw error;
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function num(value, digits = 3) {
  if (value === null || value === undefined || value === "") return "–";
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value);
  return Math.abs(n) >= 1000 || (Math.abs(n) < 0.001 && n !== 0) ? n.toExponential(2) : n.toPrecision(digits).replace(/\.?0+$/, "");
}

function status(value) { return el("span", { class: "status-" + value }, value); }

function table(columns, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(c => el("th", {}, c[0])))),
    el("tbody", {}, rows.map(row => el("tr", {}, columns.map(c => {
      const value = c[1](row);
      return el("td", { class: c[2] || null }, value);
    })))));
}

function show(...nodes) { view.replaceChildren(...nodes); }

function failure(error) {
  const lines = [el("p", { class: "error" }, `Error ${error.status || ""}: ${error.message}`)];
  if (error.status === 401) lines.push(el("p", {}, "Enter an API key above (fedbrain api-keys create ...)."));
  show(...lines);
}

function later(fn, ms) { const id = setInterval(fn, ms); cleanup.push(() => clearInterval(id)); }

// ------------------------------------------------------------------------------ runs list

async function runsPage() {
  const page = await api("/runs?limit=500");
  show(
    el("h1", {}, `Runs (${page.total})`),
    table([
      ["run", r => el("a", { href: `#/runs/${encodeURIComponent(r.run_id)}` }, r.run_id)],
      ["artifact", r => r.artifact_name],
      ["privacy level", r => r.privacy_level + (r.dp_unit ? ` (DP unit: ${r.dp_unit})` : "")],
      ["status", r => status(r.status)],
      ["rounds recorded", r => `${r.rounds_recorded}${r.num_rounds ? " / " + r.num_rounds : ""}`, "num"],
      ["epsilon spent", r => num(r.epsilon_spent), "num"],
      ["reliability", r => num(r.reliability, 2), "num"],
      ["started (UTC)", r => (r.started_at || "").replace("T", " ").slice(0, 19)],
    ], page.runs));
}

async function jobsPage() {
  const jobs = await api("/jobs?limit=200");
  show(
    el("h1", {}, `Jobs (${jobs.length})`),
    table([
      ["job", j => el("a", { href: `#/jobs/${encodeURIComponent(j.job_id)}` }, j.job_id)],
      ["artifact", j => j.artifact_name],
      ["status", j => status(j.status)],
      ["run", j => j.run_id ? el("a", { href: `#/runs/${encodeURIComponent(j.run_id)}` }, j.run_id) : "–"],
      ["submitted by", j => j.submitted_by],
      ["submitted (UTC)", j => j.submitted_at.replace("T", " ").slice(0, 19)],
    ], jobs));
}

// ------------------------------------------------------------------------------ run page

function chart(title, series, data, yRange) {
  const box = el("div", { class: "chart" });
  const opts = {
    title, width: 500, height: 220,
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    axes: [{ label: "round" }, {}],
    series: [{ label: "round" }, ...series],
  };
  // uPlot draws on a canvas: nothing from the server becomes markup
  new uPlot(opts, data, box);
  return box;
}

function numbers(rounds, name) {
  return rounds.map(r => { const v = Number(r[name]); return r[name] === null || !Number.isFinite(v) ? null : v; });
}

function runCharts(run, rounds) {
  const x = rounds.map(r => r.round);
  const budget = run.epsilon_budget;
  const charts = [
    chart("Evaluation loss and accuracy", [
      { label: "eval loss", stroke: "#b3261e", width: 2 },
      { label: "eval accuracy", stroke: "#17803d", width: 2 },
      { label: "train loss", stroke: "#e08a00", width: 1, dash: [4, 4] },
    ], [x, numbers(rounds, "eval_loss"), numbers(rounds, "eval_accuracy"), numbers(rounds, "train_loss")]),
    chart(`Epsilon spent${budget ? " (budget " + budget + ")" : ""}`, [
      { label: "epsilon spent", stroke: "#2856c9", width: 2 },
      { label: "budget", stroke: "#999", dash: [6, 4] },
    ], [x, numbers(rounds, "epsilon_spent"), x.map(() => budget ?? null)]),
    chart("Reliability (result-aggregator)", [
      { label: "reliability", stroke: "#6a3dc9", width: 2 },
    ], [x, numbers(rounds, "reliability")], [0, 1]),
    chart("Participants and dropouts", [
      { label: "contributors", stroke: "#17803d", width: 2 },
      { label: "sampled", stroke: "#2856c9", width: 1 },
      { label: "dropped", stroke: "#b3261e", width: 2 },
    ], [x, numbers(rounds, "contributors"), numbers(rounds, "nodes_sampled"), numbers(rounds, "nodes_dropped")]),
  ];
  return el("div", { class: "charts", id: "charts" }, charts);
}

function roundsTable(rounds) {
  return table([
    ["round", r => r.round, "num"],
    ["status", r => status(r.status)],
    ["nodes sampled / responded / dropped", r => `${r.nodes_sampled} / ${r.nodes_responded} / ${r.nodes_dropped}`],
    ["eval loss", r => num(r.eval_loss, 4), "num"],
    ["eval accuracy", r => num(r.eval_accuracy), "num"],
    ["train loss", r => num(r.train_loss, 4), "num"],
    ["epsilon spent", r => num(r.epsilon_spent), "num"],
    ["reliability", r => num(r.reliability, 2), "num"],
    ["reliability reasons", r => r.reliability_reasons.join("; ") || "–"],
    ["dropouts (node: stage)", r => r.dropouts.map(d => `${d.node_id}: ${d.stage || d.phase}`).join("; ") || "–"],
    ["stage seconds", r => Object.entries(r.stage_seconds).map(([k, v]) => `${k} ${num(v, 2)}`).join(", ")],
  ], rounds);
}

function runSummary(run) {
  const rows = [
    ["run", run.run_id], ["artifact", run.artifact_name], ["status", status(run.status)],
    ["privacy level", run.privacy_level],
    ["DP unit", run.dp_unit ? `${run.dp_unit} (${run.dp_unit === "example" ? "protects one training example" : "protects a node's whole data"})` : "–"],
    ["epsilon spent / budget", `${num(run.epsilon_spent)} / ${run.epsilon_budget ?? "–"} (delta ${num(run.delta)})`],
    ["reliability", num(run.reliability, 2)],
    ["rounds recorded", `${run.rounds_recorded}${run.num_rounds ? " of " + run.num_rounds : ""}`],
    ["verdict", run.verdict_reasons.join("; ") || "–"],
    ["error", run.error || "–"],
    ["Flower run id", run.flower_run_id || "–"],
    ["job", run.job_id ? el("a", { href: `#/jobs/${encodeURIComponent(run.job_id)}` }, run.job_id) : "–"],
    ["bundle", run.has_bundle ? el("a", { href: `#/runs/${encodeURIComponent(run.run_id)}/bundle`, id: "bundle-link" }, "manifest and verification") : "none"],
  ];
  return el("dl", { class: "summary" }, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function renderRun(container, runId) {
  const run = await api(`/runs/${encodeURIComponent(runId)}`);
  const rounds = await api(`/runs/${encodeURIComponent(runId)}/rounds`);
  container.replaceChildren(
    runSummary(run),
    el("h2", {}, `Refused nodes (${run.refused_nodes.length})`),
    run.refused_nodes.length
      ? table([["node", n => n.node_id], ["reason", n => n.reason]], run.refused_nodes)
      : el("p", { class: "hint" }, "Every node that answered was admitted."),
    el("h2", {}, "Per round"),
    runCharts(run, rounds),
    el("h2", {}, `Rounds (${rounds.length})`),
    el("div", { id: "rounds" }, roundsTable(rounds)),
  );
  container.dataset.status = run.status;
  container.dataset.rounds = String(rounds.length);
  return run;
}

async function runPage(runId) {
  const box = el("div", { id: "run" });
  show(el("h1", {}, "Run ", runId), box);
  let run = await renderRun(box, runId);
  later(async () => {
    if (run.status !== "running") return;
    try { run = await renderRun(box, runId); } catch (error) { /* next tick */ }
  }, 1500);
}

async function jobPage(jobId) {
  let job = await api(`/jobs/${encodeURIComponent(jobId)}`);
  const state = el("span", { id: "job-status" });
  const progress = el("p", { id: "progress", class: "hint" }, "waiting for the worker…");
  const runBox = el("div", { id: "run" });
  const cancel = el("button", { onclick: async () => {
    try { await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); } catch (e) { alert(e.message); }
  } }, "Cancel job");
  function paint() {
    state.replaceChildren(status(job.status));
    cancel.disabled = !["queued", "running"].includes(job.status);
  }
  paint();
  show(el("h1", {}, "Job ", jobId), el("p", {}, "Status: ", state, " ", cancel,
    job.error ? el("span", { class: "error" }, " ", job.error) : null), progress, runBox);
  let shown = -1;
  async function refreshRun() {
    if (!job.run_id) return;
    try {
      await renderRun(runBox, job.run_id);
      shown = Number(runBox.dataset.rounds);
    } catch (error) { /* the run appears after its first ledger sync */ }
  }
  await refreshRun();
  const controller = new AbortController();
  cleanup.push(() => controller.abort());
  // Server-sent events over fetch (EventSource cannot send the Authorization header).
  (async () => {
    try {
      const response = await fetch(`${API}/jobs/${encodeURIComponent(jobId)}/events`, {
        headers: { "Authorization": "Bearer " + key() }, signal: controller.signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          let type = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) type = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (!data) continue;
          const payload = JSON.parse(data);
          if (type === "status") { job = payload; paint(); await refreshRun(); }
          if (type === "progress") {
            const where = payload.server_round ? `round ${payload.server_round}/${payload.num_rounds}` : "";
            progress.textContent = `${payload.artifact_name} ${where} ${payload.kind}${payload.stage ? " " + payload.stage : ""} ${payload.message || ""}`;
            if (payload.kind === "round_finished" || payload.kind === "job_finished") await refreshRun();
          }
          if (type === "end") { await refreshRun(); return; }
        }
      }
    } catch (error) { if (error.name !== "AbortError") progress.textContent = "event stream: " + error.message; }
  })();
  later(async () => { if (shown >= 0 && job.run_id && runBox.dataset.status === "running") await refreshRun(); }, 2000);
}

async function bundlePage(runId) {
  const id = encodeURIComponent(runId);
  const [manifest, check] = await Promise.all([
    api(`/runs/${id}/bundle/manifest`), api(`/runs/${id}/bundle/verification`)]);
  const download = el("button", { onclick: async () => {
    const response = await fetch(`${API}/runs/${id}/bundle`, { headers: { "Authorization": "Bearer " + key() } });
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: manifest.artifact_name + ".zip" });
    link.click(); URL.revokeObjectURL(url);
  } }, "Download bundle");
  const fields = ["artifact_name", "model_version", "base_model", "task", "node_type", "privacy_level",
    "precision", "quantized", "embedding_dim", "training_config_hash", "base_checkpoint_digest",
    "license", "created_at"];
  show(
    el("h1", {}, "Bundle of ", el("a", { href: `#/runs/${id}` }, runId)),
    el("p", { id: "verification" }, check.verified
      ? [el("span", { class: "verified" }, "verified"), ` — signed by ${check.keyid}, checked against the server's trusted keys`]
      : [el("span", { class: "bad" }, "NOT verified"), " — ", check.error]),
    download,
    el("h2", {}, "Manifest"),
    table([["field", f => f], ["value", f => JSON.stringify(manifest[f] ?? null)]], fields),
    el("h2", {}, "Provenance"),
    el("pre", {}, JSON.stringify(manifest.provenance ?? {}, null, 2)),
    el("h2", {}, "Whole manifest (artifact_manifest.json)"),
    el("pre", {}, JSON.stringify(manifest, null, 2)));
}

// ------------------------------------------------------------------------------ learning form

const FORM = [
  ["Model", [
    ["embedding_dim", "int", "embedding size (encoders; required for task embed)"],
    ["hidden_size", "int"], ["num_layers", "int"], ["num_heads", "int"],
    ["input_size", "int", "image side in pixels (vision)"], ["sample_rate", "int", "Hz (audio)"],
    ["max_seq_length", "int", "tokens (text, LM)"],
  ]],
  ["Training", [
    ["batch_size", "int"], ["learning_rate", "float"], ["optimizer", ["", "adamw", "adam", "sgd"]],
    ["epochs", "int", "local epochs per round"], ["weight_decay", "float"],
    ["precision", ["", "fp32", "fp16", "int8"]], ["quantize", "bool", "post-training int8 (adds -int8 to the name)"],
    ["checkpoint_interval", "int"], ["augmentations", "text", "comma-separated"],
    ["train_data_tags", "text", "comma-separated"], ["artifact_name", "text", "empty: the catalog name"],
  ]],
  ["Fine-tuning", [
    ["base_checkpoint", "text", "absolute path of a local Hugging Face folder on the server and every node; empty: train from scratch"],
    ["adaptation", ["", "full", "lora", "head"],
      "what trains and travels — full: every weight · lora: low-rank adapters + heads · head: the heads only (lora and head need a base)"],
    ["lora_rank", "int", "LoRA rank r (default 8)"], ["lora_alpha", "int", "LoRA alpha (default 16)"],
    ["bundle_weights", ["", "merged", "adapters"],
      "merged: every weight, adapters folded in · adapters: the trained tensors + the base's digest"],
  ]],
  ["Federation", [
    ["federation.num_rounds", "int"], ["federation.clients_per_round", "int"],
    ["federation.reliability_threshold", "float", "0..1: below it no bundle is signed"],
  ]],
  ["Privacy", [
    ["privacy_level", ["none", "dp", "secure-agg", "dp+secure-agg"],
      "none: plain FedAvg · dp: clipping + noise + epsilon accounting · secure-agg: the server sees only sums (SecAgg+) · dp+secure-agg: both"],
    ["dp.unit", ["", "node", "example"],
      "node: protects a node's whole data (needs many nodes per round) · example: DP-SGD on every node, protects one example"],
    ["dp.clipping_norm", "float", "L2 bound C"], ["dp.noise_multiplier", "float", "sigma (noise std = sigma × C)"],
    ["dp.target_epsilon", "float", "or: calibrate sigma for this epsilon"],
    ["dp.delta", "float", "epsilon is reported at this delta (e.g. 1e-5)"],
    ["dp.epsilon_budget", "float", "training stops before a round that would exceed it"],
    ["secagg.quantization_range", "float"],
  ]],
];

function formValues(form) {
  const values = {};
  const target = form.querySelector("[name=target]").value;
  if (target) Object.assign(values, JSON.parse(target));
  for (const input of form.querySelectorAll("[data-kind]")) {
    const kind = input.dataset.kind, name = input.name;
    if (kind === "bool") { if (input.checked) values[name] = true; continue; }
    const raw = input.value.trim();
    if (raw === "") continue;
    if (kind === "int" || kind === "float") {
      const n = Number(raw);
      values[name] = Number.isFinite(n) ? n : raw;  // the server names what is wrong
    } else values[name] = raw;
  }
  return values;
}

async function formPage() {
  const catalog = await api("/catalog");
  const targets = [];
  for (const entry of catalog) for (const f of entry.training_forms) targets.push([entry.id, f]);
  const form = el("form", { id: "learning-form", novalidate: true });
  form.append(el("fieldset", {}, el("legend", {}, "Artifact"),
    el("label", {}, "what to train (component / base model / task)",
      el("select", { name: "target", id: "target" }, el("option", { value: "" }, "choose…"),
        targets.map(([id, f]) => el("option", { value: JSON.stringify(f) }, `${id}: ${f.component} / ${f.base_model} / ${f.task}`)))),
    el("div", { class: "field-error", "data-error": "component" }),
    el("div", { class: "field-error", "data-error": "base_model" }),
    el("div", { class: "field-error", "data-error": "task" })));
  for (const [legend, fields] of FORM) {
    form.append(el("fieldset", {}, el("legend", {}, legend), el("div", { class: "grid" }, fields.map(([name, kind, hint]) => {
      let input;
      if (Array.isArray(kind)) input = el("select", { name, "data-kind": "choice" }, kind.map(v => el("option", { value: v }, v || "(default)")));
      else if (kind === "bool") input = el("input", { name, type: "checkbox", "data-kind": "bool" });
      else input = el("input", { name, "data-kind": kind, inputmode: kind === "text" ? null : "decimal" });
      return el("label", {}, name, input, hint ? el("span", { class: "hint" }, hint) : null,
        el("div", { class: "field-error", "data-error": name }));
    }))));
  }
  const preview = el("div", { class: "preview", id: "preview" }, "Choose an artifact to see its name and config hash.");
  const general = el("div", { class: "field-error", id: "form-errors" });
  const submit = el("button", { type: "submit", id: "submit" }, "Submit job");
  form.append(preview, general, submit);
  show(el("h1", {}, "Learning form"), form);

  let timer = null, ticket = 0;
  async function validate() {
    const mine = ++ticket;
    for (const box of form.querySelectorAll("[data-error]")) box.textContent = "";
    general.textContent = "";
    try {
      const resolved = await api("/jobs/resolve", { method: "POST", body: JSON.stringify(formValues(form)) });
      if (mine !== ticket) return null;
      const estimate = resolved.model_estimate;
      preview.replaceChildren(
        el("div", {}, "artifact_name: ", el("strong", { id: "preview-name" }, resolved.artifact_name)),
        el("div", {}, "training_config_hash: ", el("code", { id: "preview-hash" }, resolved.training_config_hash)),
        el("div", {}, `node type ${resolved.node_type}, privacy ${resolved.privacy_level}`,
          estimate ? `, model ≈ ${num(estimate.parameters)} parameters, ≥ ${num(estimate.training_bytes / 1e9)} GB to train` : ""));
      return resolved;
    } catch (error) {
      if (mine !== ticket) return null;
      preview.textContent = "The form has problems:";
      for (const problem of error.errors || []) {
        const box = form.querySelector(`[data-error="${CSS.escape(problem.field)}"]`);
        if (box) box.textContent = problem.message;
        else general.append(el("div", {}, `${problem.field}: ${problem.message}`));
      }
      if (!(error.errors || []).length) general.textContent = error.message;
      return null;
    }
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(validate, 250); });
  form.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(validate, 50); });
  form.addEventListener("submit", async event => {
    event.preventDefault();
    if (!(await validate())) return;
    try {
      const job = await api("/jobs", { method: "POST", body: JSON.stringify(formValues(form)) });
      location.hash = `#/jobs/${encodeURIComponent(job.job_id)}`;
    } catch (error) { general.textContent = error.message; }
  });
}

// ------------------------------------------------------------------------------ router

async function route() {
  for (const stop of cleanup.splice(0)) stop();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (!key()) { show(el("p", {}, "Enter an API key above (fedbrain api-keys create --name you --role viewer).")); return; }
    if (parts[0] === "runs" && parts[1] && parts[2] === "bundle") await bundlePage(parts[1]);
    else if (parts[0] === "runs" && parts[1]) await runPage(parts[1]);
    else if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "jobs") await jobsPage();
    else if (parts[0] === "form") await formPage();
    else await runsPage();
  } catch (error) { failure(error); }
}

async function who() {
  const box = document.getElementById("whoami");
  if (!key()) { box.textContent = ""; return; }
  try { const me = await api("/whoami"); box.textContent = `${me.name} (${me.role})`; }
  catch (error) { box.textContent = "key refused"; }
}

document.getElementById("key-form").addEventListener("submit", event => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  sessionStorage.setItem("fedbrain-key", input.value.trim());
  input.value = "";
  who(); route();
});
window.addEventListener("hashchange", route);
who(); route();

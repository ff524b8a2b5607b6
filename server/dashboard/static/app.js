// The fedfleet dashboard: hash routes, each page drawn from the documented HTTP API (/api/openapi.json), and
// redrawn when the server-sent change feed says a part of the state it shows has moved. No page reloads.
"use strict";

const main = document.getElementById("main");
const live = document.getElementById("live");
const state = {route: null, topics: [], pending: null, renders: 0};
const e = escapeHtml;

function token() { return sessionStorage.getItem("fedfleet-token") || ""; }

async function api(path, options) {
  const res = await fetch(path, Object.assign({credentials: "same-origin"}, options || {}));
  const body = (res.headers.get("content-type") || "").includes("json") ? await res.json() : await res.text();
  if (!res.ok) {
    const err = new Error(body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : res.statusText);
    err.status = res.status;
    throw err;
  }
  return body;
}

function waveName(k) { return k < 0 ? "plan" : k === 0 ? "canary" : `wave ${k}`; }
function when(ms) { return ms ? new Date(ms).toLocaleString() : "–"; }
function clock(ms) { return new Date(ms).toLocaleTimeString(); }
function badge(text) { return `<span class="badge ${e(text)}">${e(text)}</span>`; }
function link(route, text) { return `<a href="#/${route}">${e(text)}</a>`; }
function table(cols, rows, rowClass) {
  if (!rows.length) return `<p class="muted">None yet.</p>`;
  return `<table><thead><tr>${cols.map(c => `<th>${e(c)}</th>`).join("")}</tr></thead><tbody>` +
    rows.map((r, i) => `<tr class="${rowClass ? rowClass(i) : ""}">${r.map(c => `<td>${c}</td>`).join("")}</tr>`).join("") +
    `</tbody></table>`;
}
function counts(obj) { return Object.entries(obj).map(([k, v]) => `<li>${e(k)}: <b style="display:inline;font-size:14px">${v}</b></li>`).join(""); }

// ----- pages: each returns {html, after?, topics} -----

async function fleetPage(params) {
  const q = new URLSearchParams(params);
  const doc = await api(`/api/fleet?${q}`);
  const opts = (values, chosen, any) => ["", ...values].map(v => `<option value="${e(v)}" ${v === chosen ? "selected" : ""}>${e(v || any)}</option>`).join("");
  const labels = Object.entries(doc.by_label).flatMap(([k, vs]) => Object.keys(vs).map(v => `${k}=${v}`));
  const rows = doc.devices.map(d => [
    link(`device/${encodeURIComponent(d.id)}`, d.id), e(d.fleet), e(Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ")),
    badge(d.online ? "online" : "offline"), e(d.running_release || "–"), e(d.update_state), e(d.last_event || ""),
    d.last_error ? `<span class="error">${e(d.last_error)}</span>` : "", when(d.last_seen)]);
  return {
    topics: ["devices", "events"],
    html: `<h1>Fleet</h1>
      <div class="cards">
        <div class="card">devices<b id="fleet-total">${doc.total}</b></div>
        <div class="card">online<b id="fleet-online">${doc.online}</b></div>
        <div class="card">by release<ul>${counts(doc.by_release)}</ul></div>
        <div class="card">by state<ul>${counts(doc.by_state)}</ul></div>
        ${Object.entries(doc.by_label).map(([k, vs]) => `<div class="card">cohort ${e(k)}<ul>${counts(vs)}</ul></div>`).join("")}
      </div>
      <form class="filters" id="filters">
        <input name="q" placeholder="search device id" value="${e(params.q || "")}">
        <select name="release" title="running release">${opts(Object.keys(doc.by_release), params.release || "", "any release")}</select>
        <select name="state" title="update state">${opts(Object.keys(doc.by_state), params.state || "", "any state")}</select>
        <select name="online" title="presence">${opts(["true", "false"], params.online || "", "online or not")}</select>
        <select name="label" title="cohort (label)">${opts(labels, params.label || "", "any cohort")}</select>
        <button>Filter</button>
      </form>
      <p class="muted">${doc.matching} matching${doc.matching > doc.devices.length ? `, first ${doc.devices.length} shown` : ""}</p>
      ${table(["device", "fleet", "labels", "presence", "running", "update state", "last event", "last error", "last seen"], rows)}`,
    after() {
      document.getElementById("filters").addEventListener("submit", ev => {
        ev.preventDefault();
        const f = new URLSearchParams();
        for (const [k, v] of new FormData(ev.target)) if (v) f.set(k, v);
        location.hash = `#/fleet${f.toString() ? "?" + f : ""}`;
      });
    },
  };
}

async function devicePage(id) {
  const doc = await api(`/api/devices/${encodeURIComponent(id)}`);
  const d = doc.device;
  const timeline = [
    ...doc.assignments.map(a => ({at: a.created_at, kind: "assignment", text: `counter ${a.counter} → ${a.release_id}${a.rollout_id ? " (" + a.rollout_id + ")" : ""}${a.published_at ? "" : ", not yet published"}`})),
    ...doc.events.map(v => ({at: v.received_at, kind: "event", text: `${v.kind}${v.reason ? ": " + v.reason : ""} (${v.release_id}, counter ${v.counter}, via ${v.via})`, bad: ["probe_failed", "rejected", "failed", "stale"].includes(v.kind)})),
  ].sort((a, b) => b.at - a.at);
  const windows = doc.telemetry;
  return {
    topics: ["devices", "events", "telemetry"],
    html: `<h1>Device ${e(d.id)} ${badge(d.online ? "online" : "offline")}</h1>
      <div class="cards">
        <div class="card">fleet<b>${e(d.fleet)}</b></div>
        <div class="card">running<b id="device-running">${e(d.running_release || "–")}</b></div>
        <div class="card">assigned<b>${e(doc.assigned_release || "–")}</b></div>
        <div class="card">freshness<b id="device-freshness">${doc.freshness.stale ? badge("stale") : doc.freshness.fresh_until ? "fresh until " + when(doc.freshness.fresh_until) : "–"}</b></div>
        <div class="card">update state<b>${e(d.update_state)}</b></div>
        <div class="card">agent<b>${e(d.agent_version || "–")}</b></div>
      </div>
      <p>Labels: ${e(Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "none")} ·
         last seen ${when(d.last_seen)} · rollouts: ${doc.rollouts.map(r => link(`rollout/${r}`, r)).join(", ") || "none"}</p>
      <p>Last error: ${d.last_error ? `<span class="error" id="last-error">${e(d.last_error)}</span>` : "none"}</p>
      <h2>Updates: assignments and events</h2>
      <div id="timeline">${table(["time", "kind", "what"], timeline.map(t => [when(t.at), badge(t.kind), e(t.text)]), i => timeline[i].bad ? "fail" : "")}</div>
      <h2>Telemetry windows</h2>
      <div class="charts" id="device-charts"></div>
      <div id="windows">${table(["ended", "sequence", "release", "inferences", "errors", "max input PSI", "score PSI", "via"],
        windows.slice(0, 20).map(t => [when(t.end_ms), t.first_sequence === t.sequence ? String(t.sequence) : `${t.first_sequence}..${t.sequence}`, e(t.release_id), String(t.inferences), String(t.errors), fmtNum(t.max_psi), fmtNum(t.score_psi), e(t.via)]))}
        ${windows.length > 20 ? `<p class="muted">newest 20 of the last ${windows.length} shown; a window's PSI over few inferences is noisy, the Drift page pools them.</p>` : ""}</div>`,
    after() {
      if (!windows.length) return;
      const points = key => windows.map(t => [t.end_ms, t[key]]).reverse();
      document.getElementById("device-charts").appendChild(lineChart("this device's windows: PSI against its release's reference", [
        {name: "max input PSI", points: points("max_psi")}, {name: "score PSI", points: points("score_psi")}], {xLabel: clock, width: 560}));
    },
  };
}

async function rolloutsPage() {
  const rows = await api("/api/rollouts");
  return {
    topics: ["rollouts"],
    html: `<h1>Rollouts</h1>` + table(["rollout", "release", "phase", "wave", "started", "updated"], rows.map(r => [
      link(`rollout/${r.id}`, r.id), e(r.release), badge(r.phase), `${waveName(r.wave)} of ${r.waves}`, when(r.created_at), when(r.updated_at)])),
  };
}

async function rolloutPage(id) {
  const doc = await api(`/api/rollouts/${encodeURIComponent(id)}`);
  const waves = doc.waves.map(w => {
    const total = Object.values(w.devices).reduce((a, b) => a + b, 0) || 1;
    const segs = Object.entries(w.devices).map(([k, n]) => `<span class="seg-${e(k)}" style="width:${100 * n / total}%" title="${e(k)}: ${n}"></span>`).join("");
    const current = w.wave === doc.wave ? " ◀ current" : "";
    return [e(w.name) + current, `<div class="bar">${segs}</div>`, `<span class="wave-states" data-wave="${w.wave}">${e(Object.entries(w.devices).map(([k, n]) => `${k} ${n}`).join(", "))}</span>`];
  });
  const gates = doc.gates.map(g => [e(g.metric), fmtNum(g.value), `${e(g.op)} ${fmtNum(g.threshold)}`, badge(g.verdict), e(g.note || "")]);
  const metrics = [...new Set(doc.gate_history.flatMap(s => s.gates.map(g => g.metric)))];
  const decisions = doc.decisions.slice().reverse().map(d => {
    const fired = d.gates.filter(g => g.verdict === "fail").map(g => `${g.metric} = ${fmtNum(g.value)} (${g.op} ${fmtNum(g.threshold)})${g.cohort ? " in " + g.cohort : ""}`);
    return [when(d.at), waveName(d.wave), badge(d.decision), e(d.reason) + (fired.length ? `<div class="error fired-gate">gate fired: ${e(fired.join("; "))}</div>` : "")];
  });
  const actions = {pause: "Pause", resume: "Resume", abort: "Abort", rollback: "Roll back"};
  return {
    topics: ["rollouts", "devices", "events"],
    html: `<h1>Rollout ${e(doc.id)} <span id="phase">${badge(doc.phase)}</span></h1>
      <p>Release <b>${e(doc.release)}</b> · on <b id="wave">${waveName(doc.wave)}</b> of ${doc.waves.length} waves
        ${doc.bake_remaining_s !== null ? ` · baking, ${Math.round(doc.bake_remaining_s)} s left` : ""}</p>
      <div class="actions">${Object.entries(actions).map(([a, label]) => `<button data-action="${a}">${label}</button>`).join("")}</div>
      <p id="action-result" class="muted"></p>
      <h2>Waves</h2>${table(["wave", "progress", "devices"], waves)}
      <h2>Gates now${doc.gates_at ? ` <span class="muted">(as of ${clock(doc.gates_at)})</span>` : ""}</h2>${table(["metric", "value", "threshold", "verdict", "note"], gates, i => doc.gates[i].verdict === "fail" ? "fail" : "")}
      <h2>Gates over time</h2><div class="charts" id="gate-charts"></div>
      <h2>Decisions</h2><div id="decisions">${table(["time", "wave", "decision", "reason"], decisions)}</div>`,
    after() {
      const charts = document.getElementById("gate-charts");
      if (!metrics.length) charts.innerHTML = `<p class="muted">No gate values recorded yet (they are kept while a wave bakes).</p>`;
      for (const m of metrics) {
        const points = [], thresholds = {};
        for (const s of doc.gate_history) for (const g of s.gates) if (g.metric === m) {
          points.push([s.at, g.value]);
          thresholds[`${g.op}`] = g.threshold;
        }
        charts.appendChild(lineChart(m, [{name: m, points}], {thresholds: Object.entries(thresholds).map(([op, v]) => ({name: `gate ${op}`, value: v})), xLabel: clock, width: 340, height: 150}));
      }
      document.querySelectorAll("[data-action]").forEach(b => b.addEventListener("click", () => act(doc.id, b.dataset.action)));
    },
  };
}

function operatorToken() {
  let t = token();
  if (!t) {
    t = prompt("Operator token (`fedfleet dashboard-token` prints it):") || "";
    if (t) sessionStorage.setItem("fedfleet-token", t);
  }
  return t;
}

async function act(id, action) {
  if (!confirm(`${action} rollout ${id}? This acts on the fleet, as \`fedfleet rollout ${action}\` would.`)) return;
  await operate(`/api/rollouts/${encodeURIComponent(id)}/${action}`, action, {confirm: id},
    r => `${action}: now ${r.phase}${r.reason ? " (" + r.reason + ")" : ""}`);
}

async function alertsPage() {
  const [alerts, loop] = await Promise.all([api("/api/alerts"), api("/api/loop")]);
  const alertRows = alerts.map(a => [String(a.id), when(a.created_at), e(a.kind), badge(a.state), e(a.summary),
    a.state === "open" ? `<button data-ack="${a.id}">Acknowledge</button>` : e(a.acknowledged_by || "")]);
  const alarmRows = loop.alarms.map(a => [String(a.id), when(a.opened_at), e(a.fleet), e(a.release_id),
    `${e(a.metric)} ${fmtNum(a.value)} &gt; ${fmtNum(a.threshold)}`, fmtNum(a.peak), badge(a.state), e(a.resolution)]);
  const jobRows = loop.jobs.map(j => [String(j.id), String(j.alarm_id), e(j.fleet), badge(j.state), e(j.cause),
    e(j.model_version || "–"), j.rollout_id ? link(`rollout/${j.rollout_id}`, j.rollout_id) : "–",
    j.state === "proposed" ? `<button data-answer="approve" data-job="${j.id}">Approve</button> <button data-answer="reject" data-job="${j.id}">Reject</button>` : e(j.error || j.decided_by || "")]);
  return {
    topics: ["audit", "rollouts"],
    html: `<h1>Alerts and the loop</h1><p class="muted">Drift alarms, the retrainings they lead to, and every alert the coordinator raised (\`fedfleet alerts list\`, \`fedfleet loop status\`).</p>
      <p id="action-result" class="muted"></p>
      <h2>Alerts</h2><div id="alerts">${table(["#", "opened", "kind", "state", "summary", ""], alertRows)}</div>
      <h2>Retrain jobs</h2><div id="jobs">${table(["job", "alarm", "fleet", "state", "cause", "model", "rollout", ""], jobRows)}</div>
      <h2>Drift alarms</h2>${table(["alarm", "opened", "fleet", "release", "value", "peak", "state", "resolution"], alarmRows)}`,
    after() {
      const confirmed = (what, path) => { if (confirm(`${what}?`)) operate(path, what); };
      document.querySelectorAll("[data-ack]").forEach(b => b.addEventListener("click", () => confirmed(`acknowledge alert ${b.dataset.ack}`, `/api/alerts/${b.dataset.ack}/ack`)));
      document.querySelectorAll("[data-answer]").forEach(b => b.addEventListener("click", () => confirmed(`${b.dataset.answer} retrain job ${b.dataset.job}`, `/api/loop/${b.dataset.job}/${b.dataset.answer}`)));
    },
  };
}

// POST an operator action (the operator token as a Bearer header), redraw, then say what came of it (after the
// redraw, which replaces the page and the line that says it).
async function operate(path, what, body, said) {
  const t = operatorToken();
  if (!t) return;
  let message, failed = false;
  try {
    const r = await api(path, {
      method: "POST", headers: {"Content-Type": "application/json", "Authorization": `Bearer ${t}`},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    message = said ? said(r) : `${what}: now ${r.state}`;
    await render();
  } catch (err) {
    if (err.status === 401) sessionStorage.removeItem("fedfleet-token");
    message = `${what} refused: ${err.message}`;
    failed = true;
  }
  const out = document.getElementById("action-result");
  if (out) {
    out.textContent = message;
    out.className = failed ? "error" : "";
  }
}

async function driftPage(params) {
  const cohortBy = params.cohort_by || "fleet", minutes = params.minutes || "30";
  const [doc, fleet] = await Promise.all([
    api(`/api/drift?cohort_by=${encodeURIComponent(cohortBy)}&minutes=${encodeURIComponent(minutes)}`), api("/api/fleet?limit=1")]);
  const keys = ["fleet", ...Object.keys(fleet.by_label)];
  return {
    topics: ["telemetry"],
    html: `<h1>Drift</h1>
      <form class="filters" id="drift-form">cohorts by <select name="cohort_by">${keys.map(k => `<option ${k === cohortBy ? "selected" : ""}>${e(k)}</option>`).join("")}</select>
        over the last <select name="minutes">${["5", "30", "120", "1440"].map(m => `<option ${m === minutes ? "selected" : ""}>${m}</option>`).join("")}</select> minutes
        <button>Show</button></form>
      <p class="muted">Each time bucket pools its windows and scores them against the reference of the release they ran
        (${Math.round(doc.bucket_ms / 1000)} s buckets)${doc.truncated ? "; only the newest windows are shown" : ""}.</p>
      <div id="drift-series">${doc.series.length ? "" : `<p class="muted">No scored telemetry in this period.</p>`}</div>`,
    after() {
      document.getElementById("drift-form").addEventListener("submit", ev => {
        ev.preventDefault();
        location.hash = `#/drift?${new URLSearchParams(new FormData(ev.target))}`;
      });
      const box = document.getElementById("drift-series");
      for (const s of doc.series) {
        const h = document.createElement("div");
        h.innerHTML = `<h2>${e(cohortBy)} = ${e(s.cohort)} · release ${e(s.release)}</h2>`;
        const charts = Object.assign(document.createElement("div"), {className: "charts"});
        const n = doc.features[s.release] || 0;
        const rows = Array.from({length: n}, (_, i) => `f${i}`);
        const values = rows.map((_, i) => s.points.map(p => p.feature_psi[i]));
        charts.appendChild(heatmap("PSI per feature over time", rows, s.points.map(p => clock(p.at)), values));
        charts.appendChild(lineChart("largest input PSI and prediction-score PSI", [
          {name: "max input PSI", points: s.points.map(p => [p.at, p.max_psi])},
          {name: "score PSI", points: s.points.map(p => [p.at, p.score_psi])}], {xLabel: clock, thresholds: [{name: "0.25", value: 0.25}]}));
        h.appendChild(charts);
        box.appendChild(h);
      }
    },
  };
}

async function trainingPage() {
  const runs = await api("/api/training");
  return {
    topics: ["training"],
    html: `<h1>Training</h1>` + table(["run", "model", "status", "rounds", "last accuracy", "ε (max)", "model version", "started"], runs.map(r => {
      const last = r.rounds[r.rounds.length - 1] || {};
      return [link(`training/${r.id}`, r.id), e(r.model_name), badge(r.status), String(Math.max(0, r.rounds.length - 1)),
        fmtNum(last.test_accuracy), fmtNum(last.epsilon_max), r.model_version ? link(`model/${r.model_version}`, r.model_version) : "–", when(r.started_at)];
    })),
  };
}

async function trainingRunPage(id) {
  const run = await api(`/api/training/${encodeURIComponent(id)}`);
  const series = key => run.rounds.filter(r => r.round > 0 || key !== "train_loss").map(r => [r.round, r[key]]);
  return {
    topics: ["training"],
    html: `<h1>Training run ${e(run.id)} ${badge(run.status)}</h1>
      <p>Model ${e(run.model_name)} · engine ${e(run.engine)} · ${run.model_version ? link(`model/${run.model_version}`, run.model_version) : "no model version"}
        ${run.error ? `<span class="error">${e(run.error)}</span>` : ""}</p>
      <div class="charts" id="run-charts"></div>
      <h2>Rounds</h2>${table(["round", "selected", "completed", "refused", "failed", "train loss", "test loss", "test accuracy", "ε max", "seconds"],
        run.rounds.map(r => [r.round, r.selected, r.completed, r.refused, r.failed, fmtNum(r.train_loss), fmtNum(r.test_loss), fmtNum(r.test_accuracy), fmtNum(r.epsilon_max), fmtNum(r.seconds)].map(String)))}
      <h2>Incidents</h2>${table(["round", "device", "kind", "detail"], run.incidents.map(i => [String(i.round), link(`device/${i.device_id}`, i.device_id), badge(i.kind), e(i.detail)]))}
      <h2>Plan</h2><pre>${e(JSON.stringify(run.plan, null, 2))}</pre>`,
    after() {
      const box = document.getElementById("run-charts");
      box.appendChild(lineChart("test accuracy per round", [{name: "accuracy", points: series("test_accuracy")}]));
      box.appendChild(lineChart("loss per round", [{name: "train", points: series("train_loss")}, {name: "test", points: series("test_loss")}]));
      box.appendChild(lineChart("ε per round (largest client)", [{name: "ε", points: series("epsilon_max")}]));
    },
  };
}

async function privacyPage() {
  const doc = await api("/api/privacy");
  return {
    topics: ["training"],
    html: `<h1>Privacy ledger</h1><p class="muted">Lifetime ε is the sum over training runs of each run's ε (basic composition). Default budget ${fmtNum(doc.default_budget)}.</p>` +
      table(["device", "lifetime ε", "budget", "used", "runs"], doc.devices.map(d => [link(`device/${d.device}`, d.device), fmtNum(d.lifetime_epsilon), fmtNum(d.budget),
        `<div class="bar" style="width:160px"><span class="${d.lifetime_epsilon > d.budget ? "seg-rolled_back" : "seg-running"}" style="width:${Math.min(100, 100 * d.lifetime_epsilon / Math.max(d.budget, 1e-9))}%"></span></div>`, String(d.runs)])) +
      `<h2>Spend per run</h2>` + table(["device", "run", "rounds", "ε", "δ", "model"], doc.spend.map(s => [e(s.device), link(`training/${s.run}`, s.run), String(s.rounds), fmtNum(s.epsilon), fmtNum(s.delta), e(s.model_version || "–")])),
  };
}

async function modelPage(version) {
  const doc = await api(`/api/models/${encodeURIComponent(version)}`);
  return {topics: [], html: `<h1>Model card ${e(doc.version)}</h1><pre id="model-card">${e(doc.card_markdown)}</pre><h2>As JSON</h2><pre>${e(JSON.stringify(doc.card, null, 2))}</pre>`};
}

async function auditPage() {
  const doc = await api("/api/audit");
  const status = doc.verified ? `<p class="verified" id="audit-status">Hash chain verified: ${doc.checked} entries intact.</p>`
    : `<p class="error" id="audit-status">Hash chain broken: ${e(doc.problems.join("; "))}</p>`;
  return {
    topics: ["audit"],
    html: `<h1>Audit trail</h1>${status}` + table(["#", "time", "actor", "action", "subject", "detail"], doc.entries.map(a => [String(a.seq), when(a.at), e(a.actor), e(a.action), e(a.subject), `<code>${e(JSON.stringify(a.detail)).slice(0, 400)}</code>`])),
  };
}

async function apiPage() {
  const spec = await api("/api/openapi.json");
  const rows = [];
  for (const [path, ops] of Object.entries(spec.paths)) for (const [method, op] of Object.entries(ops)) {
    rows.push([`<code>${e(method.toUpperCase())}</code>`, `<code>${e(path)}</code>`, e(op.summary || ""), e((op.description || "").split("\n")[0])]);
  }
  return {topics: [], html: `<h1>HTTP API</h1><p>The pages use exactly this API; the schema is at <a href="/api/openapi.json">/api/openapi.json</a>. Reads take the operator token as a Bearer header or this browser's session cookie (unless the coordinator opens them); actions need the Bearer header.</p>` + table(["method", "path", "summary", "description"], rows)};
}

// ----- routing, login, live updates -----

function parseRoute() {
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "fleet").split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return {page: parts[0], arg: parts.slice(1).join("/"), params: Object.fromEntries(new URLSearchParams(query || ""))};
}

const PAGES = {
  fleet: r => fleetPage(r.params), device: r => devicePage(r.arg), rollouts: rolloutsPage, rollout: r => rolloutPage(r.arg),
  drift: r => driftPage(r.params), training: r => (r.arg ? trainingRunPage(r.arg) : trainingPage()), privacy: privacyPage,
  model: r => modelPage(r.arg), audit: auditPage, api: apiPage, alerts: alertsPage,
};

async function render() {
  const route = parseRoute();
  const page = PAGES[route.page];
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.page === route.page || (a.dataset.page + "s") === route.page || (route.page === "device" && a.dataset.page === "fleet")));
  if (!page) { main.innerHTML = `<h1>Not found</h1><p>No page ${e(route.page)}.</p>`; return; }
  try {
    const view = await page(route);
    main.innerHTML = view.html;
    if (view.after) view.after();
    state.topics = view.topics;
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
  } catch (err) {
    if (err.status === 401) return showLogin();
    main.innerHTML = `<h1>${err.status === 404 ? "Not found" : "Could not load this page"}</h1><p class="error">${e(err.message)}</p>`;
    state.topics = [];
  }
}

function showLogin() {
  main.innerHTML = `<form class="login" id="login"><h1>Operator token</h1>
    <p class="muted">This coordinator asks for its operator token; <code>fedfleet dashboard-token</code> prints it.</p>
    <input type="password" name="token" autocomplete="current-password" placeholder="token"><button>Open</button>
    <p class="error" id="login-error"></p></form>`;
  document.getElementById("login").addEventListener("submit", async ev => {
    ev.preventDefault();
    const t = new FormData(ev.target).get("token");
    try {
      await api("/api/session", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({token: t})});
      sessionStorage.setItem("fedfleet-token", t);
      connect();
      render();
    } catch (err) {
      document.getElementById("login-error").textContent = err.message;
    }
  });
}

let source = null;
function connect() {
  if (source) source.close();
  source = new EventSource("/api/stream");
  source.addEventListener("hello", () => { live.textContent = "live"; live.className = "live on"; });
  source.addEventListener("change", ev => {
    const msg = JSON.parse(ev.data);
    live.textContent = `live · ${clock(msg.at)}`;
    if (msg.changed.some(t => state.topics.includes(t)) && !state.pending) {
      state.pending = setTimeout(() => { state.pending = null; render(); }, 150);
    }
  });
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
}

// Under `serve --allow-plaintext-network` the coordinator exposes plaintext beyond loopback: say so on every page.
function showExposures(exposures) {
  const banner = document.getElementById("insecure-banner");
  if (!exposures.length) return;
  banner.innerHTML = `<strong>Plaintext beyond loopback (serve --allow-plaintext-network):</strong>` +
    exposures.map(x => `<div>${e(x)}</div>`).join("");
  banner.hidden = false;
}

window.addEventListener("hashchange", render);
(async () => {
  const session = await api("/api/session");
  showExposures(session.plaintext_exposures || []);
  if (!session.public_read && !session.authenticated) return showLogin();
  connect();
  render();
})();

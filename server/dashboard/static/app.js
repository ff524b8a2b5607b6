// The fedfleet dashboard: hash routes, each page drawn from the documented HTTP API (/api/openapi.json), and
// redrawn when the server-sent change feed says a part of the state it shows has moved. No page reloads.
"use strict";

const main = document.getElementById("main");
const live = document.getElementById("live");
const state = {route: null, topics: [], pending: null, renders: 0, session: {}};
const e = escapeHtml;

// What the signed-in user may do: the permission names /api/session lists. A coordinator that lists none (an older
// one) leaves every button as it was, and the server still refuses what the user may not do.
function can(permission) {
  const granted = state.session.permissions;
  return !Array.isArray(granted) || granted.includes(permission);
}
// Enum values in words, from the words the views send (falling back to the value with its underscores spaced).
function words(value, table) { return (table && table[value]) || String(value).replace(/_/g, " "); }
function wordCounts(obj, table) { return Object.entries(obj).map(([k, n]) => `${words(k, table)} ${n}`).join(", "); }

function token() { return sessionStorage.getItem("fedfleet-token") || ""; }
// A read that needs more than the read permission (the ledger export, the users) is checked like an action: the
// token as a Bearer header, never the cookie alone. Refused (no token kept in this tab, or a 401/403), it says why.
async function privilegedRead(path) {
  const t = token();
  if (!t) return {refused: "sign in again in this tab: this list needs your token as a Bearer header"};
  try {
    return {doc: await api(path, {headers: {"Authorization": `Bearer ${t}`}})};
  } catch (err) {
    if (err.status === 401 || err.status === 403) return {refused: err.message};
    throw err;
  }
}

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

function when(ms) { return ms ? new Date(ms).toLocaleString() : "–"; }
function clock(ms) { return new Date(ms).toLocaleTimeString(); }
function badge(text, label) { return `<span class="badge ${e(text)}">${e(label === undefined ? String(text).replace(/_/g, " ") : label)}</span>`; }
function link(route, text) { return `<a href="#/${route}">${e(text)}</a>`; }
function table(cols, rows, rowClass) {
  if (!rows.length) return `<p class="muted">None yet.</p>`;
  return `<table><thead><tr>${cols.map(c => `<th>${e(c)}</th>`).join("")}</tr></thead><tbody>` +
    rows.map((r, i) => `<tr class="${rowClass ? rowClass(i) : ""}">${r.map(c => `<td>${c}</td>`).join("")}</tr>`).join("") +
    `</tbody></table>`;
}
function counts(obj, table) { return Object.entries(obj).map(([k, v]) => `<li>${e(words(k, table))}: <b class="count">${v}</b></li>`).join(""); }

// ----- pages: each returns {html, after?, topics} -----

async function fleetPage(params) {
  const q = new URLSearchParams(params);
  const doc = await api(`/api/fleet?${q}`);
  const opts = (values, chosen, any, table) => ["", ...values].map(v => `<option value="${e(v)}" ${v === chosen ? "selected" : ""}>${e(v ? words(v, table) : any)}</option>`).join("");
  const labels = Object.entries(doc.by_label).flatMap(([k, vs]) => Object.keys(vs).map(v => `${k}=${v}`));
  const rows = doc.devices.map(d => [
    link(`device/${encodeURIComponent(d.id)}`, d.id), e(d.fleet), e(Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ")),
    badge(d.online ? "online" : "offline"), e(d.running_release || "–"), e(words(d.update_state, doc.state_words)), e((d.last_event || "").replace(/_/g, " ")),
    d.last_error ? `<span class="error">${e(d.last_error)}</span>` : "", when(d.last_seen)]);
  return {
    topics: ["devices", "events"],
    html: `<h1>Fleet</h1>
      <div class="cards">
        <div class="card">devices<b id="fleet-total">${doc.total}</b></div>
        <div class="card">online<b id="fleet-online">${doc.online}</b></div>
        <div class="card">by release<ul>${counts(doc.by_release)}</ul></div>
        <div class="card">by update state<ul>${counts(doc.by_state, doc.state_words)}</ul></div>
        ${Object.entries(doc.by_label).map(([k, vs]) => `<div class="card">cohort ${e(k)}<ul>${counts(vs)}</ul></div>`).join("")}
      </div>
      <form class="filters" id="filters">
        <input name="q" placeholder="search device id" value="${e(params.q || "")}">
        <select name="release" title="running release">${opts(Object.keys(doc.by_release), params.release || "", "any release")}</select>
        <select name="state" title="update state">${opts(Object.keys(doc.by_state), params.state || "", "any state", doc.state_words)}</select>
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
        <div class="card">update state<b id="device-state">${e(words(d.update_state, doc.state_words))}</b></div>
        <div class="card">agent<b>${e(d.agent_version || "–")}</b></div>
      </div>
      <p>Labels: ${e(Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "none")} ·
         last seen ${when(d.last_seen)} · rollouts: ${doc.rollouts.map(r => link(`rollout/${r}`, r)).join(", ") || "none"}</p>
      <p>Last error: ${d.last_error ? `<span class="error" id="last-error">${e(d.last_error)}</span>` : "none"}</p>
      <h2>Updates: assignments and events</h2>
      <div id="timeline">${table(["time", "kind", "what"], timeline.map(t => [when(t.at), badge(t.kind), e(t.text)]), i => timeline[i].bad ? "fail" : "")}</div>
      <h2>Drift on this device</h2>
      <p class="muted">Consecutive windows pooled to at least 500 inferences each (one window's PSI over a few dozen
        inferences is mostly sampling noise), scored against the reference of the release they ran; the line is the
        policy's ${e(doc.drift_threshold.metric)} threshold (${e(doc.drift_threshold.source)}). Drag to zoom, double-click to reset.</p>
      <div class="charts" id="device-charts"></div>
      <h2>Telemetry windows</h2>
      <div id="windows">${table(["ended", "sequence", "release", "inferences", "errors", "max input PSI", "score PSI", "via"],
        windows.slice(0, 20).map(t => [when(t.end_ms), t.first_sequence === t.sequence ? String(t.sequence) : `${t.first_sequence}..${t.sequence}`, e(t.release_id), String(t.inferences), String(t.errors), fmtNum(t.max_psi), fmtNum(t.score_psi), e(t.via)]))}
        ${windows.length > 20 ? `<p class="muted">newest 20 of the last ${windows.length} shown; a window's PSI over few inferences is noisy, the Drift page pools them.</p>` : ""}</div>`,
    after() {
      const box = document.getElementById("device-charts");
      if (!doc.drift.length) { box.innerHTML = `<p class="muted">Not enough telemetry pooled yet.</p>`; return; }
      const points = key => doc.drift.map(p => [p.at, p[key]]);
      const t = doc.drift_threshold;
      box.appendChild(lineChart("pooled windows: PSI against the release's reference", [
        {name: "largest input PSI", points: points("max_psi")}, {name: "prediction-score PSI", points: points("score_psi")}],
        {group: "device", range: [doc.drift[0].start_ms, Math.max(Date.now(), doc.drift[doc.drift.length - 1].at)], width: 760, height: 240,
         thresholds: [{name: `${t.metric} threshold ${fmtNum(t.value)}`, value: t.value}], name: "device-psi"}));
    },
  };
}

async function rolloutsPage() {
  const rows = await api("/api/rollouts");
  return {
    topics: ["rollouts"],
    html: `<h1>Rollouts</h1>` + table(["rollout", "release", "phase", "wave", "started", "updated"], rows.map(r => [
      link(`rollout/${r.id}`, r.id), link(`release/${encodeURIComponent(r.release)}`, r.release), badge(r.phase),
      e(r.finished ? `${r.wave_label} (finished)` : r.wave_label), when(r.created_at), when(r.updated_at)])),
  };
}

async function rolloutPage(id) {
  const doc = await api(`/api/rollouts/${encodeURIComponent(id)}`);
  const sw = doc.state_words;
  const waves = doc.waves.map(w => {
    const p = w.progress, pct = p.total ? 100 * p.done / p.total : 0;
    const verb = p.direction === "back" ? "back on the previous release" : "running it";
    const current = w.wave === doc.wave && !doc.finished ? " ◀ current" : "";
    return [e(w.label) + current,
      `<div class="bar" title="${p.done} of ${p.total} ${verb}"><span class="${p.direction === "back" ? "seg-rolled_back" : "seg-running"}" style="width:${pct}%"></span></div>
       <span class="muted progress-text">${p.done} of ${p.total} ${e(verb)}</span>`,
      `<span class="wave-states" data-wave="${w.wave}">${e(wordCounts(w.devices, sw)) || "none"}</span>`];
  });
  const gates = doc.gates.map(g => [e(g.metric), fmtNum(g.value), `${e(g.op)} ${fmtNum(g.threshold)}`, badge(g.verdict), e(g.note || "")]);
  const metrics = [...new Set([...Object.keys(doc.thresholds), ...doc.gate_history.flatMap(s => s.gates.map(g => g.metric))])]
    .filter(m => doc.gate_history.some(s => s.gates.some(g => g.metric === m)));
  const fired = new Set(doc.decisions.filter(d => d.decision === "rollback").flatMap(d => d.gates.filter(g => g.verdict === "fail").map(g => g.metric)));
  const decisions = doc.decisions.slice().reverse().map(d => {
    const failed = d.gates.filter(g => g.verdict === "fail").map(g => `${g.metric} = ${fmtNum(g.value)} (${g.op} ${fmtNum(g.threshold)})${g.cohort ? " in " + g.cohort : ""}`);
    return [when(d.at), e(d.wave_label), badge(d.decision), e(d.reason) + (failed.length ? `<div class="error fired-gate">gate fired: ${e(failed.join("; "))}</div>` : "")];
  });
  const labels = {pause: "Pause", resume: "Resume", abort: "Abort", rollback: "Roll back"};
  const mayAct = can("rollouts.act");
  const actions = doc.finished
    ? `<p class="muted" id="actions-note">This rollout has ${e(doc.phase.replace(/_/g, " "))}: nothing more can be done to it.</p>`
    : `<div class="actions">${Object.entries(labels).map(([a, label]) => {
        const why = !mayAct ? `your role (${state.session.role || "?"}) lacks the rollouts.act permission` : doc.actions[a];
        return `<button data-action="${a}" ${why ? `disabled title="${e(why)}"` : ""}>${label}</button>`;
      }).join("")}</div>${mayAct ? "" : `<p class="muted" id="actions-note">Signed in as ${e(state.session.user || "a reader")}: actions need the rollouts.act permission.</p>`}`;
  const markerColour = d => ["rollback", "rolled_back", "abort"].includes(d.decision) ? "#c0392b" : ["start", "advance"].includes(d.decision) ? "#2d5bd7" : undefined;
  const markers = doc.decisions.filter(d => d.wave >= 0 && !["hold", "waiting", "created"].includes(d.decision))
    .map(d => ({at: d.at, label: d.decision === "start" || d.decision === "advance" ? d.wave_label : d.decision.replace(/_/g, " "), color: markerColour(d)}));
  const times = [...doc.decisions.map(d => d.at), ...doc.gate_history.map(s => s.at)];
  const range = times.length ? [Math.min(...times), doc.finished ? Math.max(...times) : Math.max(Date.now(), ...times)] : null;
  const gatesTitle = doc.gates_final ? `Gates at the end <span class="muted">(the last values kept, ${clock(doc.gates_at)})</span>`
    : `Gates now${doc.gates_at ? ` <span class="muted">(as of ${clock(doc.gates_at)})</span>` : ""}`;
  return {
    topics: ["rollouts", "devices", "events"],
    html: `<h1>Rollout ${e(doc.id)} <span id="phase">${badge(doc.phase)}</span></h1>
      <p>Release ${link(`release/${encodeURIComponent(doc.release)}`, doc.release)} · <b id="wave">${e(doc.wave_label)}</b>
        (canary, then ${doc.waves.length - 1} wave${doc.waves.length === 2 ? "" : "s"})
        ${doc.bake_remaining_s !== null ? ` · baking, ${Math.round(doc.bake_remaining_s)} s left` : ""}</p>
      ${actions}
      <p id="action-result" class="muted"></p>
      <h2>Waves</h2>${table(["wave", "progress", "devices"], waves)}
      <h2>${gatesTitle}</h2><div id="gates-now">${table(["metric", "value", "threshold", "verdict", "note"], gates, i => doc.gates[i].verdict === "fail" ? "fail" : "")}</div>
      <h2>Gates over time</h2>
      <p class="muted">Each gate's value while its wave baked, against the rollout's own threshold; blue lines mark the
        waves, red ones a rollback or abort; a gate that fired is outlined in red. Drag across a chart to zoom every chart
        to that time, double-click to go back.</p>
      <div class="charts" id="gate-charts"></div>
      <h2>Decisions</h2><div id="decisions">${table(["time", "wave", "decision", "reason"], decisions)}</div>`,
    after() {
      const charts = document.getElementById("gate-charts");
      if (!metrics.length) charts.innerHTML = `<p class="muted">No gate values recorded yet (they are kept while a wave bakes).</p>`;
      for (const m of metrics) {
        const points = [];
        for (const s of doc.gate_history) for (const g of s.gates) if (g.metric === m && !g.cohort) points.push([s.at, g.value]);
        const t = doc.thresholds[m];
        charts.appendChild(lineChart(m, [{name: m, points}], {
          group: "gates", range, width: 430, height: 190, fired: fired.has(m), markers,
          thresholds: t ? [{name: `gate ${t.op} ${fmtNum(t.threshold)}`, value: t.threshold}] : []}));
      }
      document.querySelectorAll("[data-action]").forEach(b => b.addEventListener("click", () => act(doc.id, b.dataset.action)));
    },
  };
}

function operatorToken() {
  let t = token();
  if (!t) {
    t = prompt("Your token (`fedfleet users add` gave it; the operator's: `fedfleet dashboard-token`):") || "";
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
    a.state === "open" ? `<button data-ack="${a.id}" ${can("alerts.ack") ? "" : "disabled title=\"needs the alerts.ack permission\""}>Acknowledge</button>` : e(a.acknowledged_by || "")]);
  const alarmRows = loop.alarms.map(a => [String(a.id), when(a.opened_at), e(a.fleet), e(a.release_id),
    `${e(a.metric)} ${fmtNum(a.value)} &gt; ${fmtNum(a.threshold)}`, fmtNum(a.peak), badge(a.state), e(a.resolution)]);
  const jobRows = loop.jobs.map(j => [String(j.id), String(j.alarm_id), e(j.fleet), badge(j.state), e(j.cause),
    e(j.model_version || "–"), j.rollout_id ? link(`rollout/${j.rollout_id}`, j.rollout_id) : "–",
    j.state === "proposed" ? ["approve", "reject"].map(a => `<button data-answer="${a}" data-job="${j.id}" ${can("loop.answer") ? "" : "disabled title=\"needs the loop.answer permission\""}>${a === "approve" ? "Approve" : "Reject"}</button>`).join(" ") : e(j.error || j.decided_by || "")]);
  return {
    topics: ["audit", "rollouts"],
    html: `<h1>Alerts and the loop</h1><p class="muted">Drift alarms, the retrainings they lead to, and every alert the coordinator raised (<code>fedfleet alerts list</code>, <code>fedfleet loop status</code>).</p>
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

// POST (or PUT) an action (the user's token as a Bearer header), redraw, then say what came of it (after the
// redraw, which replaces the page and the line that says it).
async function operate(path, what, body, said, method) {
  const t = operatorToken();
  if (!t) return;
  let message, failed = false;
  try {
    const r = await api(path, {
      method: method || "POST", headers: {"Content-Type": "application/json", "Authorization": `Bearer ${t}`},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    message = said ? said(r) : `${what}: now ${r.state}`;
    await render();
  } catch (err) {
    if (err.status === 401) sessionStorage.removeItem("fedfleet-token");
    message = `${what} refused: ${err.message}`;
    failed = true;
  }
  state.lastAction = {message, failed, hash: location.hash, until: Date.now() + ACTION_RESULT_MS};
  showActionResult();
}

// What the last action came to stays on its page for a while: a live update redraws the page (and the line).
const ACTION_RESULT_MS = 30000;
function showActionResult() {
  const last = state.lastAction, out = document.getElementById("action-result");
  if (!last || !out || last.hash !== location.hash || Date.now() > last.until) return;
  out.textContent = last.message;
  out.className = last.failed ? "error" : "";
}

async function driftPage(params) {
  const cohortBy = params.cohort_by || "fleet", minutes = params.minutes || "30";
  const [doc, fleet] = await Promise.all([
    api(`/api/drift?cohort_by=${encodeURIComponent(cohortBy)}&minutes=${encodeURIComponent(minutes)}`), api("/api/fleet?limit=1")]);
  const keys = ["fleet", ...Object.keys(fleet.by_label)];
  const t = doc.threshold;
  const partial = doc.series.some(s => s.points.some(p => p.partial));
  return {
    topics: ["telemetry"],
    html: `<h1>Drift</h1>
      <form class="filters" id="drift-form">cohorts by <select name="cohort_by">${keys.map(k => `<option ${k === cohortBy ? "selected" : ""}>${e(k)}</option>`).join("")}</select>
        over the last <select name="minutes">${["5", "30", "120", "1440"].map(m => `<option ${m === minutes ? "selected" : ""}>${m}</option>`).join("")}</select> minutes
        <button>Show</button></form>
      <p class="muted">Each time bucket pools its windows and scores them against the reference of the release they ran
        (${Math.round(doc.bucket_ms / 1000)} s buckets)${doc.truncated ? "; only the newest windows are shown" : ""}.
        ${partial ? "The newest bucket is still filling: it is left out of the lines and the heatmaps. " : ""}The red line is the
        policy's ${e(t.metric)} threshold, ${fmtNum(t.value)} (${e(t.source)}). Every chart shares one time axis: drag to zoom
        them all, double-click to go back.</p>
      <div id="drift-series">${doc.series.length ? "" : `<p class="muted">No scored telemetry in this period.</p>`}</div>`,
    after() {
      document.getElementById("drift-form").addEventListener("submit", ev => {
        ev.preventDefault();
        location.hash = `#/drift?${new URLSearchParams(new FormData(ev.target))}`;
      });
      const box = document.getElementById("drift-series");
      const range = [doc.since, doc.until];
      for (const s of doc.series) {
        const points = s.points.filter(p => !p.partial);
        const h = document.createElement("div");
        h.innerHTML = `<h2>${e(cohortBy)} = ${e(s.cohort)} · release ${e(s.release)}</h2>`;
        const charts = Object.assign(document.createElement("div"), {className: "charts"});
        const n = doc.features[s.release] || 0;
        const rows = Array.from({length: n}, (_, i) => `f${i}`);
        charts.appendChild(heatmap("PSI per input feature", rows, points.map(p => ({at: p.at, values: p.feature_psi})),
          {group: "drift", range, cellMs: doc.bucket_ms, max: 2 * t.value, threshold: t.value, width: 640, height: 240, name: `heatmap ${s.cohort} ${s.release}`}));
        charts.appendChild(lineChart("largest input PSI and prediction-score PSI", [
          {name: "largest input PSI", points: points.map(p => [p.at, p.max_psi])},
          {name: "prediction-score PSI", points: points.map(p => [p.at, p.score_psi])}],
          {group: "drift", range, width: 640, height: 240, thresholds: [{name: `${t.metric} threshold ${fmtNum(t.value)}`, value: t.value}], name: `psi ${s.cohort} ${s.release}`}));
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
      <h2>Plan</h2><div id="plan">${planTable(run.plan)}</div>`,
    after() {
      const box = document.getElementById("run-charts");
      const rounds = {group: "rounds", time: false};
      box.appendChild(lineChart("test accuracy per round", [{name: "accuracy", points: series("test_accuracy")}], rounds));
      box.appendChild(lineChart("loss per round", [{name: "train", points: series("train_loss")}, {name: "test", points: series("test_loss")}], rounds));
      box.appendChild(lineChart("ε per round (largest client)", [{name: "ε", points: series("epsilon_max")}], rounds));
    },
  };
}

// A plan (nested settings) as a two-column table: dotted setting names, values as text.
function planTable(plan) {
  const rows = [];
  const walk = (obj, prefix) => {
    for (const [k, v] of Object.entries(obj || {})) {
      const name = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === "object" && !Array.isArray(v)) walk(v, name);
      else rows.push([`<code>${e(name)}</code>`, e(Array.isArray(v) ? v.join(", ") : v === null ? "–" : String(v))]);
    }
  };
  walk(plan, "");
  return `<div class="narrow">${table(["setting", "value"], rows)}</div>`;
}

async function privacyPage() {
  const manage = can("privacy.manage");
  // The full ledger (every row, with units and accountants) is an export for whoever may manage privacy.
  const [doc, ledger] = await Promise.all([api("/api/privacy"), manage ? privilegedRead("/api/privacy/ledger") : Promise.resolve(null)]);
  const budgetForm = manage ? `<form class="filters spaced" id="budget-form">
      <input name="device" list="budget-devices" required placeholder="device id" title="device" size="24">
      <datalist id="budget-devices">${doc.devices.map(d => `<option value="${e(d.device)}">`).join("")}</datalist>
      <input name="epsilon" type="number" min="0" step="any" required placeholder="lifetime ε budget" title="lifetime ε budget">
      <button>Set budget</button></form>` : "";
  const ledgerTable = ledger === null
    ? `<p class="muted">Every ledger row (unit, accountant, consent) is an export that needs the privacy.manage permission.</p>`
    : ledger.refused ? `<p class="error">${e(ledger.refused)}</p>`
    : table(["device", "run", "purpose", "unit", "accountant", "rounds", "ε", "δ", "lifetime ε", "budget", "consented"], ledger.doc.map(r => [
      e(r.device), link(`training/${r.run}`, r.run), e(r.purpose), e(r.unit), e(r.accountant), String(r.rounds), fmtNum(r.epsilon),
      fmtNum(r.delta), fmtNum(r.lifetime_epsilon), fmtNum(r.budget), r.consented === null ? "–" : r.consented ? "yes" : "no"]));
  return {
    topics: ["training", "audit"],
    html: `<h1>Privacy ledger</h1><p class="muted">Lifetime ε is the sum over training runs of each run's ε (basic composition). Default budget ${fmtNum(doc.default_budget)}.</p>
      <p id="action-result" class="muted"></p><h2>Per device</h2>` +
      table(["device", "lifetime ε", "budget", "used", "runs"], doc.devices.map(d => [link(`device/${d.device}`, d.device), fmtNum(d.lifetime_epsilon), fmtNum(d.budget),
        `<div class="bar" style="width:160px"><span class="${d.lifetime_epsilon > d.budget ? "seg-rolled_back" : "seg-running"}" style="width:${Math.min(100, 100 * d.lifetime_epsilon / Math.max(d.budget, 1e-9))}%"></span></div>`, String(d.runs)])) +
      budgetForm +
      `<h2>Spend per run</h2>` + table(["device", "run", "purpose", "rounds", "ε", "δ", "model"], doc.spend.map(s => [e(s.device), link(`training/${s.run}`, s.run), e(s.purpose || "training"), String(s.rounds), fmtNum(s.epsilon), fmtNum(s.delta), e(s.model_version || "–")])) +
      `<h2>Ledger</h2><div id="ledger">${ledgerTable}</div>` + monitoringTable(doc.monitoring || []),
    after() {
      const form = document.getElementById("budget-form");
      if (!form) return;
      form.addEventListener("submit", ev => {
        ev.preventDefault();
        const f = new FormData(form), device = f.get("device"), epsilon = Number(f.get("epsilon"));
        if (!confirm(`set the lifetime ε budget of ${device} to ${epsilon}?`)) return;
        operate(`/api/privacy/budgets/${encodeURIComponent(device)}`, `budget of ${device}`, {epsilon},
          r => `budget of ${r.device}: now ${fmtNum(r.budget)} (spent ${fmtNum(r.spent)})`, "PUT");
      });
    },
  };
}

// Noised telemetry windows' ε per device (the monitoring ledger, apart from training's), when any device sent one.
function monitoringTable(rows) {
  if (!rows.length) return "";
  const spent = m => fmtNum(m.epsilon) + (Math.abs(m.epsilon - m.device_spent) > 1e-9 * Math.max(1, m.device_spent) ? ` (device: ${fmtNum(m.device_spent)})` : "");
  return `<h2>Monitoring budget (noised telemetry)</h2><p class="muted">ε each device spent on noised telemetry windows, as the coordinator stored them, against the budget its agent.toml sets; an exhausted device sends no more windows, on purpose. <code>fedfleet privacy monitoring</code> has the full record.</p>` +
    `<div id="monitoring">${table(["device", "windows", "ε spent / budget", "exhausted"], rows.map(m => [link(`device/${encodeURIComponent(m.device)}`, m.device),
      String(m.windows), `${spent(m)} / ${fmtNum(m.budget)}`, m.exhausted ? badge("exhausted", "yes") : "no"]))}</div>`;
}

async function modelsPage() {
  const models = await api("/api/models");
  return {
    topics: ["training"],
    html: `<h1>Models</h1><p class="muted">Model versions the federated runs produced, newest first; each has a model card
      generated from its lineage. A version becomes a release with <code>fedfleet release NAME@SEQ</code>.</p>` +
      table(["version", "run", "parent", "test accuracy", "ε", "created"], models.map(m => [link(`model/${m.version}`, m.version),
        link(`training/${m.run_id}`, m.run_id), e(m.parent || "–"), fmtNum(m.accuracy), fmtNum(m.epsilon), when(m.created_at)])),
  };
}

// The card's HTML comes from the server: Markdown rendered with raw HTML off, so tags in a card are text.
async function modelPage(version) {
  const doc = await api(`/api/models/${encodeURIComponent(version)}`);
  return {topics: [], html: `<p>${link("models", "← Models")}</p><article class="model-card" id="model-card">${doc.card_html}</article>
    <details><summary>The card as JSON</summary><pre>${e(JSON.stringify(doc.card, null, 2))}</pre></details>`};
}

async function releasesPage() {
  const rows = await api("/api/releases");
  return {
    topics: ["rollouts", "devices"],
    html: `<h1>Releases</h1><p class="muted">Signed releases, newest first: trained (a model version released with
      <code>fedfleet release NAME@SEQ</code>) or from a file, the devices running each now, and its rollouts.</p>
      <div id="releases">` + table(["release", "version", "source", "created", "devices running it", "rollouts", "size"], rows.map(r => [
        link(`release/${encodeURIComponent(r.id)}`, r.id), e(r.version),
        r.source.kind === "trained" ? `trained: ${link(`model/${r.source.model_version}`, r.source.model_version)}` : "file",
        when(r.created_at), `<span class="devices-running">${r.devices_running}</span>`,
        r.rollouts.map(o => `${link(`rollout/${o.id}`, o.id)} ${badge(o.phase)}`).join("<br>") || "–",
        `${(r.bytes / 1024).toFixed(1)} KiB`])) + `</div>`,
  };
}

async function releasePage(id) {
  const r = await api(`/api/releases/${encodeURIComponent(id)}`);
  return {
    topics: ["rollouts", "devices"],
    html: `<p>${link("releases", "← Releases")}</p><h1>Release ${e(r.id)}</h1>
      <div class="cards">
        <div class="card">source<b>${r.source.kind === "trained" ? link(`model/${r.source.model_version}`, r.source.model_version) : "file"}</b></div>
        <div class="card">created<b>${when(r.created_at)}</b></div>
        <div class="card">devices running it<b id="release-devices">${r.devices_running}</b></div>
        <div class="card">size<b>${(r.bytes / 1024).toFixed(1)} KiB</b></div>
      </div>
      <p class="muted">Target <code>${e(r.target_path)}</code> · sha256 <code>${e(r.sha256)}</code></p>
      <p>Rollouts: ${r.rollouts.map(o => `${link(`rollout/${o.id}`, o.id)} ${badge(o.phase)}`).join(", ") || "none"}</p>
      ${can("assign") ? `<h2>Assign</h2><p class="muted">Signed assignments of this release, straight to devices (no waves, no
        gates: <code>fedfleet assign</code>); a rollout is the careful way.</p>
        <form class="filters" id="assign-form">
          <input name="devices" placeholder="device ids, comma-separated" size="40">
          <span class="muted">or</span> <input name="fleet" placeholder="every device of a fleet">
          <button>Assign</button></form><p id="action-result" class="muted"></p>` : ""}
      <h2>Model card</h2><article class="model-card" id="model-card">${r.card_html}</article>`,
    after() {
      const form = document.getElementById("assign-form");
      if (!form) return;
      form.addEventListener("submit", ev => {
        ev.preventDefault();
        const f = new FormData(form), fleet = String(f.get("fleet") || "").trim();
        const devices = String(f.get("devices") || "").split(",").map(d => d.trim()).filter(Boolean);
        const to = fleet ? `every device of fleet ${fleet}` : `${devices.length} device(s)`;
        if (!confirm(`assign ${r.id} to ${to}? The devices install it without waves or gates.`)) return;
        operate("/api/assignments", `assign ${r.id}`, fleet ? {release: r.id, fleet} : {release: r.id, devices},
          a => `assigned ${a.release} to ${a.assignments.length} device(s)`);
      });
    },
  };
}

// One detail value in words: gate verdicts as "metric value op threshold verdict", objects as "k=v", lists joined.
function detailValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return fmtNum(v);
  if (typeof v !== "object") return String(v);
  if (Array.isArray(v)) {
    if (!v.length) return "none";
    return v.map(x => x && typeof x === "object" && "metric" in x
      ? [x.metric + (x.cohort ? ` (${x.cohort})` : ""), "value" in x ? fmtNum(x.value) : "", x.op || "", fmtNum(x.threshold), x.verdict || ""]
        .filter(Boolean).join(" ")
      : detailValue(x)).join(", ");
  }
  return Object.entries(v).filter(([, x]) => x !== "" && x !== null && !(Array.isArray(x) && !x.length))
    .map(([k, x]) => `${k}=${detailValue(x)}`).join(", ");
}
// A detail object as short "key: value" text, cut (before escaping, so never inside an entity) at `max` characters.
function detailText(detail, max) {
  const text = Object.entries(detail || {}).map(([k, v]) => `${k}: ${detailValue(v)}`).join(" · ");
  return text.length > max ? text.slice(0, max) + "…" : text;
}

async function auditPage(params) {
  const [doc, chain] = await Promise.all([
    api(`/api/audit?limit=1000${params.action ? "&action=" + encodeURIComponent(params.action) : ""}`), api("/api/audit/verify")]);
  const from = params.from ? new Date(params.from).getTime() : null, to = params.to ? new Date(params.to).getTime() : null;
  const shown = doc.entries.filter(a => (!params.actor || a.actor === params.actor) && (from === null || a.at >= from) && (to === null || a.at <= to));
  // The whole chain, walked by /api/audit/verify (as `fedfleet audit verify` does).
  const problem = p => typeof p === "string" ? p : Object.entries(p).map(([k, v]) => `${k} ${v}`).join(" ");
  const status = chain.intact ? `<p class="verified" id="audit-status">Hash chain verified: ${chain.entries} entries intact.</p>`
    : `<p class="error" id="audit-status">Hash chain broken: ${e(chain.problems.map(problem).join("; "))}</p>`;
  const opts = (values, chosen, any) => ["", ...values].map(v => `<option value="${e(v)}" ${v === chosen ? "selected" : ""}>${e(v || any)}</option>`).join("");
  return {
    topics: ["audit"],
    html: `<h1>Audit trail</h1>${status}
      <form class="filters" id="audit-filters">
        <select name="actor" title="actor">${opts(doc.actors, params.actor || "", "any actor")}</select>
        <select name="action" title="action">${opts(params.action && !doc.actions.includes(params.action) ? [...doc.actions, params.action] : doc.actions, params.action || "", "any action")}</select>
        <label>from <input type="datetime-local" name="from" value="${e(params.from || "")}"></label>
        <label>to <input type="datetime-local" name="to" value="${e(params.to || "")}"></label>
        <button>Filter</button>
      </form>
      <p class="muted" id="audit-count">${shown.length} of the newest ${doc.entries.length} entries shown
        (<a href="/api/audit/entries?limit=5000">the newest 5000 as JSON</a>, as <code>fedfleet audit list</code> gives them).</p>
      <div id="audit-table" class="fixed">` + table(["#", "time", "actor", "action", "subject", "detail"], shown.map(a => [String(a.seq), when(a.at), e(a.actor), e(a.action), e(a.subject),
        `<span class="detail" title="${e(detailText(a.detail, 4000))}">${e(detailText(a.detail, 300))}</span>`])) + `</div>`,
    after() {
      document.getElementById("audit-filters").addEventListener("submit", ev => {
        ev.preventDefault();
        const f = new URLSearchParams();
        for (const [k, v] of new FormData(ev.target)) if (v) f.set(k, v);
        location.hash = `#/audit${f.toString() ? "?" + f : ""}`;
      });
    },
  };
}

// Users (users.manage): who may sign in with which role; a new or rotated token is shown once, on this page only.
const ROLES = ["viewer", "operator", "release-manager", "privacy-officer", "admin"];
async function usersPage() {
  if (!can("users.manage")) {
    return {topics: [], html: `<h1>Users</h1><p class="muted">Managing users needs the users.manage permission (the admin role); you are signed in as ${e(state.session.user || "a reader")}${state.session.role ? ` (${e(state.session.role)})` : ""}.</p>`};
  }
  const listed = await privilegedRead("/api/users");
  if (listed.refused) return {topics: [], html: `<h1>Users</h1><p class="error">${e(listed.refused)}</p>`};
  const users = listed.doc;
  const rows = users.map(u => [e(u.name), e(u.role), u.active ? badge("active") : badge("revoked"), when(u.created_at), when(u.rotated_at), when(u.revoked_at),
    u.active ? `<button data-user-op="rotate" data-user="${e(u.name)}">Rotate token</button> <button data-user-op="revoke" data-user="${e(u.name)}" ${u.name === state.session.user ? "disabled title=\"you are signed in as this user\"" : ""}>Revoke</button>` : ""]);
  return {
    topics: [], // not redrawn by live updates: that would wipe a token shown once (an action here redraws it)
    html: `<h1>Users</h1><p class="muted">Each person signs in with their own token; the audit trail names them (<code>user:NAME</code>).
      Tokens are stored hashed: a new one is shown here once (as <code>fedfleet users add</code> shows it).</p>
      <form class="filters" id="user-form">
        <input name="name" placeholder="name (a-z, 0-9, . _ -)" required pattern="[a-z0-9][a-z0-9._\-]{0,63}">
        <select name="role" title="role">${ROLES.map(r => `<option value="${r}" ${r === "viewer" ? "selected" : ""}>${r}</option>`).join("")}</select>
        <button>Add user</button></form>
      <div id="new-token" class="new-token" hidden></div>
      <p id="action-result" class="muted"></p>
      <div id="users">${table(["user", "role", "state", "created", "token rotated", "revoked", ""], rows)}</div>`,
    after() {
      // The answer holds a token: show it in place (not in the redrawn page, which a live update would wipe) until
      // the next page change.
      const reveal = (who, r) => {
        const box = document.getElementById("new-token");
        if (!box) return;
        box.innerHTML = `Token for <b>${e(who)}</b> (${e(r.role)}), shown only now: <code>${e(r.token)}</code>`;
        box.hidden = false;
      };
      const run = async (path, what, body) => {
        let r = null;
        await operate(path, what, body, x => { r = x; return `${what}: done`; });
        if (r && r.token) reveal(r.name, r);
      };
      document.getElementById("user-form").addEventListener("submit", ev => {
        ev.preventDefault();
        const f = new FormData(ev.target), name = String(f.get("name")), role = String(f.get("role"));
        if (confirm(`add user ${name} with the ${role} role?`)) run("/api/users", `add ${name}`, {name, role});
      });
      document.querySelectorAll("[data-user-op]").forEach(b => b.addEventListener("click", () => {
        const op = b.dataset.userOp, name = b.dataset.user;
        const why = op === "revoke" ? "their token is refused from the next request on"
          : name === state.session.user ? "you are signed in with its token: sign in again with the new one" : "their old token is refused from now on";
        if (confirm(`${op} ${name}? ${why}.`)) run(`/api/users/${encodeURIComponent(name)}/${op}`, `${op} ${name}`);
      }));
    },
  };
}

async function apiPage() {
  const spec = await api("/api/openapi.json");
  const rows = [];
  for (const [path, ops] of Object.entries(spec.paths)) for (const [method, op] of Object.entries(ops)) {
    rows.push([`<code>${e(method.toUpperCase())}</code>`, `<code>${e(path)}</code>`, e(op.summary || ""), e((op.description || "").split("\n")[0])]);
  }
  return {topics: [], html: `<h1>HTTP API</h1><p>The pages use exactly this API, and so does the CLI with <code>--remote</code>; the schema is at <a href="/api/openapi.json">/api/openapi.json</a>. Reads take a user's token as a Bearer header or this browser's session cookie (unless the coordinator opens them); actions need the Bearer header and a role that grants them.</p>` + table(["method", "path", "summary", "description"], rows)};
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
  model: r => modelPage(r.arg), models: modelsPage, releases: releasesPage, release: r => releasePage(r.arg),
  audit: r => auditPage(r.params), api: apiPage, alerts: alertsPage, users: usersPage,
};

async function render() {
  const route = parseRoute();
  const page = PAGES[route.page];
  const section = {device: "fleet", rollout: "rollouts", release: "releases", model: "models"}[route.page] || route.page;
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.page === section));
  if (!page) { main.innerHTML = `<h1>Not found</h1><p>No page ${e(route.page)}.</p>`; return; }
  try {
    const view = await page(route);
    resetCharts();
    main.innerHTML = view.html;
    if (view.after) view.after();
    showActionResult();
    state.topics = view.topics;
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
  } catch (err) {
    if (err.status === 401) return showLogin();
    resetCharts();
    main.innerHTML = `<h1>${err.status === 404 ? "Not found" : "Could not load this page"}</h1><p class="error">${e(err.message)}</p>`;
    state.topics = [];
    state.renders += 1; // drawn, if only to say why not
    document.body.dataset.renders = String(state.renders);
  }
}

function showLogin() {
  main.innerHTML = `<form class="login" id="login"><h1>Sign in</h1>
    <p class="muted">With your token: <code>fedfleet users add</code> gave it to you (the admin's operator token:
      <code>fedfleet dashboard-token</code> prints it).</p>
    <input type="password" name="token" autocomplete="current-password" placeholder="token"><button>Open</button>
    <p class="error" id="login-error"></p></form>`;
  document.getElementById("login").addEventListener("submit", async ev => {
    ev.preventDefault();
    const t = new FormData(ev.target).get("token");
    try {
      await api("/api/session", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({token: t})});
      sessionStorage.setItem("fedfleet-token", t);
      await loadSession();
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
// Who is signed in, and what they may do (when the coordinator says): shown in the header.
async function loadSession() {
  const session = await api("/api/session");
  state.session = session;
  const who = document.getElementById("whoami");
  who.textContent = session.user ? `${session.user}${session.role ? " · " + session.role : ""}` : "";
  who.hidden = !session.user;
  document.querySelectorAll("nav [data-needs]").forEach(a => { a.hidden = !can(a.dataset.needs); });
  return session;
}

(async () => {
  const session = await loadSession();
  showExposures(session.plaintext_exposures || []);
  if (!session.public_read && !session.authenticated) return showLogin();
  connect();
  render();
})();

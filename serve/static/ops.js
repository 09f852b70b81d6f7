// The operator console (/ops). The admin token is asked for once and kept in this tab's
// sessionStorage only; every call sends it as a bearer token, and a 401 signs out. Actions
// that change serving ask for confirmation first.
"use strict";

const TOKEN_KEY = "arena.adminToken";
const REFRESH_MS = 10000;
let refreshTimer = null;

const token = () => sessionStorage.getItem(TOKEN_KEY);

async function admin(method, path) {
  const resp = await fetch(path, { method, headers: { Authorization: `Bearer ${token()}` } });
  if (resp.status === 401) {
    const message = await apiError(resp);
    signOut();
    throw new Error(message);
  }
  if (!resp.ok) throw new Error(await apiError(resp));
  return resp.json();
}

function card(parent, label, value) {
  const c = el("div", null, "card");
  c.appendChild(el("b", value === null || value === undefined ? "–" : value));
  c.appendChild(el("span", label));
  parent.appendChild(c);
}

function actionButton(label, confirmText, method, path, danger = false) {
  const b = el("button", label, danger ? "danger" : "");
  b.addEventListener("click", () => act(confirmText, method, path));
  return b;
}

async function act(confirmText, method, path) {
  if (!confirm(confirmText)) return;
  $("action-result").textContent = "Working…";
  try {
    const result = await admin(method, path);
    $("action-result").textContent = result.action
      ? `${result.action} ${result.id}: done in ${fmt(result.seconds, 2)} s; current is ${result.after.current}.`
      : "Done.";
    $("ops-error").textContent = "";
  } catch (error) {
    $("action-result").textContent = "";
    $("ops-error").textContent = error.message;
  }
  refresh();
}

function drawVersions(body) {
  const tbody = $("versions");
  tbody.textContent = "";
  for (const v of body.data) {
    const m = v.metrics || {};
    const tr = el("tr");
    tr.dataset.version = v.id;
    const reward = m.reward_start === undefined ? "–" : `${fmt(m.reward_start, 2)} → ${fmt(m.reward_end, 2)}`;
    const created = v.created_at ? new Date(v.created_at * 1000).toLocaleString() : "–";
    for (const [text, cls] of [[v.id + (v.kind === "reward" ? " (reward model)" : "")], [v.state],
                               [v.parent || "–"], [fmt(m.rm_heldout_accuracy ?? m.heldout_accuracy, 2), "num"],
                               [reward, "num"], [fmt(m.kl_end, 2), "num"], [created]]) {
      tr.appendChild(el("td", text, cls));
    }
    const actions = el("td");
    if (v.kind === "policy" && v.state === "candidate") {
      actions.appendChild(actionButton("Promote", `Make ${v.id} the current version for every user?`,
                                       "POST", `/admin/versions/${encodeURIComponent(v.id)}/promote`));
    }
    if (v.kind !== "base" && v.state !== "current" && v.state !== "retired") {
      actions.appendChild(actionButton("Retire", `Take ${v.id} out of serving and battles?`,
                                       "POST", `/admin/versions/${encodeURIComponent(v.id)}/retire`, true));
    }
    tr.appendChild(actions);
    tbody.appendChild(tr);
  }
  $("signed-in").textContent = `Signed in. Current version: ${body.current}.`;
}

function drawLearner(s) {
  const cards = $("learner-cards");
  cards.textContent = "";
  card(cards, "iteration", s.running ? `running (${s.phase || "queued"})` : (s.state || "none yet"));
  card(cards, "learning", s.paused ? "paused" : "on");
  card(cards, "auto-promotion", !s.auto_promote ? "off" : s.auto_promote_paused ? "paused" : "on");
  card(cards, "votes waiting", `${s.votes_waiting} / ${s.learn_every_votes}`);
  card(cards, "candidates waiting", s.pending.length ? s.pending.join(", ") : "none");
  const bar = $("learner-progress");
  bar.classList.toggle("hidden", !(s.running && s.total));
  if (s.running && s.total) { bar.max = s.total; bar.value = s.step || 0; }
  const metrics = Object.entries(s.metrics || {}).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(", ");
  const parts = [];
  if (s.running) parts.push(`Task ${s.task_id}: ${s.phase || "queued"} ${s.step ?? ""}${s.total ? " / " + s.total : ""}${metrics ? " · " + metrics : ""}`);
  if (s.blocked) parts.push(`No new iteration: ${s.blocked}.`);
  const decided = Object.entries(s.decisions || {}).map(([v, d]) => `${v}: ${d.decision || JSON.stringify(d)}`);
  if (decided.length) parts.push(`Decisions: ${decided.join("; ")}.`);
  $("learner-detail").textContent = parts.join(" ");
  $("learner-pause").disabled = s.paused;
  $("learner-resume").disabled = !s.paused;
  $("learner-cancel").disabled = !s.running;
  $("learner-start").disabled = Boolean(s.running);
  $("auto-pause").disabled = s.auto_promote_paused;
  $("auto-resume").disabled = !s.auto_promote_paused;
}

function drawHealth(h) {
  const cards = $("health-cards");
  cards.textContent = "";
  card(cards, "status", h.status);
  for (const [k, v] of Object.entries(h.feedback || {})) card(cards, k.replaceAll("_", " "), v);
  for (const p of h.problems || []) card(cards, "problem", p);
}

function drawVoters(body) {
  const tbody = $("voters");
  tbody.textContent = "";
  for (const v of body.data.slice(0, 20)) {
    const tr = el("tr");
    for (const [text, cls] of [[v.session.slice(0, 12) + "…"], [fmt(v.score, 2), "num"],
                               [v.flagged ? "flagged" : "no"], [v.votes, "num"]]) {
      tr.appendChild(el("td", text, cls));
    }
    tbody.appendChild(tr);
  }
  if (!body.data.length) tbody.appendChild(el("tr")).appendChild(el("td", "No voters scored yet."));
}

function drawErrors(body) {
  const tbody = $("errors");
  tbody.textContent = "";
  for (const e of body.data) {
    const tr = el("tr");
    for (const [text, cls] of [[new Date(e.ts * 1000).toLocaleTimeString()], [e.status, "num"],
                               [`${e.method} ${e.path}`], [e.code || "–"], [e.message]]) {
      tr.appendChild(el("td", text, cls));
    }
    tbody.appendChild(tr);
  }
  if (!body.data.length) tbody.appendChild(el("tr")).appendChild(el("td", "No errors."));
}

async function refresh() {
  if (!token()) return;
  try {
    const versions = await admin("GET", "/admin/versions");  // checks the token first
    $("login").classList.add("hidden");
    $("console").classList.remove("hidden");
    drawVersions(versions);
    const [learner, voters, errors, health] = await Promise.all([
      admin("GET", "/admin/learner"), admin("GET", "/admin/voters?limit=20"),
      admin("GET", "/admin/errors"), fetch("/healthz").then((r) => r.json())]);
    drawLearner(learner);
    drawVoters(voters);
    drawErrors(errors);
    drawHealth(health);
  } catch (error) {
    $("ops-error").textContent = error.message;
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(refreshTimer);
  refreshTimer = null;
  $("console").classList.add("hidden");
  $("login").classList.remove("hidden");
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token").value.trim();
  if (!value) { $("ops-error").textContent = "Enter the admin token (ARENA_ADMIN_TOKEN)."; return; }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("ops-error").textContent = "";
  refresh();
  refreshTimer = refreshTimer || setInterval(refresh, REFRESH_MS);
});
$("sign-out").addEventListener("click", signOut);
$("refresh").addEventListener("click", refresh);
$("rollback").addEventListener("click", () => act(
  "Roll back: make the previous current version current again?", "POST", "/admin/rollback"));
for (const [id, path, text] of [
  ["learner-start", "/admin/learner/start", "Start a learner iteration now (reward model, then PPO)?"],
  ["learner-pause", "/admin/learner/pause", "Pause learning (no new iteration starts)?"],
  ["learner-resume", "/admin/learner/resume", "Resume learning?"],
  ["learner-cancel", "/admin/learner/cancel", "Cancel the running learner iteration?"],
  ["auto-pause", "/admin/auto-promote/pause", "Pause auto-promotion (the loop decides nothing)?"],
  ["auto-resume", "/admin/auto-promote/resume", "Resume auto-promotion?"]]) {
  $(id).addEventListener("click", () => act(text, "POST", path));
}

if (token()) { refresh(); refreshTimer = setInterval(refresh, REFRESH_MS); }

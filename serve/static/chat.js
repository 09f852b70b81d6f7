// The chat page (/chat): a multi-turn conversation with `current` or a picked version,
// streamed; Stop aborts the stream (the partial answer stays), Regenerate asks again for the
// last answer, New chat starts over. The conversation lives in this tab's sessionStorage.
"use strict";

const STORE_KEY = "arena.chat";
const chat = { messages: [], model: "current", controller: null };

function save() {
  sessionStorage.setItem(STORE_KEY, JSON.stringify({ messages: chat.messages, model: chat.model }));
}

function restore() {
  try {
    const kept = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    if (kept && Array.isArray(kept.messages)) {
      chat.messages = kept.messages.filter((m) => m && typeof m.content === "string"
                                                  && ["user", "assistant"].includes(m.role));
      chat.model = typeof kept.model === "string" ? kept.model : "current";
    }
  } catch (_) { sessionStorage.removeItem(STORE_KEY); }
}

function draw() {
  const log = $("chat-log");
  log.textContent = "";
  for (const m of chat.messages) log.appendChild(el("div", m.content, `msg ${m.role}`));
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
  $("chat-regenerate").disabled = busy || chat.messages.length === 0;
}

async function loadModels() {
  const resp = await fetch("/v1/models");
  if (!resp.ok) { $("chat-error").textContent = await apiError(resp); return; }
  const select = $("chat-model");
  select.textContent = "";
  for (const m of (await resp.json()).data) {
    const label = m.id === "current" ? `current (${m.alias_of})` : `${m.id} (${m.state})`;
    const option = el("option", label);
    option.value = m.id;
    select.appendChild(option);
  }
  select.value = chat.model;
  if (select.value !== chat.model) { select.value = "current"; chat.model = "current"; }
}

// Stream one answer to the conversation so far; the partial answer is kept if stopped.
async function answer() {
  $("chat-error").textContent = "";
  const out = $("chat-log").appendChild(el("div", "", "msg assistant pending"));
  chat.controller = new AbortController();
  setBusy(true);
  let text = "", completed = false;
  try {
    const resp = await postJSON("/v1/chat/completions",
                                { model: chat.model, messages: chat.messages, stream: true },
                                {}, chat.controller.signal);
    if (!resp.ok) { $("chat-error").textContent = await apiError(resp); out.remove(); return; }
    await readSSE(resp, (event, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { $("chat-error").textContent = chunk.error.message; return; }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) { text += delta.content; out.textContent = text; }
    });
    completed = !$("chat-error").textContent;
  } catch (error) {
    $("chat-error").textContent = networkError(error);
  } finally {
    // A finished answer is kept even if empty (the page marks it); a stopped or failed one
    // only if it has text.
    if (text || completed) chat.messages.push({ role: "assistant", content: text });
    else out.remove();
    out.classList.remove("pending");
    chat.controller = null;
    save();
    setBusy(false);
  }
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text || chat.controller) return;
  // A turn that got no answer (stopped, failed) is replaced, not followed by a second user turn.
  if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "user") {
    chat.messages.pop();
    draw();
  }
  chat.messages.push({ role: "user", content: text });
  $("chat-log").appendChild(el("div", text, "msg user"));
  $("chat-input").value = "";
  save();
  await answer();
}

// Ask again for the last answer (or for the answer a stopped or failed turn did not get).
async function regenerate() {
  if (chat.controller || chat.messages.length === 0) return;
  if (chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  draw();
  await answer();
}

$("chat-send").addEventListener("click", send);
$("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("chat-regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  save();
  draw();
  setBusy(false);
  $("chat-error").textContent = "";
  $("chat-input").focus();
});
$("chat-model").addEventListener("change", () => { chat.model = $("chat-model").value; save(); });
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
});

restore();
draw();
setBusy(false);
loadModels();

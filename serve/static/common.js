// Shared by the gateway's pages: safe DOM building (text only: no HTML from answers or users
// ever reaches innerHTML), API error messages, and server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmt(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// An API error as a sentence for the page: the server's own message (OpenAI-style body),
// with what the user can do about it.
async function apiError(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = JSON.stringify(body.detail);
  } catch (_) { /* not JSON: keep the status line */ }
  if (resp.status === 429) {
    const wait = resp.headers.get("Retry-After");
    if (wait && !message.includes("Retry in")) message += ` Try again in ${wait} s.`;
  } else if (resp.status === 401) {
    message = "Wrong or missing admin token. " + message;
  } else if (resp.status === 502 || resp.status === 503 || resp.status === 504) {
    message = "The model server is not answering right now. " + message;
  }
  return message;
}

function networkError(error) {
  return error && error.name === "AbortError" ? "Stopped." : `Network error: ${error}`;
}

// Read a text/event-stream response: onEvent(eventName, data) per event.
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, data);
    }
  }
}

async function postJSON(url, body, headers = {}, signal = undefined) {
  return fetch(url, { method: "POST", signal,
                      headers: { "Content-Type": "application/json", ...headers },
                      body: JSON.stringify(body) });
}

// Mark the current page in the header's navigation.
document.querySelectorAll("header nav a").forEach((a) => {
  if (a.getAttribute("href") === location.pathname) a.classList.add("active");
});

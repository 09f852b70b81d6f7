// The side-by-side page (/): a battle streams both answers at once; the vote buttons open
// only when a turn has finished and the battle is not voted yet (the API refuses a vote during
// a follow-up and a second vote; the page never offers either).
"use strict";

const arena = { battleId: null, busy: false, voted: false };
const voteButtons = document.querySelectorAll("#votes button");
const VOTE_KEYS = { "1": "a", "2": "b", "3": "tie", "4": "both_bad" };

function render() {
  const canVote = arena.battleId !== null && !arena.busy && !arena.voted;
  voteButtons.forEach((b) => { b.disabled = !canVote; });
  $("arena-send").disabled = arena.busy || arena.voted;
  $("arena-input").disabled = arena.busy || arena.voted;
  $("arena-send").textContent = arena.battleId ? "Follow up (both)" : "Send to both";
  $("next-battle").classList.toggle("hidden", !arena.voted && !(arena.battleId && !arena.busy));
}

function addTurn(role, text) {
  return ["a", "b"].map((side) => $(`log-${side}`).appendChild(el("div", text, `msg ${role}`)));
}

async function send() {
  const text = $("arena-input").value.trim();
  if (!text || arena.busy || arena.voted) return;
  $("arena-error").textContent = "";
  arena.busy = true;
  render();
  const followUp = arena.battleId !== null;
  addTurn("user", text);
  const [outA, outB] = addTurn("assistant pending", "");
  const url = followUp ? `/v1/battles/${arena.battleId}/messages` : "/v1/battles";
  const body = followUp ? { content: text, stream: true }
                        : { messages: [{ role: "user", content: text }], stream: true };
  let finished = false;
  try {
    const resp = await postJSON(url, body);
    if (!resp.ok) {
      $("arena-error").textContent = await apiError(resp);
      outA.remove(); outB.remove();
      return;
    }
    if (!followUp) arena.battleId = resp.headers.get("X-Battle-Id");
    await readSSE(resp, (event, data) => {
      const payload = JSON.parse(data);
      if (event === "a") outA.textContent += payload.content;
      else if (event === "b") outB.textContent += payload.content;
      else if (event === "done") { arena.battleId = payload.battle_id; finished = true; }
      else if (event === "error") $("arena-error").textContent = payload.message;
    });
    if (finished) $("arena-input").value = "";
  } catch (error) {
    $("arena-error").textContent = networkError(error);
  } finally {
    outA.classList.remove("pending");
    outB.classList.remove("pending");
    // A first turn that did not finish leaves no battle to vote on.
    if (!finished && !followUp) arena.battleId = null;
    arena.busy = false;
    render();
    if (finished) $("arena-input").focus();
  }
}

async function vote(winner) {
  if (arena.battleId === null || arena.busy || arena.voted) return;
  arena.busy = true;
  render();
  try {
    const resp = await postJSON(`/v1/battles/${arena.battleId}/vote`, { winner });
    if (!resp.ok) {
      $("arena-error").textContent = await apiError(resp);
      if (resp.status === 404 || resp.status === 409) arena.voted = true;  // expired or done
      return;
    }
    const reveal = await resp.json();
    arena.voted = true;
    $("reveal").textContent =
      `Thanks! A was ${reveal.a_model}, B was ${reveal.b_model}.`;
  } catch (error) {
    $("arena-error").textContent = networkError(error);
  } finally {
    arena.busy = false;
    render();
    if (arena.voted) $("next-battle").focus();
  }
}

function nextBattle() {
  if (arena.busy) return;
  Object.assign(arena, { battleId: null, voted: false });
  for (const id of ["log-a", "log-b", "reveal", "arena-error"]) $(id).textContent = "";
  $("arena-input").value = "";
  render();
  $("arena-input").focus();
}

$("arena-send").addEventListener("click", send);
$("next-battle").addEventListener("click", nextBattle);
voteButtons.forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
$("arena-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
});
document.addEventListener("keydown", (e) => {
  const typing = e.target instanceof HTMLTextAreaElement || e.target instanceof HTMLInputElement;
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (VOTE_KEYS[e.key]) { e.preventDefault(); vote(VOTE_KEYS[e.key]); }
  else if (e.key === "n" || e.key === "N") { e.preventDefault(); nextBattle(); }
});

$("erase-data").addEventListener("click", async () => {
  if (!confirm("Delete the chats and votes this browser sent? This cannot be undone.")) return;
  const resp = await fetch("/v1/session/data", { method: "DELETE" });
  if (!resp.ok) { $("erase-result").textContent = await apiError(resp); return; }
  const done = await resp.json();
  $("erase-result").textContent =
    `Deleted ${done.erased_chat_turns} chat turns and ${done.erased_votes} votes.`;
});

render();

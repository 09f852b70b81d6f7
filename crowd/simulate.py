"""The simulated crowd: voters that use the gateway's public HTTP API and nothing else.

Each voter is an asyncio task with its own httpx.AsyncClient, so its own cookie jar and its
own `arena_session`: to the gateway the crowd is N people. A voter loops: pick a prompt (its
own seeded rng); with probability `chat_share` send a short chat turn to `current` (so user
prompts reach the learner's prompt pool); otherwise start a battle, let the judge pick a side
(with the judge's own seeded rng) and vote. 429 waits for Retry-After (capped), 503 and
refused connections back off and retry a few times; every other bad answer is counted, never
fatal. The last `stuffers` voters vote with a stuffer judge instead (random, always "a", …):
the anomaly defence's test crowd; the summary lists their battles.

Bounded three ways: at most `battles` battles over all voters, `timeout_s` of wall time, and
a loopback gateway only (a crowd of bots is never pointed at a real service by accident).
With `until_decided=K` it also stops once GET /v1/models has shown K policy versions decided
since the run started: no longer candidates (promoted, retired or rejected; a candidate that
disappears from the list was retired, which counts too; a promoted version stays decided when
a later promotion makes it a candidate again), and not already decided at the first look
(versions decided before the run do not count). A version registered and retired between two
looks (DECIDED_POLL_S) is never seen, so never counted.

With `pause_while_learning` the voters start no battle or chat while GET /admin/learner (the
one operator call, with the admin token) reports a running learner iteration: on a small CPU
machine the crowd's generations would otherwise take half the learner's cores. One watcher
polls it every LEARNER_POLL_S; an unusable token stops the crowd ("errors") rather than let it
vote on unpaused.

The pure parts (the loopback check, choosing an action, the battle budget, the tally, which
policies are decided, how long to back off) come first; the I/O after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from crowd.judges import Judge, checked_verdict

Action = Literal["chat", "battle"]
StopReason = Literal["battles", "timeout", "decided", "errors"]

CHAT_MAX_TOKENS = 16  # chat turns only feed the prompt pool: keep them cheap
MAX_FAILED_ATTEMPTS = 5  # 503s / refused connections before one request is given up
BACKOFF_S = 0.5  # first back-off after a 503 without Retry-After; doubles each time
MAX_BACKOFF_S = 30.0  # cap on any wait, Retry-After included
DECIDED_POLL_S = 3.0  # how often --until-decided looks at /v1/models
LEARNER_POLL_S = 2.0  # how often --pause-while-learning looks at /admin/learner
STOP_GRACE_S = 5.0  # after the deadline, requests in flight get this long to finish
ERROR_SAMPLES = 5  # error messages kept for the summary


class CrowdError(ValueError):
    """A crowd that must not run (non-loopback URL, impossible plan)."""


# --- pure parts -----------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """The URL, if its host is loopback (127.0.0.0/8, ::1, localhost); else CrowdError."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as error:
        raise CrowdError(f"not a URL: {url!r}") from error
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CrowdError(f"not an http(s) URL: {url!r}")
    host = parsed.host.lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise CrowdError(f"the simulated crowd only talks to a gateway on this machine "
                         f"(127.0.0.0/8, ::1, localhost), not {host!r}")
    return url


def choose_action(rng: random.Random, chat_share: float) -> Action:
    """A chat turn with probability chat_share, else a battle."""
    return "chat" if rng.random() < chat_share else "battle"


def backoff_s(failed_attempts: int, retry_after: str | None = None) -> float:
    """How long to wait before the next try: Retry-After when the server sent a number of
    seconds, else BACKOFF_S doubled per failed attempt; capped at MAX_BACKOFF_S."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), MAX_BACKOFF_S)
        except ValueError:
            pass  # an HTTP date: fall back to our own back-off
    return min(BACKOFF_S * 2 ** max(failed_attempts - 1, 0), MAX_BACKOFF_S)


@dataclass
class BattleBudget:
    """The battles the whole crowd may start; a voter claims one before it starts it."""

    total: int
    claimed: int = 0

    @property
    def exhausted(self) -> bool:
        return self.claimed >= self.total

    def claim(self) -> bool:
        if self.exhausted:
            return False
        self.claimed += 1
        return True


@dataclass
class Tally:
    """What the crowd did so far."""

    battles_created: int = 0
    votes_accepted: int = 0
    votes_refused: Counter[int] = field(default_factory=Counter)  # by HTTP status
    chats: int = 0
    errors: int = 0
    retries: int = 0  # 429 / 503 answers that were waited out and retried
    accepted_battle_ids: list[str] = field(default_factory=list)
    stuffer_battle_ids: list[str] = field(default_factory=list)  # accepted, from stuffers
    error_samples: list[str] = field(default_factory=list)

    @property
    def votes_cast(self) -> int:
        return self.votes_accepted + sum(self.votes_refused.values())

    def vote(self, battle_id: str, status: int, stuffer: bool = False) -> None:
        if status == 200:
            self.votes_accepted += 1
            self.accepted_battle_ids.append(battle_id)
            if stuffer:
                self.stuffer_battle_ids.append(battle_id)
        else:
            self.votes_refused[status] += 1

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(message)


def policy_states(models: dict[str, Any]) -> dict[str, str]:
    """{policy id: state} from a GET /v1/models body (ids starting "policy-")."""
    return {str(m["id"]): str(m.get("state")) for m in models["data"]
            if str(m.get("id", "")).startswith("policy-")}


def decided_policies(listed: dict[str, str], ever_candidate: set[str]) -> set[str]:
    """Policies no longer candidates: listed in another state (current, rejected, retired),
    or once seen as candidates and now gone from the list (retired ones are not listed)."""
    decided = {version for version, state in listed.items() if state != "candidate"}
    return decided | (ever_candidate - set(listed))


@dataclass(frozen=True)
class CrowdPlan:
    url: str
    voters: int = 4
    battles: int = 100
    chat_share: float = 0.1
    seed: int = 0
    max_tokens: int | None = None  # None: the gateway's battle_max_tokens
    timeout_s: float = 3600.0
    until_decided: int | None = None
    request_timeout_s: float = 300.0
    max_errors: int = 100  # a crowd facing a broken service stops instead of spinning
    pause_while_learning: bool = False  # no new battle/chat while a learner iteration runs
    stuffers: int = 0  # the last this many voters vote with the stuffer judge, not the judge
    # Bearer token for GET /admin/learner; None: the operator token `arena` uses
    # (core.secrets.admin_token: ARENA_ADMIN_TOKEN, else the one in the data dir).
    admin_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if self.voters < 1 or self.battles < 0:
            raise CrowdError("need at least one voter and a battle count >= 0")
        if not 0.0 <= self.chat_share < 1.0:
            raise CrowdError(f"chat share must be in [0, 1), got {self.chat_share}")
        if self.timeout_s <= 0:
            raise CrowdError("timeout must be positive")
        if not 0 <= self.stuffers <= self.voters:
            raise CrowdError(f"stuffers must be between 0 and the {self.voters} voters")
        if self.until_decided is not None and self.until_decided < 1:
            raise CrowdError("--until-decided needs K >= 1")


@dataclass(frozen=True)
class CrowdSummary:
    voters: int
    judge: str
    battles_created: int
    votes_accepted: int
    votes_refused: dict[int, int]
    chats: int
    errors: int
    retries: int
    elapsed_s: float
    stopped: StopReason
    decided: list[str]
    accepted_battle_ids: list[str]
    error_samples: list[str]
    learning_s: float = 0.0  # wall time the crowd saw a learner iteration run (paused or not)
    stuffer_battle_ids: list[str] = field(default_factory=list)  # voted by the stuffers

    @property
    def votes_per_s(self) -> float:
        return self.votes_accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "votes_refused": {str(k): v for k, v in
                                                  sorted(self.votes_refused.items())},
                "votes_per_s": round(self.votes_per_s, 3)}


# --- I/O ------------------------------------------------------------------------------------
class _Crowd:
    """The shared state of one run: plan, judge, prompts, tally, budget, stop signal."""

    def __init__(self, plan: CrowdPlan, judge: Judge, prompts: list[str],
                 on_update: Callable[[Tally], None] | None,
                 stuffer_judge: Judge | None = None) -> None:
        self.plan, self.judge, self.prompts = plan, judge, prompts
        self.stuffer_judge = stuffer_judge
        self.on_update = on_update or (lambda tally: None)
        self.tally = Tally()
        self.budget = BattleBudget(plan.battles)
        self.stop = asyncio.Event()
        self.stopped: StopReason | None = None
        self.decided: set[str] = set()
        # Clear while a learner iteration runs (pause_while_learning), and until the first
        # look at the learner: voters wait for it.
        self.learner_idle = asyncio.Event()
        if not plan.pause_while_learning:
            self.learner_idle.set()
        self.learning_s = 0.0

    def finish(self, reason: StopReason) -> None:
        if self.stopped is None:
            self.stopped = reason
        self.stop.set()

    def error(self, message: str) -> None:
        self.tally.error(message)
        self.on_update(self.tally)
        if self.tally.errors >= self.plan.max_errors:
            self.finish("errors")

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the crowd stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.plan.url, timeout=self.plan.request_timeout_s,
                                 headers={"User-Agent": "rlhf-arena-crowd"})

    async def post(self, http: httpx.AsyncClient, path: str,
                   body: dict[str, Any]) -> httpx.Response | None:
        """POST with the crowd's manners: wait out 429 (until the crowd stops), retry 503 and
        refused connections a few times. None when given up (counted as an error) or stopped."""
        failed = 0
        while failed < MAX_FAILED_ATTEMPTS:
            try:
                response = await http.post(path, json=body)
            except httpx.TransportError as error:
                self.error(f"POST {path}: {type(error).__name__}: {error}")
                if not isinstance(error, httpx.ConnectError):
                    return None  # it may have arrived: never send it twice
                failed += 1
                retry_after = None
            else:
                if response.status_code not in (429, 503):
                    return response
                self.tally.retries += 1
                failed += response.status_code == 503
                retry_after = response.headers.get("retry-after")
            if self.stop.is_set():
                return None
            await self.pause(backoff_s(failed, retry_after))
            if self.stop.is_set():
                return None
        self.error(f"POST {path}: gave up after {MAX_FAILED_ATTEMPTS} failed attempts")
        return None

    async def voter(self, index: int) -> None:
        rng = random.Random(f"{self.plan.seed}:voter:{index}")
        judge_rng = random.Random(f"{self.plan.seed}:judge:{index}")
        async with self.client() as http:
            while not self.stop.is_set():
                if not self.learner_idle.is_set():
                    await self.wait_learner_idle()
                    continue
                prompt = rng.choice(self.prompts)
                if choose_action(rng, self.plan.chat_share) == "chat":
                    if self.budget.exhausted:
                        return
                    await self.chat(http, prompt)
                elif self.budget.claim():
                    await self.battle(http, prompt, judge_rng,
                                      stuffer=index >= self.plan.voters - self.plan.stuffers)
                else:
                    return

    async def chat(self, http: httpx.AsyncClient, prompt: str) -> None:
        max_tokens = min(self.plan.max_tokens or CHAT_MAX_TOKENS, CHAT_MAX_TOKENS)
        response = await self.post(http, "/v1/chat/completions", {
            "model": "current", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]})
        if response is None:
            return
        if response.status_code == 200:
            self.tally.chats += 1
            self.on_update(self.tally)
        else:
            self.error(f"chat: HTTP {response.status_code}: {response.text[:200]}")

    async def battle(self, http: httpx.AsyncClient, prompt: str,
                     judge_rng: random.Random, stuffer: bool = False) -> None:
        messages = [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"messages": messages}
        if self.plan.max_tokens is not None:
            body["max_tokens"] = self.plan.max_tokens
        response = await self.post(http, "/v1/battles", body)
        if response is None:
            return
        if response.status_code != 200:
            self.error(f"battle: HTTP {response.status_code}: {response.text[:200]}")
            return
        try:
            battle = response.json()
            battle_id = str(battle["battle_id"])
            answer_a, answer_b = battle["a"]["content"] or "", battle["b"]["content"] or ""
        except (ValueError, KeyError, TypeError) as error:
            self.error(f"battle: unreadable answer: {error!r}")
            return
        self.tally.battles_created += 1
        try:
            judge = self.stuffer_judge if stuffer and self.stuffer_judge else self.judge
            verdict = checked_verdict(judge, messages, answer_a, answer_b, judge_rng)
        except Exception as error:  # a user's judge: report it, keep the crowd going
            self.error(f"judge: {error!r}")
            return
        vote = await self.post(http, f"/v1/battles/{battle_id}/vote", {"winner": verdict})
        if vote is not None:
            self.tally.vote(battle_id, vote.status_code, stuffer)
            self.on_update(self.tally)

    async def wait_learner_idle(self) -> None:
        """Until no learner iteration runs (or the crowd stops)."""
        stop, idle = (asyncio.create_task(event.wait()) for event in (self.stop,
                                                                       self.learner_idle))
        try:
            await asyncio.wait({stop, idle}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, idle):
                task.cancel()

    async def watch_learner(self, token: str) -> None:
        """Poll GET /admin/learner; hold the voters (learner_idle cleared) while an iteration
        runs. A failed look keeps the last answer (the first failed one lets them vote); a
        refused token stops the crowd."""
        since: float | None = None  # when the running iteration was first seen
        async with self.client() as http:
            http.headers["Authorization"] = f"Bearer {token}"
            while not self.stop.is_set():
                try:
                    response = await http.get("/admin/learner")
                    if response.status_code in (401, 403):
                        self.error(f"GET /admin/learner: HTTP {response.status_code}: the admin "
                                   "token was refused; cannot pause while learning")
                        self.finish("errors")
                        return
                    response.raise_for_status()
                    running = bool(response.json().get("running"))
                except (httpx.HTTPError, ValueError, AttributeError) as error:
                    self.error(f"GET /admin/learner: {error!r}")
                    running = since is not None
                now = time.monotonic()
                if running and since is None:
                    since = now
                    self.learner_idle.clear()
                elif not running:
                    if since is not None:
                        self.learning_s += now - since
                        since = None
                    self.learner_idle.set()
                await self.pause(LEARNER_POLL_S)
            if since is not None:
                self.learning_s += time.monotonic() - since

    async def watch_decisions(self, wanted: int) -> None:
        """Poll /v1/models until `wanted` policy versions were decided since the first look,
        then stop the crowd."""
        ever_candidate: set[str] = set()
        decided_before: set[str] | None = None  # decided at the first look: not counted
        async with self.client() as http:
            while not self.stop.is_set():
                try:
                    response = await http.get("/v1/models")
                    response.raise_for_status()
                    listed = policy_states(response.json())
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
                    self.error(f"GET /v1/models: {error!r}")
                else:
                    ever_candidate |= {v for v, state in listed.items() if state == "candidate"}
                    decided = decided_policies(listed, ever_candidate)
                    if decided_before is None:
                        decided_before = decided
                    # Once decided, always: a promoted version goes back to `candidate` when
                    # the next one is promoted.
                    self.decided |= decided - decided_before
                    if len(self.decided) >= wanted:
                        self.finish("decided")
                        return
                await self.pause(DECIDED_POLL_S)


def _judge_name(judge: Judge) -> str:
    return getattr(judge, "__name__", type(judge).__name__)


async def run_crowd(plan: CrowdPlan, judge: Judge, prompts: list[str],
                    on_update: Callable[[Tally], None] | None = None,
                    stuffer_judge: Judge | None = None) -> CrowdSummary:
    """Run the crowd until its battles are voted, its time is up, or (with until_decided)
    enough policies are decided; the summary of what it did. The last `plan.stuffers`
    voters vote with `stuffer_judge` (e.g. random_votes) instead of `judge`."""
    if not prompts:
        raise CrowdError("no prompts to ask")
    if plan.stuffers and stuffer_judge is None:
        raise CrowdError("stuffers need a stuffer judge")
    token = plan.admin_token
    if plan.pause_while_learning and token is None:
        token = default_admin_token()
    crowd = _Crowd(plan, judge, prompts, on_update, stuffer_judge)
    started = time.monotonic()
    watchers = []
    if plan.pause_while_learning:
        watchers.append(asyncio.create_task(crowd.watch_learner(token or "")))
    if plan.until_decided:
        watchers.append(asyncio.create_task(crowd.watch_decisions(plan.until_decided)))
    voters = [asyncio.create_task(crowd.voter(i)) for i in range(plan.voters)]
    waiting = {*voters, *watchers}
    deadline = started + plan.timeout_s
    while waiting and not crowd.stop.is_set() and any(not v.done() for v in voters):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            crowd.finish("timeout")
            break
        done, waiting = await asyncio.wait(waiting, timeout=remaining,
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is not None:  # a bug, not a bad response: don't hide it
                crowd.finish("errors")
                raise task.exception()
    crowd.finish("battles")  # no-op if a reason was set already
    _, late = await asyncio.wait([*voters, *watchers], timeout=STOP_GRACE_S)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    tally = crowd.tally
    return CrowdSummary(
        voters=plan.voters, judge=_judge_name(judge), battles_created=tally.battles_created,
        votes_accepted=tally.votes_accepted, votes_refused=dict(tally.votes_refused),
        chats=tally.chats, errors=tally.errors, retries=tally.retries,
        elapsed_s=round(time.monotonic() - started, 3), stopped=crowd.stopped or "battles",
        decided=sorted(crowd.decided), accepted_battle_ids=list(tally.accepted_battle_ids),
        error_samples=list(tally.error_samples), learning_s=round(crowd.learning_s, 3),
        stuffer_battle_ids=list(tally.stuffer_battle_ids))


def default_admin_token() -> str:
    """The operator token the `arena` CLI uses (ARENA_ADMIN_TOKEN, else the data dir's)."""
    from core.secrets import admin_token
    from core.settings import Settings

    return admin_token(Settings())


def simulate(plan: CrowdPlan, judge: Judge, prompts: list[str],
             console: Console | None = None,
             stuffer_judge: Judge | None = None) -> CrowdSummary:
    """run_crowd with a rich progress bar on `console` (none when console is None)."""
    if console is None:
        return asyncio.run(run_crowd(plan, judge, prompts, stuffer_judge=stuffer_judge))
    columns = (TextColumn("[bold]crowd[/] votes"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} votes/s"),
               TextColumn("chats {task.fields[chats]}"),
               TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("crowd", total=plan.battles, rate=0.0, chats=0, errors=0)
        started = time.monotonic()

        def update(tally: Tally) -> None:
            elapsed = max(time.monotonic() - started, 1e-9)
            progress.update(task, completed=tally.votes_cast, chats=tally.chats,
                            rate=tally.votes_accepted / elapsed, errors=tally.errors)

        return asyncio.run(run_crowd(plan, judge, prompts, update, stuffer_judge))

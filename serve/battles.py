"""Side-by-side battles: two anonymous answers from two versions, a vote, then the reveal.

A battle lives in Redis (hash `arena:battle:{id}`, with a TTL) so any gateway process can
serve its follow-ups and its vote: `state` (the battle as JSON), and for the vote script
`session`, `model_a`, `model_b` and `ballot` (the vote record minus its outcome). The vote
itself is serve/votes.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from deploy.registry import VersionRecord
from feedback.identity import vote_flags
from feedback.vote_record import ballot_json
from serve.bodies import StrictJSONRoute
from serve.chat import (
    SSE_MEDIA_TYPE,
    ChatMessage,
    DeadlineStreamingResponse,
    answer_responses,
    check_caps,
    text_messages,
    upstream_message,
)
from serve.deps import gateway_state
from serve.errors import APIError, error_responses
from serve.matchmaking import choose_versions
from serve.metrics import BATTLE_VERSION
from serve.rate_limit import rate_subjects
from serve.state import GatewayState

router = APIRouter(route_class=StrictJSONRoute)
BATTLE_KEY = "arena:battle:{id}"
VOTED_KEY = "arena:battle:{id}:voted"
SEED_RANGE = 2**31 - 1
NOT_FOUND_MESSAGE = "Battle '{id}' does not exist or has expired."
VOTED_MESSAGE = "This battle has been voted on; start a new battle."
WRONG_SESSION_MESSAGE = ("This battle belongs to another session; only the session that "
                         "started it can continue it or vote.")


class BattleRequest(BaseModel):
    """No sampling fields: both sides sample with the server's settings and a random seed, so
    that nobody can reproduce an answer through the chat route and name a side before the
    vote (a sampling field is refused, 422, naming it)."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    stream: bool = False


class FollowUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1, description="The user's next message, sent to both sides.")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    stream: bool = False


class SideAnswer(BaseModel):
    content: str


class BattleAnswers(BaseModel):
    battle_id: str
    a: SideAnswer
    b: SideAnswer


BATTLE_RESPONSES = answer_responses(
    "Both answers (JSON), or with `stream: true` server-sent events `a` / `b` (deltas), then "
    "`done` (or `error`).", BattleAnswers)


async def _load_battle(gw: GatewayState, battle_id: str, session: str) -> dict[str, Any]:
    raw = await gw.redis.hget(BATTLE_KEY.format(id=battle_id), "state")
    if raw is None:
        raise APIError(404, NOT_FOUND_MESSAGE.format(id=battle_id), "battle_not_found")
    battle = json.loads(raw)
    if battle["session"] != session:
        raise APIError(403, WRONG_SESSION_MESSAGE, "wrong_session")
    return battle


def battle_fields(battle: dict[str, Any], identity_words: list[str] | None = None
                  ) -> dict[str, str]:
    """The battle hash of a battle whose latest answers are finished."""
    said = [m["content"] for m in battle["conversation_a"] + battle["conversation_b"]
            if m["role"] == "assistant"]
    ballot = ballot_json(
        battle_id=battle["battle_id"], model_a=battle["model_a"], model_b=battle["model_b"],
        conversation_a=battle["conversation_a"][:-1],
        conversation_b=battle["conversation_b"][:-1],
        answer_a=battle["answer_a"], answer_b=battle["answer_b"], session=battle["session"],
        battle_created_at=battle["created_at"],
        flags=vote_flags(said, (battle["model_a"], battle["model_b"]), identity_words or ()),
        voter_address=battle.get("voter_address", ""))  # "" in battles of older gateways
    return {"state": json.dumps(battle), "session": battle["session"],
            "model_a": battle["model_a"], "model_b": battle["model_b"], "ballot": ballot}


# A turn and the vote exclude each other. A follow-up turn starts by taking the `ballot` away
# (the vote script answers 425 without one) unless the battle is voted; the turn's save puts
# the new ballot back, never after a vote, so a vote always judges the answers it was shown
# and the battle never outlives its once-only guard.
#   KEYS: battle hash, voted guard
_BEGIN_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 404 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 409 end
if redis.call('HDEL', KEYS[1], 'ballot') == 0 then return 425 end
return 200
"""
#   KEYS: battle hash, voted guard; ARGV: TTL, then field, value, field, value, ...
_SAVE_TURN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 409 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 200
"""
TURN_IN_PROGRESS_MESSAGE = ("This battle is still answering a turn; wait for both answers "
                            "before sending a follow-up or a vote.")


async def _save_battle(gw: GatewayState, battle: dict[str, Any]) -> None:
    battle_id = battle["battle_id"]
    fields = battle_fields(battle, gw.settings.identity_words)
    pairs = [item for pair in fields.items() for item in pair]
    await gw.redis.eval(_SAVE_TURN, 2, BATTLE_KEY.format(id=battle_id),
                        VOTED_KEY.format(id=battle_id), gw.settings.battle_ttl_s, *pairs)


async def _begin_turn(gw: GatewayState, battle_id: str) -> None:
    status = await gw.redis.eval(_BEGIN_TURN, 2, BATTLE_KEY.format(id=battle_id),
                                 VOTED_KEY.format(id=battle_id))
    if status == 404:
        raise APIError(404, NOT_FOUND_MESSAGE.format(id=battle_id), "battle_not_found")
    if status == 409:
        raise APIError(409, VOTED_MESSAGE, "already_voted")
    if status == 425:
        raise APIError(409, TURN_IN_PROGRESS_MESSAGE, "turn_in_progress")


def _anonymous(error: APIError, records: list[VersionRecord]) -> APIError:
    """A side's error without the names of the battle's versions, which would reveal them."""
    message = error.message
    for record in records:
        for name in (record.id, record.path):
            if name:
                message = message.replace(name, "<model>")
    return APIError(error.status, message, error.code, None, error.headers)


def _sampling(gw: GatewayState, max_tokens: int | None) -> dict:
    return {"max_tokens": max_tokens or gw.settings.battle_max_tokens,
            "temperature": gw.settings.battle_temperature}


async def _answer(gw: GatewayState, record: VersionRecord, messages: list[dict],
                  sampling: dict, seed: int) -> str:
    body = {"model": record.id, "messages": messages, "seed": seed, **sampling}
    response = await gw.pool.post("/v1/chat/completions", body, record.id, record.path)
    if response.status_code != 200:
        raise APIError(response.status_code,
                       upstream_message(response.status_code, response.content), "upstream_error")
    answer = response.json()
    gw.metrics.tokens.labels("battle", BATTLE_VERSION).inc(answer["usage"]["completion_tokens"])
    return answer["choices"][0]["message"]["content"] or ""


async def _stream_side(gw: GatewayState, side: str, record: VersionRecord, messages: list[dict],
                       sampling: dict, seed: int, queue: asyncio.Queue) -> str:
    """Relay one side's tokens into the shared queue; return its full answer."""
    body = {"model": record.id, "messages": messages, "seed": seed, "stream": True, **sampling}
    parts: list[str] = []
    async with gw.pool.stream("/v1/chat/completions", body, record.id, record.path) as upstream:
        if upstream.status_code != 200:
            raise APIError(upstream.status_code,
                           upstream_message(upstream.status_code, await upstream.aread()),
                           "upstream_error")
        async for line in upstream.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta:
                parts.append(delta)
                await queue.put((side, delta))
    gw.metrics.tokens.labels("battle", BATTLE_VERSION).inc(len(parts))
    return "".join(parts)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _run_turn(gw: GatewayState, battle: dict[str, Any], records: list[VersionRecord],
                    sampling: dict, stream: bool,
                    previous: dict[str, Any] | None = None) -> dict[str, Any] | StreamingResponse:
    """Generate both sides' answers for the battle's latest user turn, concurrently.
    `previous`: the battle before a follow-up turn, put back if the turn does not finish."""
    # Two samples of one version (cold start) must differ: each side gets its own seed.
    seeds = random.sample(range(SEED_RANGE), 2)
    conversations = [battle["conversation_a"], battle["conversation_b"]]

    def finish(answers: list[str]) -> None:
        for side, answer in zip("ab", answers, strict=True):
            battle[f"answer_{side}"] = answer
            battle[f"conversation_{side}"].append({"role": "assistant", "content": answer})

    async def restore() -> None:
        if previous is not None:  # the previous answers can be voted on again
            with anyio.CancelScope(shield=True):  # also when the client went away
                await _save_battle(gw, previous)

    if not stream:
        try:
            answers = await asyncio.gather(*(
                _answer(gw, rec, conv, sampling, seed)
                for rec, conv, seed in zip(records, conversations, seeds, strict=True)))
        except APIError as error:
            await restore()
            raise _anonymous(error, records) from None
        except BaseException:
            await restore()
            raise
        finish(list(answers))
        await _save_battle(gw, battle)
        return {"battle_id": battle["battle_id"], "a": {"content": answers[0]},
                "b": {"content": answers[1]}}

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_stream_side(gw, side, rec, conv, sampling, seed, queue))
                 for side, rec, conv, seed in zip("ab", records, conversations, seeds,
                                                  strict=True)]
        saved = False
        try:
            while not all(t.done() for t in tasks) or not queue.empty():
                try:
                    side, delta = await asyncio.wait_for(queue.get(), timeout=0.05)
                except TimeoutError:
                    continue
                yield _sse(side, {"content": delta})
            failed = [t.exception() for t in tasks if t.exception() is not None]
            if failed:
                error = failed[0]
                message = (_anonymous(error, records).message if isinstance(error, APIError)
                           else "A model server failed; start a new battle or retry.")
                yield _sse("error", {"message": message})
                return
            finish([t.result() for t in tasks])
            await _save_battle(gw, battle)
            saved = True
            yield _sse("done", {"battle_id": battle["battle_id"]})
        finally:
            for task in tasks:
                task.cancel()
            if not saved:
                await restore()

    deadline = asyncio.get_running_loop().time() + gw.settings.answer_deadline_s
    return DeadlineStreamingResponse(events(), deadline, media_type=SSE_MEDIA_TYPE,
                                     headers={"X-Battle-Id": battle["battle_id"],
                                              "Cache-Control": "no-cache"})


@router.post("/v1/battles", response_model=None, responses=BATTLE_RESPONSES)
async def create_battle(body: BattleRequest, request: Request):
    gw = gateway_state(request)
    session = request.scope["state"]["session"]
    await gw.limiter.check("battles", *rate_subjects(request.scope),
                           gw.settings.rate_battle_per_session, gw.settings.rate_battle_per_ip)
    messages = text_messages(body.messages, gw.settings)
    record_a, record_b = await choose_versions(gw)
    battle = {
        "battle_id": uuid.uuid4().hex, "session": session, "created_at": time.time(),
        "voter_address": gw.voter_address(request.scope),
        "model_a": record_a.id, "model_b": record_b.id,
        "conversation_a": [dict(m) for m in messages],
        "conversation_b": [dict(m) for m in messages],
    }
    gw.metrics.requests.labels("battle", BATTLE_VERSION).inc()
    return await _run_turn(gw, battle, [record_a, record_b],
                           _sampling(gw, body.max_tokens), body.stream)


@router.post("/v1/battles/{battle_id}/messages", response_model=None,
             responses={**BATTLE_RESPONSES, **error_responses(403, 409)})
async def continue_battle(battle_id: str, body: FollowUpRequest, request: Request):
    gw = gateway_state(request)
    session = request.scope["state"]["session"]
    await gw.limiter.check("battles", *rate_subjects(request.scope),
                           gw.settings.rate_battle_per_session, gw.settings.rate_battle_per_ip)
    await _load_battle(gw, battle_id, session)  # 404 / 403 before touching it
    await _begin_turn(gw, battle_id)  # from here on no vote and no other turn until saved
    battle = await _load_battle(gw, battle_id, session)
    previous = json.loads(json.dumps(battle))
    try:
        records = [await gw.versions.resolve(battle["model_a"]),
                   await gw.versions.resolve(battle["model_b"])]
        for side in "ab":
            battle[f"conversation_{side}"].append({"role": "user", "content": body.content})
        check_caps(battle["conversation_a"], gw.settings,
                   sent_from=len(battle["conversation_a"]) - 1)
    except APIError as error:
        await _save_battle(gw, previous)
        if error.code == "model_not_found":  # its message would name the version
            raise APIError(409, "One of this battle's models is no longer served; vote on "
                                "these answers or start a new battle.",
                           "battle_model_retired") from None
        raise
    return await _run_turn(gw, battle, records, _sampling(gw, body.max_tokens), body.stream,
                           previous)

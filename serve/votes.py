"""POST /v1/battles/{battle_id}/vote — the hot path of the arena, as a plain ASGI endpoint.

Every battle ends in one vote, and a crowd votes in bursts, so this route skips what the
other routes pay for (pydantic request models, dependency solving, response encoding):
it reads a tiny JSON body, runs one Redis script (rate limits, battle, session, once-only
guard, XADD; feedback/vote_stream.py) and answers with the reveal. 2xx only after the vote
is in the stream. Being no FastAPI route, it is put in the OpenAPI document from
`openapi_router` (serve/app.py), which describes it and is never mounted.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from feedback.vote_record import WINNERS
from feedback.vote_stream import VoteKeys
from serve.battles import BATTLE_KEY, NOT_FOUND_MESSAGE, VOTED_KEY, WRONG_SESSION_MESSAGE
from serve.bodies import parse_json
from serve.errors import APIError, error_body, error_responses
from serve.rate_limit import KEY_TTL_S, rate_limit_error, rate_subjects, window_keys
from serve.state import GatewayState

MAX_BODY_BYTES = 4096
JSON_HEADERS = [(b"content-type", b"application/json")]
OUTCOME_ERRORS = {
    404: ("battle_not_found", NOT_FOUND_MESSAGE),
    403: ("wrong_session", WRONG_SESSION_MESSAGE),
    425: ("battle_incomplete", "This battle's answers are not finished yet."),
    409: ("already_voted", "This battle already has a vote."),
}


class VoteRequest(BaseModel):
    winner: Literal[WINNERS]  # type: ignore[valid-type]


class VoteReveal(BaseModel):
    battle_id: str
    winner: Literal[WINNERS]  # type: ignore[valid-type]
    a_model: str
    b_model: str


openapi_router = APIRouter()


@openapi_router.post(
    "/v1/battles/{battle_id}/vote", response_model=VoteReveal,
    responses=error_responses(403, 404, 409, 413, 422, 429, 503),
    summary="Vote on a battle",
    description="The battle's session only, once; 200 once the vote is stored, with the "
                "reveal. 409 also while the answers are still being written.")
async def vote_documented(battle_id: str, body: VoteRequest) -> VoteReveal:
    """Never called: `VoteFastPath` answers this path before FastAPI's router."""
    raise NotImplementedError


class VoteFastPath:
    """ASGI middleware, just inside the session middleware: `POST /v1/battles/{id}/vote`
    goes straight to `vote`, past FastAPI's exception middleware, exit stacks and router
    (measured: a third of this route's CPU); every other request goes on to FastAPI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            parts = scope["path"].split("/")  # "", "v1", "battles", id, "vote"
            if len(parts) == 5 and parts[4] == "vote" and parts[1:3] == ["v1", "battles"]:
                if scope["method"] == "POST":
                    await vote(scope, receive, send, parts[3])
                else:
                    await _send_json(send, 405, error_body(
                        405, "Votes are cast with POST.", "method_not_allowed"),
                        {"Allow": "POST"})
                return
        await self.app(scope, receive, send)


async def vote(scope: Scope, receive: Receive, send: Send, battle_id: str) -> None:
    gw: GatewayState = scope["app"].state.gateway
    try:
        winner = _winner(await _read_body(receive))
        status, payload, headers = 200, await _accept(gw, scope, battle_id, winner), {}
        gw.metrics.votes.labels(winner).inc()
    except APIError as error:
        status, headers = error.status, error.headers
        payload = error_body(error.status, error.message, error.code, error.param)
        gw.metrics.errors.labels("vote", str(status)).inc()
    await _send_json(send, status, payload, headers)


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: dict[str, str]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": body})


async def _accept(gw: GatewayState, scope: Scope, battle_id: str, winner: str) -> dict[str, Any]:
    session: str = scope["state"]["session"]
    # One session counter is enough here: a vote without a cookie has no battle to vote on.
    sessions, ip = rate_subjects(scope)
    session_key, ip_key, retry_after = window_keys("votes", sessions[0], ip)
    settings = gw.settings
    try:
        outcome = await gw.vote_acceptor.accept(
            VoteKeys(battle=BATTLE_KEY.format(id=battle_id), voted=VOTED_KEY.format(id=battle_id),
                     session_rate=session_key, ip_rate=ip_key),
            battle_id, session, winner, settings.battle_ttl_s,  # type: ignore[arg-type]
            settings.rate_vote_per_session, settings.rate_vote_per_ip, KEY_TTL_S)
    except Exception as error:  # noqa: BLE001 - any Redis failure: not accepted, retry
        raise APIError(503, f"The vote could not be stored ({error}); please retry.",
                        "vote_store_unavailable", headers={"Retry-After": "2"}) from error
    if outcome.status == 429:
        who, limit = (("session", settings.rate_vote_per_session) if outcome.limited_by ==
                      "session" else ("IP address", settings.rate_vote_per_ip))
        raise rate_limit_error("votes", limit, who, retry_after)
    if outcome.status != 200:
        code, message = OUTCOME_ERRORS[outcome.status]
        # 425 is what the script says; clients see the usual 409 for "not now".
        raise APIError(409 if outcome.status == 425 else outcome.status,
                        message.format(id=battle_id), code)
    return {"battle_id": battle_id, "winner": winner,
            "a_model": outcome.model_a, "b_model": outcome.model_b}


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "The client disconnected before sending the body.",
                            "disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"A vote body is at most {MAX_BODY_BYTES} bytes: "
                                 '{"winner": "a" | "b" | "tie" | "both_bad"}.', "body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _winner(body: bytes) -> str:
    try:
        data = parse_json(body)  # strict: also refuses deep nesting instead of recursing
    except ValueError as error:
        raise APIError(422, f"Invalid request body: not JSON ({error}). Send "
                             '{"winner": "a" | "b" | "tie" | "both_bad"}.',
                        "invalid_body") from error
    winner = data.get("winner") if isinstance(data, dict) else None
    if winner not in WINNERS:
        raise APIError(422, f"Invalid request body: winner: must be one of {list(WINNERS)}, "
                             f"got {winner!r}.", "invalid_body", "winner")
    return winner

"""The voter scorer: a consumer group on the vote stream that keeps each voter's anomaly
score (feedback/voter_anomaly.py) up to date, vote by vote. A voter is a session, and also
the client address where the gateway knows it (VoteRecord.voters: behind a trusted proxy),
so a stuffer who takes a new session cookie for every vote still adds up.

In Redis: the outcome counts of every ordered pair as shown (`arena:voters:pairs`, the rates
a vote is scored against, counted after it is scored), each voter's running sums
(`arena:voter:{session}`, expiring VOTER_TTL_S after its last vote) and the scores
(`arena:voters:scores`, the MAX_TRACKED highest kept). Each vote changes them at most once:
the ids applied are remembered (`arena:voters:applied`, forgotten after the consumers' dedup
window), all under WATCH in one MULTI. The scores also go to the archive's `voters` table,
which the ratings refit and the reward model's vote loader read (settings `flagged_votes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from core.text import as_str
from feedback.archive import Archive
from feedback.vote_record import VoteRecord
from feedback.voter_anomaly import (
    OUTCOMES,
    VoterStats,
    add_vote,
    anomaly_score,
    is_flagged,
    outcome_rates,
)

PAIRS_KEY = "arena:voters:pairs"  # hash "model_a|model_b|outcome" -> votes
STATS_KEY = "arena:voter:{session}"  # a voter's sums: a session id or `address:<hash>`
SCORES_KEY = "arena:voters:scores"  # zset voter -> score
APPLIED_KEY = "arena:voters:applied"  # zset vote id -> when applied
VOTER_TTL_S = 30 * 86_400
MAX_TRACKED = 10_000
WATCH_RETRIES = 20


def _pair_field(model_a: str, model_b: str, outcome: str) -> str:
    return f"{model_a}|{model_b}|{outcome}"


def _words(record: VoteRecord) -> int:
    return sum(len(answer.split()) for answer in (record.answer_a, record.answer_b)
               if isinstance(answer, str))


def score_votes(client: redis.Redis, records: Sequence[VoteRecord]) -> dict[str, float]:
    """Apply each vote not applied before; returns the new score of each voter touched."""
    records = [r for r in records if r.counts]  # a flagged battle is no one's vote
    if not records:
        return {}
    ids = list(dict.fromkeys(r.vote_id for r in records))
    voters = list(dict.fromkeys(voter for r in records for voter in r.voters))
    stat_keys = [STATS_KEY.format(session=v) for v in voters]
    pair_fields = list(dict.fromkeys(
        _pair_field(a, b, o) for r in records for a, b in ((r.model_a, r.model_b),)
        for o in OUTCOMES))
    for _attempt in range(WATCH_RETRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(PAIRS_KEY, APPLIED_KEY, *stat_keys)
                seen = {i: s is not None for i, s in zip(ids, pipe.zmscore(APPLIED_KEY, ids),
                                                          strict=True)}
                pairs = {f: float(v) if v is not None else 0.0 for f, v in zip(
                    pair_fields, pipe.hmget(PAIRS_KEY, pair_fields), strict=True)}
                stats = {v: VoterStats(**json.loads(raw)) if raw else VoterStats()
                         for v, raw in zip(voters, pipe.mget(stat_keys), strict=True)}
                new_ids, changed = [], set()
                for record in records:
                    if seen[record.vote_id]:
                        continue
                    seen[record.vote_id] = True
                    new_ids.append(record.vote_id)
                    fields = [_pair_field(record.model_a, record.model_b, o) for o in OUTCOMES]
                    # A self-pair (two answers of one version, as on a fresh stack that
                    # serves only base) has honest rates too: mostly ties or an even split,
                    # against which a random clicker stands out.
                    rates = outcome_rates(*(pairs[f] for f in fields))
                    for voter in record.voters:
                        add_vote(stats[voter], record.winner, rates,
                                 record.voted_at - record.battle_created_at, _words(record),
                                 record.voted_at)
                        changed.add(voter)
                    pairs[_pair_field(record.model_a, record.model_b, record.winner)] += 1
                if not new_ids:
                    pipe.unwatch()
                    return {}
                scores = {s: anomaly_score(stats[s]) for s in changed}
                pipe.multi()
                pipe.hset(PAIRS_KEY, mapping={f: repr(v) for f, v in pairs.items()})
                for voter in changed:
                    pipe.set(STATS_KEY.format(session=voter),
                             json.dumps(stats[voter].to_dict()), ex=VOTER_TTL_S)
                pipe.zadd(SCORES_KEY, scores)
                pipe.zremrangebyrank(SCORES_KEY, 0, -MAX_TRACKED - 1)  # keep the highest
                pipe.zadd(APPLIED_KEY, dict.fromkeys(new_ids, time.time()))
                pipe.execute()
                return scores
            except redis.WatchError:
                continue
    raise RuntimeError(f"voter scores stayed contended for {WATCH_RETRIES} attempts")


def current_scores(client: redis.Redis, voters: Sequence[str]) -> dict[str, float]:
    """The stored scores of these voters (those that have one)."""
    unique = list(dict.fromkeys(voters))
    if not unique:
        return {}
    return {s: score for s, score in zip(unique, client.zmscore(SCORES_KEY, unique), strict=True)
            if score is not None}


def record_scores(client: redis.Redis, archive: Archive, scores: dict[str, float]) -> None:
    """Copy the scores to the archive (what the refit and the learner read)."""
    if not scores:
        return
    stats = client.mget([STATS_KEY.format(session=s) for s in scores])
    archive.upsert_voters([
        {"session": session, "score": score, "flagged": is_flagged(score),
         "votes": json.loads(raw)["votes"] if raw else 0, "updated_at": time.time()}
        for (session, score), raw in zip(scores.items(), stats, strict=True)])


async def top_voters(client: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The highest-scoring voters (sessions, `address:<hash>`) with their sums, for
    `GET /admin/voters` (`client`: a redis.asyncio.Redis)."""
    ranked = await client.zrevrange(SCORES_KEY, 0, max(limit, 1) - 1, withscores=True)
    if not ranked:
        return []
    raws = await client.mget([STATS_KEY.format(session=as_str(s)) for s, _ in ranked])
    return [{"session": as_str(session), "score": round(score, 3), "flagged": is_flagged(score),
             **(json.loads(raw) if raw else {})}
            for (session, score), raw in zip(ranked, raws, strict=True)]

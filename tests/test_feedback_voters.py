"""Anomalous voters (issue 14): the online score (pure logic) and the scorer on a real Redis
and archive: random and always-"a" voters are flagged, honest ones are not; flagged votes are
kept but leave the Bradley-Terry counts and the reward model's votes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import redis

from feedback.archive import Archive
from feedback.refit import archive_counts, refit_ratings
from feedback.vote_record import VoteRecord
from feedback.voter_anomaly import VoterStats, add_vote, anomaly_score, is_flagged, outcome_rates
from feedback.voter_scores import record_scores, score_votes
from learner.vote_source import ArchiveVoteSource

USER = [{"role": "user", "content": "Q?"}]


def votes_of(choose, n: int, rng: random.Random) -> VoterStats:
    """`n` votes on a lopsided pair (the favourite wins 70 %, loses 20 %, ties 10 % with the
    crowd), shown on a random side each time; choose(rng, favourite_side) -> winner."""
    stats = VoterStats()
    for i in range(n):
        side = rng.choice("ab")
        rates = outcome_rates(70, 20, 9, 1) if side == "a" else outcome_rates(20, 70, 9, 1)
        add_vote(stats, choose(rng, side), rates, reading_s=10.0, words=40,
                 voted_at=100.0 + 10 * i)
    return stats


def other(side: str) -> str:
    return "b" if side == "a" else "a"


def honest(rng: random.Random, favourite: str) -> str:
    return rng.choices([favourite, other(favourite), "tie", "both_bad"],
                       weights=[70, 20, 9, 1])[0]


def test_rates_need_an_established_pair():
    assert outcome_rates(10, 5, 0, 0) is None
    rates = outcome_rates(70, 20, 10, 0)
    assert rates is not None and abs(sum(rates) - 1) < 1e-12 and rates[0] > rates[1]


def test_honest_voters_are_not_flagged_and_stuffers_are():
    rng = random.Random(0)
    honest_scores = [anomaly_score(votes_of(honest, 40, rng)) for _ in range(300)]
    assert sum(is_flagged(s) for s in honest_scores) <= 3  # p < 0.001 each
    buttons = ["a", "b", "tie", "both_bad"]
    at_random = [anomaly_score(votes_of(lambda r, f: r.choice(buttons), 40, rng))
                 for _ in range(20)]
    against = [anomaly_score(votes_of(lambda r, f: other(f), 40, rng)) for _ in range(20)]
    always_a = [anomaly_score(votes_of(lambda r, f: "a", 40, rng)) for _ in range(20)]
    assert all(is_flagged(s) for s in against + always_a)
    assert sum(is_flagged(s) for s in at_random) >= 16


def test_speed_and_bursts_only_add():
    rng = random.Random(1)
    stats = VoterStats()
    for i in range(40):  # instant votes, 0.1 s apart, on an even pair: fast but honest
        add_vote(stats, rng.choice(["a", "b"]), outcome_rates(50, 50, 0, 0), reading_s=0.01,
                 words=200, voted_at=100.0 + 0.1 * i)
    assert stats.fast == 40 and stats.bursts == 39
    slow = VoterStats(**{**stats.to_dict(), "fast": 0, "bursts": 0})
    assert anomaly_score(slow) < anomaly_score(stats) < anomaly_score(slow) + 0.51
    assert not is_flagged(anomaly_score(stats))


def record(i: int, session: str, model_a: str, model_b: str, winner: str,
           voter_address: str = "") -> VoteRecord:
    return VoteRecord(battle_id=f"{session}-{i}", model_a=model_a, model_b=model_b,
                      winner=winner, conversation_a=USER, conversation_b=USER,
                      answer_a="A.", answer_b="B.", session=session, battle_created_at=1.0,
                      voted_at=2.0 + i, voter_address=voter_address)


def score_in_batches(client: redis.Redis, records: list[VoteRecord]) -> dict[str, float]:
    """Score the votes as the consumer sees them: in batches of 100."""
    scores: dict[str, float] = {}
    for start in range(0, len(records), 100):
        scores.update(score_votes(client, records[start:start + 100]))
    return scores


def test_scorer_flags_stuffers_and_the_archive_leaves_their_votes_out(redis_url: str,
                                                                      tmp_path: Path):
    client = redis.Redis.from_url(redis_url)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    rng = random.Random(2)
    records = []
    for i in range(1200):  # 30 honest voters: policy-v1 beats base 3 times in 4
        v1_first = rng.random() < 0.5
        pair = ("policy-v1", "base") if v1_first else ("base", "policy-v1")
        v1_wins = rng.random() < 0.75
        winner = "a" if v1_wins == v1_first else "b"
        records.append(record(i, f"honest{i % 30}", *pair, winner))
    for i in range(40):  # then one voter who always says "a", one who always backs base
        pair = ("policy-v1", "base") if i % 2 else ("base", "policy-v1")
        records.append(record(2000 + i, "always-a", *pair, "a"))
        records.append(record(3000 + i, "contrarian", *pair, "a" if pair[0] == "base" else "b"))
    scores = score_in_batches(client, records)
    assert score_votes(client, records[:100]) == {}  # a redelivered batch changes nothing
    flagged = {s for s, score in scores.items() if is_flagged(score)}
    assert flagged == {"always-a", "contrarian"}

    # The archive keeps every vote; the ratings and the reward model leave the flagged out.
    archive.insert_votes(records)
    record_scores(client, archive, scores)
    assert set(archive.flagged_voters()) == flagged and archive.count() == 1280
    assert sum(r.n for r in archive.pair_counts()) == 1280
    assert sum(r.n for r in archive.pair_counts(flagged_voters=False)) == 1200
    light = archive_counts(archive, "downweight", 0.1)
    assert light.n_votes == pytest.approx(1200 + 0.1 * 80)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert len(ArchiveVoteSource(url, "exclude").votes()) == 1200
    assert len(ArchiveVoteSource(url, "keep").votes()) == 1280
    assert 1200 < len(ArchiveVoteSource(url, "downweight", 0.5).votes()) < 1280
    fit = refit_ratings(client, archive, rounds=10, flagged_votes="exclude")
    assert fit.n_votes == 1200


def test_scorer_scores_votes_on_a_self_pair(redis_url: str):
    """base against base (a fresh stack serves nothing else): honest voters tie 7 times in
    10 and split the rest evenly; a voter clicking any of the four buttons at random stands
    out against those rates (it once went unscored: self-pairs had no rates)."""
    client = redis.Redis.from_url(redis_url)
    rng = random.Random(3)
    honest = rng.choices(["tie", "a", "b"], weights=[7, 1.5, 1.5], k=600)
    records = [record(i, f"honest{i % 20}", "base", "base", w) for i, w in enumerate(honest)]
    records += [record(1000 + i, "random", "base", "base",
                       rng.choice(["a", "b", "tie", "both_bad"])) for i in range(40)]
    scores = score_in_batches(client, records)
    assert {s for s, score in scores.items() if is_flagged(score)} == {"random"}, scores


def test_a_stuffer_who_drops_the_cookie_adds_up_by_address(redis_url: str, tmp_path: Path):
    """A fresh session for every vote: no session ever has enough votes to be scored, but
    the address (known behind a trusted proxy) collects them all and is flagged; its votes
    leave the counts. 20 honest voters behind one shared address (a NAT) stay unflagged."""
    client = redis.Redis.from_url(redis_url)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    rng = random.Random(4)
    records = []
    for i in range(800):  # policy-v1 beats base 3 times in 4; a tenth of voters share a NAT
        v1_first = rng.random() < 0.5
        pair = ("policy-v1", "base") if v1_first else ("base", "policy-v1")
        winner = "a" if (rng.random() < 0.75) == v1_first else "b"
        address = "address:nat" if i % 10 == 0 else f"address:home{i % 40}"
        records.append(record(i, f"honest{i % 200}", *pair, winner, address))
    for i in range(40):  # always "a", each vote from a new session, one address
        pair = ("policy-v1", "base") if i % 2 else ("base", "policy-v1")
        records.append(record(2000 + i, f"fresh{i}", *pair, "a", "address:stuffer"))
    scores = score_in_batches(client, records)
    flagged = {voter for voter, score in scores.items() if is_flagged(score)}
    assert flagged == {"address:stuffer"}, sorted(scores.items(), key=lambda kv: -kv[1])[:5]

    archive.insert_votes(records)
    record_scores(client, archive, scores)
    assert archive.count() == 840
    assert sum(r.n for r in archive.pair_counts(flagged_voters=False)) == 800
    kept = ArchiveVoteSource(f"sqlite:///{tmp_path / 'a.db'}", "exclude").votes()
    assert len(kept) == 800 and not any(r.voter_address == "address:stuffer" for r in kept)


def votes_cast(url: str, redis_url: str, forwarded_for: list[str]) -> list[VoteRecord]:
    """One battle and vote per address, each from its own session (a new client), through
    a proxy that names that address; the vote records as they reach the stream."""
    import httpx

    from feedback.vote_stream import VOTES_STREAM

    for address in forwarded_for:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"X-Forwarded-For": address}) as http:
            battle = http.post("/v1/battles", json={"messages": USER, "max_tokens": 2})
            assert battle.status_code == 200, battle.text
            vote = http.post(f"/v1/battles/{battle.json()['battle_id']}/vote",
                             json={"winner": "tie"})
            assert vote.status_code == 200, vote.text
    stream = redis.Redis.from_url(redis_url).xrange(VOTES_STREAM)
    return [VoteRecord.from_json(fields[b"record"]) for _, fields in stream][-len(forwarded_for):]


def test_votes_carry_a_hashed_address_only_behind_a_trusted_proxy(gateway_settings):
    from conftest import GatewayServer

    addresses = ["203.0.113.7", "203.0.113.7", "198.51.100.9", "2001:db8::1", "2001:db8::2"]
    proxied = gateway_settings.model_copy(update={"trusted_proxies": ["127.0.0.0/8"]})
    for settings, trusted in ((proxied, True), (gateway_settings, False)):
        server = GatewayServer(settings)
        try:
            records = votes_cast(server.url, settings.effective_redis_url, addresses)
        finally:
            server.stop()
        hashed = [r.voter_address for r in records]
        if not trusted:  # no proxy configured: every visitor would share its address
            assert hashed == [""] * 5
            continue
        assert len({r.session for r in records}) == 5  # five sessions ...
        assert hashed[0] == hashed[1] and hashed[3] == hashed[4]  # ... one address, one /64
        assert len(set(hashed)) == 3 and all(h.startswith("address:") for h in hashed)
        assert not any(a in h for a in addresses for h in hashed)  # no raw address kept
        assert all(r.voters == (r.session, r.voter_address) for r in records)


def test_operators_see_the_flagged_voters(settings):
    import httpx

    from conftest import GatewayServer

    client = redis.Redis.from_url(settings.effective_redis_url)
    pair = [("policy-v1", "base"), ("base", "policy-v1")]
    honest_votes = [record(i, f"h{i % 5}", *pair[i % 2], "a" if i % 2 == 0 else "b")
                    for i in range(200)]  # policy-v1 always wins, whichever side
    stuffed = [record(500 + i, "stuffer", *pair[i % 2], "a") for i in range(30)]
    score_votes(client, honest_votes)
    score_votes(client, stuffed)
    server = GatewayServer(settings.model_copy(update={"vllm_urls": ["http://127.0.0.1:9"],
                                                       "replica_sync_interval_s": 3600.0}))
    try:
        assert httpx.get(f"{server.url}/admin/voters").status_code == 401
        listed = httpx.get(f"{server.url}/admin/voters", headers={
            "Authorization": "Bearer test-admin-token"}).json()
    finally:
        server.stop()
    rows = {row["session"]: row for row in listed["data"]}
    assert listed["data"][0]["session"] == "stuffer" and rows["stuffer"]["flagged"]
    assert rows["stuffer"]["side_a"] == rows["stuffer"]["decisive"] == 30  # what it is made of
    assert not any(rows[f"h{i}"]["flagged"] for i in range(5))
    assert listed["flagged_votes"] == "exclude"

"""The simulated crowd (crowd/): prompt sets, judges, the pure parts of the crowd and of the
evaluation, then both against the real servers: head-to-head on the session vLLM server, and a
crowd of voters against a live gateway whose votes are checked in the stream and archive."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from arena.cli import app
from core.settings import Settings
from crowd.evaluate import (
    EvalError,
    evaluations_path,
    head_to_head,
    record_evaluation,
    shown_swapped,
    tally,
    unswap,
    wilson_interval,
)
from crowd.judges import (
    checked_verdict,
    get_judge,
    key_noun,
    key_noun_judge,
    mentions,
    noisy,
    shorter,
)
from crowd.prompts import load_prompts, parse_prompts
from crowd.simulate import (
    BattleBudget,
    CrowdError,
    CrowdPlan,
    Tally,
    backoff_s,
    check_loopback,
    choose_action,
    decided_policies,
    policy_states,
    run_crowd,
    simulate,
)
from feedback.archive import Archive
from feedback.consumers import Archiver, consumer_config
from feedback.vote_record import VoteRecord
from feedback.vote_stream import CHATS_STREAM, VOTES_STREAM

ASK = [{"role": "user", "content": "What do koalas eat?"}]


# --- prompt sets ----------------------------------------------------------------------------
def _normalized(prompts: list[str]) -> set[str]:
    return {p.strip().lower() for p in prompts}


def test_prompt_sets_are_disjoint_from_each_other_and_from_the_learner_prompts():
    crowd, heldout = load_prompts(which="crowd"), load_prompts(which="heldout")
    learner = parse_prompts(resources.files("learner").joinpath("data", "prompts.txt")
                            .read_text(encoding="utf-8"))
    assert len(crowd) >= 140 and len(heldout) >= 75 and len(learner) > 100
    assert len(_normalized(crowd)) == len(crowd) and len(_normalized(heldout)) == len(heldout)
    assert not _normalized(crowd) & _normalized(heldout)
    assert not _normalized(crowd) & _normalized(learner)
    assert not _normalized(heldout) & _normalized(learner)
    # Most carry a topic noun the key_noun judge can look for.
    with_noun = [p for p in crowd + heldout if key_noun(p) is not None]
    assert len(with_noun) >= 0.9 * len(crowd + heldout)


def test_load_prompts_from_a_file_skips_comments_and_blank_lines(tmp_path: Path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\n\n  What is C#?  \n# another comment\nWhy?\n")
    assert load_prompts(path) == ["What is C#?", "Why?"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts(which="other")  # type: ignore[arg-type]


# --- judges ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("question", "noun"), [
    ("What do koalas eat?", "koalas"),
    ("How does a refrigerator keep food cold?", "refrigerator"),
    ("Give me a tip for growing tomatoes.", "tomatoes"),
    ("Please explain it to me.", None),
])
def test_key_noun_is_the_longest_content_word(question: str, noun: str | None):
    assert key_noun(question) == noun


def test_mentions_counts_singular_and_plural_whole_words_only():
    assert mentions("A koala eats eucalyptus.", "koalas")
    assert mentions("Tomatoes like sun.", "tomato")
    assert mentions("KOALAS sleep a lot.", "koalas")
    assert not mentions("Bears eat honey.", "koalas")
    assert not mentions("The superfridge hums.", "fridge")  # not inside another word


def test_key_noun_judge_prefers_the_answer_that_mentions_the_topic():
    rng = random.Random(0)
    assert key_noun_judge(ASK, "They eat leaves.", "Koalas eat eucalyptus.", rng) == "b"
    assert key_noun_judge(ASK, "A koala eats leaves.", "No idea.", rng) == "a"
    assert key_noun_judge(ASK, "No idea.", "Ask someone.", rng) == "tie"


def test_key_noun_then_longer_lets_length_decide_only_where_the_topic_ties():
    rng = random.Random(0)
    judge = get_judge("key_noun_then_longer")
    # the topic first, even against a much longer answer
    assert judge(ASK, "Koalas eat leaves.", "No idea at all, ask someone who knows it.",
                 rng) == "a"
    # equal mentions: the longer answer; equal lengths: a tie
    assert judge(ASK, "No idea.", "No idea at all, ask someone who knows it.", rng) == "b"
    assert judge(ASK, "Koalas eat leaves all day long.", "Koalas eat.", rng) == "a"
    assert judge(ASK, "No idea.", "No clue.", rng) == "tie"


def test_noisy_flips_about_a_tenth_of_the_verdicts():
    always_a = noisy(lambda messages, a, b, rng: "a", 0.1)
    rng = random.Random(7)
    verdicts = Counter(always_a(ASK, "x", "y", rng) for _ in range(2000))
    assert set(verdicts) == {"a", "b"}
    assert 0.08 <= verdicts["b"] / 2000 <= 0.12
    ties = Counter(noisy(lambda m, a, b, r: "tie", 0.5)(ASK, "x", "y", rng) for _ in range(400))
    assert 0.35 <= (ties["a"] + ties["b"]) / 400 <= 0.65  # a flipped tie picks a side


def test_get_judge_builtins_noisy_and_importable_functions():
    assert get_judge("key_noun") is key_noun_judge
    assert get_judge("shorter") is shorter
    rng = random.Random(3)
    noisy_judge = get_judge("shorter_noisy")
    verdicts = Counter(noisy_judge(ASK, "short", "a much longer answer", rng) for _ in range(500))
    assert 0.8 <= verdicts["a"] / 500 <= 0.97 and verdicts["b"] > 0
    assert get_judge("no_banned:sure")(ASK, "Sure, leaves.", "Leaves.", rng) == "b"
    mine = get_judge("crowd_judges_example:prefers_first")
    assert mine.__name__ == "prefers_first" and mine(ASK, "x", "y", rng) == "a"


@pytest.mark.parametrize("name", ["nonsense", "crowd_judges_example:missing",
                                  "no_such_module_xyz:judge", "crowd_judges_example:NOT_A_JUDGE"])
def test_get_judge_refuses_unknown_names(name: str):
    with pytest.raises(ValueError):
        get_judge(name)


def test_checked_verdict_refuses_a_judge_that_answers_something_else():
    with pytest.raises(ValueError, match="maybe"):
        checked_verdict(get_judge("crowd_judges_example:says_maybe"), ASK, "x", "y",
                        random.Random(0))


# --- the crowd's pure parts -----------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.8.7", "http://localhost:1",
                                 "https://LOCALHOST", "http://[::1]:8000"])
def test_loopback_urls_are_accepted(url: str):
    assert check_loopback(url) == url


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://[2001:db8::1]", "ftp://127.0.0.1", "not a url"])
def test_other_urls_are_refused(url: str):
    with pytest.raises(CrowdError):
        check_loopback(url)
    with pytest.raises(CrowdError):
        CrowdPlan(url=url)


def test_simulate_cli_refuses_a_non_loopback_url():
    result = CliRunner().invoke(app, ["simulate", "--url", "http://192.0.2.10:8000",
                                      "--battles", "1"])
    assert result.exit_code == 2
    assert "only talks to a gateway on this machine" in result.output


def test_choose_action_budget_backoff_and_tally():
    rng = random.Random(5)
    actions = Counter(choose_action(rng, 0.25) for _ in range(4000))
    assert 0.22 <= actions["chat"] / 4000 <= 0.28
    assert choose_action(random.Random(1), 0.0) == "battle"
    budget = BattleBudget(2)
    assert [budget.claim(), budget.claim(), budget.claim()] == [True, True, False]
    assert budget.exhausted
    assert backoff_s(1) == 0.5 and backoff_s(3) == 2.0 and backoff_s(50) == 30.0
    assert backoff_s(1, "7") == 7.0 and backoff_s(1, "600") == 30.0
    assert backoff_s(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 1.0
    t = Tally()
    t.vote("b1", 200)
    t.vote("b2", 409)
    t.vote("b3", 200)
    assert (t.votes_accepted, t.votes_cast, t.accepted_battle_ids) == (2, 3, ["b1", "b3"])
    assert t.votes_refused == {409: 1}
    for i in range(8):
        t.error(f"e{i}")
    assert t.errors == 8 and len(t.error_samples) == 5


def test_decided_policies():
    models = {"data": [{"id": "base", "state": "current"}, {"id": "policy-v1", "state": "current"},
                       {"id": "policy-v3", "state": "candidate"},
                       {"id": "policy-v4", "state": "rejected"},
                       {"id": "current", "state": "alias"}]}
    listed = policy_states(models)
    assert listed == {"policy-v1": "current", "policy-v3": "candidate", "policy-v4": "rejected"}
    # policy-v2 was a candidate earlier and is no longer listed: it was retired.
    assert decided_policies(listed, {"policy-v2", "policy-v3"}) == {"policy-v1", "policy-v2",
                                                                     "policy-v4"}


def test_crowd_plan_is_checked():
    url = "http://127.0.0.1:1"
    for bad in ({"voters": 0}, {"chat_share": 1.0}, {"timeout_s": 0}, {"until_decided": 0},
                {"voters": 2, "stuffers": 3}):
        with pytest.raises(CrowdError):
            CrowdPlan(url=url, **bad)


def test_a_crowd_facing_no_server_counts_errors_and_stops():
    """Nothing listens on the port: every request is refused; the crowd backs off, counts
    the errors, stops at max_errors and never raises."""
    from testkit.net import free_port

    plan = CrowdPlan(url=f"http://127.0.0.1:{free_port()}", voters=2, battles=50,
                     timeout_s=20, max_errors=6)
    summary = simulate(plan, key_noun_judge, ["What do koalas eat?"])
    assert summary.stopped == "errors"
    assert summary.errors >= 6 and summary.votes_accepted == summary.battles_created == 0
    assert "ConnectError" in summary.error_samples[0]


# --- the evaluation's pure parts ------------------------------------------------------------
def test_wilson_interval_and_tally():
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and high - low == pytest.approx(2 * (0.5 - low))
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] < high - low
    result = tally("m", "o", "j", ["a", "a", "a", "b", "tie", "both_bad"], 1.0)
    assert (result.n, result.wins, result.losses, result.ties, result.both_bad) == (6, 3, 1, 1, 1)
    assert result.win_rate == pytest.approx(4 / 6)
    assert 0 <= result.ci_low <= result.win_rate <= result.ci_high <= 1
    assert unswap("a", True) == "b" and unswap("tie", True) == "tie" and unswap("a", False) == "a"


# --- head-to-head on the session vLLM server ------------------------------------------------
@pytest.fixture
def vllm_settings(settings: Settings, vllm_server) -> Settings:
    return settings.model_copy(update={"vllm_urls": [vllm_server.url]})


def test_head_to_head_counts_and_interval(vllm_settings: Settings):
    prompts = load_prompts(which="heldout")[:10]
    result = head_to_head(vllm_settings, "base", "base", get_judge("key_noun_noisy"), prompts,
                          seed=3, max_tokens=6, samples_per_prompt=2)
    assert (result.model, result.against, result.n) == ("base", "base", 20)
    assert result.wins + result.losses + result.ties + result.both_bad == 20
    assert 0 <= result.ci_low <= result.win_rate <= result.ci_high <= 1
    assert result.win_rate == pytest.approx(
        (result.wins + 0.5 * (result.ties + result.both_bad)) / 20)
    assert result.seconds > 0
    assert set(result.to_dict()) == {"model", "against", "judge", "n", "wins", "losses", "ties",
                                     "both_bad", "win_rate", "ci_low", "ci_high", "seconds"}


def test_head_to_head_shows_answers_in_a_seeded_random_order(vllm_settings: Settings):
    """A judge that always picks the first answer wins for `model` exactly when `model` was
    shown first: about half the time, never all or nothing."""
    prompts = load_prompts(which="heldout")[:20]
    result = head_to_head(vllm_settings, "base", "base",
                          get_judge("crowd_judges_example:prefers_first"), prompts, seed=11,
                          max_tokens=2, samples_per_prompt=2)
    shown_first = sum(not shown_swapped(11, p, s) for p in prompts for s in range(2))
    assert (result.wins, result.losses, result.n) == (shown_first, 40 - shown_first, 40)
    assert 0.3 <= result.win_rate <= 0.7
    assert result.ci_low < 0.5 < result.ci_high


def test_head_to_head_samples_both_models_with_the_same_seed(vllm_settings: Settings):
    """The same model with the same seed per (prompt, sample) answers the same text."""
    prompts = load_prompts(which="heldout")[:6]
    result = head_to_head(vllm_settings, "base", "base",
                          get_judge("crowd_judges_example:same_or_first"), prompts, seed=2,
                          max_tokens=8)
    assert result.ties == result.n == 6


def test_head_to_head_unknown_model_is_a_clear_error(vllm_settings: Settings):
    with pytest.raises(EvalError, match="policy-v99"):
        head_to_head(vllm_settings, "policy-v99", "base", key_noun_judge, ["Why?"], max_tokens=2)


def test_head_to_head_of_a_retired_version_loads_it_for_the_evaluation_only(
        vllm_settings: Settings, registry, two_policies: list[str], vllm_server):
    """A rejected (retired) candidate is no longer served; the evaluation loads its adapter
    under a name of its own and unloads it afterwards."""
    registry.retire(two_policies[0], actor="test")
    for _ in range(2):  # loaded, unloaded, loaded again: still its own weights, not the base's
        result = head_to_head(vllm_settings, two_policies[0], "base",
                              get_judge("crowd_judges_example:same_or_first"),
                              load_prompts(which="heldout")[:6], seed=5, max_tokens=8)
        assert result.n == 6 and result.model == two_policies[0]
        assert result.ties < 3, result  # the same text as the base's would be a tie
    served = {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]}
    assert not any(name.startswith("eval-") for name in served), served


def test_evaluate_cli_prints_the_result_and_records_it(vllm_settings: Settings):
    env = {"ARENA_VLLM_URLS": json.dumps(vllm_settings.vllm_urls),
           "ARENA_DATA_DIR": str(vllm_settings.data_dir)}
    result = CliRunner().invoke(app, ["evaluate", "--model", "base", "--against", "base",
                                      "--judge", "shorter", "--prompts", "3", "--max-tokens", "3",
                                      "--samples-per-prompt", "2", "--record"], env=env)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert (printed["model"], printed["against"], printed["n"]) == ("base", "base", 6)
    recorded = json.loads(evaluations_path(vllm_settings).read_text())
    assert {k: v for k, v in recorded.items() if k != "ts"} == printed


def test_record_evaluation_appends_json_lines(tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var")
    result = tally("policy-v1", "base", "key_noun", ["a", "b", "a"], 0.5)
    path = record_evaluation(settings, result)
    record_evaluation(settings, result)
    assert path == evaluations_path(settings) == settings.data_dir / "loop" / "evaluations.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert {k: v for k, v in lines[0].items() if k != "ts"} == result.to_dict()
    assert time.time() - 60 < lines[0]["ts"] <= lines[1]["ts"] <= time.time()


# --- a crowd against a live gateway ---------------------------------------------------------
def _archive_votes(settings: Settings, client: redis.Redis) -> list[str]:
    """Archive the vote stream as the archiver consumer does; the archived battle ids."""
    archive = Archive(f"sqlite:///{settings.data_dir / 'crowd-archive.db'}")
    try:
        archiver = Archiver(client, archive, consumer_config(settings))
        archiver.ensure_group()
        while archiver.run_once():
            pass
        return [stored.record.battle_id for stored in archive.iter_votes()]
    finally:
        archive.close()


def test_crowd_votes_through_the_public_api_and_every_accepted_vote_is_archived(
        gateway, gateway_settings: Settings):
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    plan = CrowdPlan(url=gateway.url, voters=3, battles=12, chat_share=0.25, seed=1,
                     max_tokens=4, timeout_s=120)
    summary = simulate(plan, get_judge("key_noun_noisy"), load_prompts())
    assert summary.stopped == "battles" and summary.errors == 0, summary.error_samples
    assert summary.battles_created == 12
    refused = sum(summary.votes_refused.values())
    assert summary.votes_accepted == 12 - refused
    assert len(set(summary.accepted_battle_ids)) == summary.votes_accepted
    records = [VoteRecord.from_json(fields[b"record"]) for _, fields in client.xrange(VOTES_STREAM)]
    assert sorted(r.battle_id for r in records) == sorted(summary.accepted_battle_ids)
    assert len({r.session for r in records}) == 3  # three people, three sessions
    crowd_prompts = set(load_prompts())
    assert all(r.conversation_a[0]["content"] in crowd_prompts for r in records)
    assert sorted(_archive_votes(gateway_settings, client)) == sorted(summary.accepted_battle_ids)
    # The chat turns reached the chat stream (the gateway adds them in the background).
    assert summary.chats > 0
    deadline = time.monotonic() + 5
    while client.xlen(CHATS_STREAM) < summary.chats and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.xlen(CHATS_STREAM) == summary.chats
    assert json.loads(json.dumps(summary.to_dict()))["votes_accepted"] == summary.votes_accepted


def test_simulate_cli_prints_the_summary_as_json(gateway, gateway_settings: Settings):
    result = CliRunner().invoke(app, ["simulate", "--url", gateway.url, "--voters", "2",
                                      "--battles", "3", "--max-tokens", "2", "--seed", "4",
                                      "--judge", "crowd_judges_example:prefers_first"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["votes_accepted"] == summary["battles_created"] == 3
    assert summary["judge"] == "prefers_first" and summary["voters"] == 2
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    records = [VoteRecord.from_json(fields[b"record"]) for _, fields in client.xrange(VOTES_STREAM)]
    assert sorted(r.battle_id for r in records) == sorted(summary["accepted_battle_ids"])
    assert {r.winner for r in records} == {"a"}


def test_stuffers_vote_with_their_own_judge_from_their_own_sessions(gateway,
                                                                   gateway_settings: Settings):
    """The anomaly defence's test crowd: the last voters vote with the stuffer judge, and the
    summary names their battles."""
    result = CliRunner().invoke(app, ["simulate", "--url", gateway.url, "--voters", "3",
                                      "--battles", "9", "--max-tokens", "2", "--seed", "5",
                                      "--judge", "always_a", "--stuffers", "1",
                                      "--stuffer-judge", "crowd_judges_example:prefers_second"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    stuffed = set(summary["stuffer_battle_ids"])
    assert stuffed and stuffed < set(summary["accepted_battle_ids"])
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    records = [VoteRecord.from_json(fields[b"record"]) for _, fields in client.xrange(VOTES_STREAM)]
    by_stuffer = [r for r in records if r.battle_id in stuffed]
    honest = [r for r in records if r.battle_id not in stuffed]
    assert len({r.session for r in by_stuffer}) == 1  # one stuffer, one session
    assert not {r.session for r in by_stuffer} & {r.session for r in honest}
    assert {r.winner for r in honest} == {"a"}
    assert {r.winner for r in by_stuffer} == {"b"}


def test_crowd_until_decided_stops_once_a_candidate_is_promoted(gateway, registry, two_policies):
    promoter = threading.Timer(1.0, registry.promote, args=("policy-v1",),
                               kwargs={"actor": "test"})
    promoter.start()
    try:
        plan = CrowdPlan(url=gateway.url, voters=2, battles=500, max_tokens=2, chat_share=0.0,
                         timeout_s=60, until_decided=1)
        started = time.monotonic()
        summary = simulate(plan, get_judge("shorter"), load_prompts())
    finally:
        promoter.cancel()
    assert summary.stopped == "decided" and summary.decided == ["policy-v1"]
    assert summary.votes_accepted < 500 and time.monotonic() - started < 30
    assert summary.errors == 0, summary.error_samples


def test_until_decided_counts_only_versions_decided_since_the_start(gateway, registry,
                                                                     two_policies):
    """policy-v1 is current before the crowd starts: not counted. Promoting policy-v2 makes
    v1 a candidate again and decides v2: the one counted."""
    registry.promote("policy-v1", actor="test")
    promoter = threading.Timer(0.5, registry.promote, args=("policy-v2",),
                               kwargs={"actor": "test"})
    promoter.start()
    try:
        plan = CrowdPlan(url=gateway.url, voters=1, battles=500, max_tokens=2, chat_share=0.0,
                         timeout_s=30, until_decided=1)
        summary = simulate(plan, get_judge("shorter"), load_prompts())
    finally:
        promoter.cancel()
    assert summary.stopped == "decided" and summary.decided == ["policy-v2"]


def test_a_promoted_version_stays_decided_when_the_next_is_promoted(gateway, registry,
                                                                    two_policies):
    """v1 is promoted, seen current, then demoted to candidate by v2's promotion: both
    count (the crowd looks at /v1/models every DECIDED_POLL_S = 3 s)."""
    timers = [threading.Timer(0.5, registry.promote, args=("policy-v1",),
                              kwargs={"actor": "test"}),
              threading.Timer(4.5, registry.promote, args=("policy-v2",),
                              kwargs={"actor": "test"})]
    for timer in timers:
        timer.start()
    try:
        plan = CrowdPlan(url=gateway.url, voters=1, battles=500, max_tokens=2, chat_share=0.0,
                         timeout_s=30, until_decided=2)
        summary = simulate(plan, get_judge("shorter"), load_prompts())
    finally:
        for timer in timers:
            timer.cancel()
    assert summary.stopped == "decided" and summary.decided == ["policy-v1", "policy-v2"]


def test_pause_while_learning_holds_the_voters_while_an_iteration_runs(
        gateway, gateway_settings: Settings):
    """The iteration lock is held (GET /admin/learner reports it running) for the first
    ~3 s: no battle starts before it is released; a refused token stops the crowd."""
    from learner.trigger import LOCK_KEY

    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    client.set(LOCK_KEY, "a-running-iteration")
    released: list[float] = []

    def release() -> None:
        released.append(time.time())
        client.delete(LOCK_KEY)

    timer = threading.Timer(3.0, release)
    timer.start()
    try:
        plan = CrowdPlan(url=gateway.url, voters=2, battles=4, max_tokens=2, chat_share=0.0,
                         timeout_s=30, pause_while_learning=True,
                         admin_token="test-admin-token")
        summary = simulate(plan, get_judge("shorter"), load_prompts())
    finally:
        timer.cancel()
    assert summary.stopped == "battles" and summary.errors == 0, summary.error_samples
    assert summary.votes_accepted == 4 and summary.learning_s >= 2.0
    records = [VoteRecord.from_json(fields[b"record"]) for _, fields in client.xrange(VOTES_STREAM)]
    assert len(records) == 4 and min(r.battle_created_at for r in records) >= released[0]

    refused = simulate(CrowdPlan(url=gateway.url, voters=1, battles=4, max_tokens=2,
                                 timeout_s=30, pause_while_learning=True, admin_token="wrong"),
                       get_judge("shorter"), load_prompts())
    assert refused.stopped == "errors" and refused.battles_created == 0
    assert "admin token was refused" in refused.error_samples[0]


def test_crowd_stops_at_its_timeout(gateway):
    import asyncio

    plan = CrowdPlan(url=gateway.url, voters=2, battles=10_000, max_tokens=2, timeout_s=1.5)
    started = time.monotonic()
    summary = asyncio.run(run_crowd(plan, key_noun_judge, load_prompts()))
    assert summary.stopped == "timeout" and 0 < summary.votes_accepted < 10_000
    assert time.monotonic() - started < 1.5 + 6

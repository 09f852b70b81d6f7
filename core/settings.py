"""The one typed settings object of rlhf-arena.

Every process builds it once (`Settings()` reads `ARENA_*` variables and an optional `.env`)
and passes it down; nothing deeper reads the environment. Paths that default to places
inside the data dir are resolved by the `*_path` / `*_url` properties, so changing
`ARENA_DATA_DIR` moves everything at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_FIELDS = ("admin_token", "session_secret")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ARENA_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(Path("./var"), description="Models, versions, logs, Redis AOF, archive.")
    base_model: Path | None = Field(
        None, description="Local HF folder of the frozen base model (default <data dir>/models/base)."
    )

    # --- Redis ---------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="Use this Redis; unset = the launcher runs its own with AOF in the data dir."
    )
    redis_port: int = Field(6390, description="Port of the Redis the launcher runs itself.")
    redis_appendfsync: Literal["always", "everysec", "no"] = Field(
        "always", description="AOF fsync policy of our own Redis (always = no accepted vote lost)."
    )
    allow_volatile_redis: bool = Field(
        False, description="Let the gateway start on a Redis that can lose accepted votes (no AOF, an evicting maxmemory-policy, or CONFIG refused)."
    )

    # --- topology: how many of each part `arena up` runs on this host (docs/deploy.md) ------
    gateways: int = Field(1, ge=1, description="Gateway processes, on gateway_port, gateway_port+1, … (a load balancer in front spreads users over them).")
    vllm_replicas: int = Field(1, ge=1, description="vLLM replicas the launcher starts when ARENA_VLLM_URLS is empty, on vllm_port, vllm_port+1, …")
    workers: int = Field(1, ge=1, description="Learner Celery workers (one task each; only one iteration runs at a time, another worker takes over a dead one's task).")
    consumer_processes: int = Field(1, ge=1, description="Feedback consumer processes; each joins every consumer group, so they share the streams.")

    # --- gateway -------------------------------------------------------------------------
    gateway_host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(8000, description="Port of the (first) gateway (the URL users open).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for operator actions (generated into the data dir if unset; empty is refused)."
    )
    metrics_token: SecretStr | None = Field(
        None, description="If set, GET /metrics needs 'Authorization: Bearer <token>' (Prometheus' scrape `authorization`); unset: open."
    )
    session_secret: SecretStr | None = Field(
        None, description="Key that signs the arena_session cookie (generated if unset; empty is refused)."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for one read from a model server (a whole answer that is not streamed)."
    )
    answer_deadline_s: float = Field(
        600.0, gt=0, description="Total time one chat answer may take, streamed or not (a client that stops reading is cut off then)."
    )
    upstream_max_connections: int = Field(
        512, ge=1, description="Connections the gateway opens to the model servers, all replicas together."
    )
    upstream_pool_timeout_s: float = Field(
        5.0, gt=0, description="How long a request waits for a free upstream connection before 503."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the gateway reads; larger ones get 413."
    )
    max_messages: int = Field(256, ge=1, description="Messages one chat request or battle may carry.")
    max_message_chars: int = Field(
        32_768, ge=1, description="Characters one message may carry (its text parts joined)."
    )

    # --- serve: battles, rate limits ---------------------------------------------------
    battle_ttl_s: int = Field(24 * 3600, description="How long a battle can be voted on.")
    battle_max_tokens: int = Field(256, description="Default answer length in a battle.")
    battle_temperature: float = Field(0.8, description="Sampling temperature of battle answers.")
    flagged_votes: Literal["exclude", "downweight", "keep"] = Field(
        "exclude", description="Votes of sessions the voter scorer flags: left out of the Bradley-Terry fit and the reward model's data, down-weighted (flagged_vote_weight), or kept; always archived."
    )
    flagged_vote_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="Weight of a flagged session's vote with flagged_votes=downweight (the reward model keeps that share of them)."
    )
    identity_words: list[str] = Field(
        default_factory=list, description="Words that name a model (JSON list); a battle whose answers contain one, or a version id, is flagged and its vote left out of ratings and training."
    )
    rate_chat_per_session: int = Field(120, description="Chat requests/minute/session (0 = off).")
    rate_chat_per_ip: int = Field(1200, description="Chat requests/minute/IP (0 = off).")
    rate_battle_per_session: int = Field(60, description="Battles/minute/session (0 = off).")
    rate_battle_per_ip: int = Field(600, description="Battles/minute/IP (0 = off).")
    rate_vote_per_session: int = Field(120, description="Votes/minute/session (0 = off).")
    rate_vote_per_ip: int = Field(6000, description="Votes/minute/IP (0 = off).")
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list, description="Proxies (CIDRs, JSON list) whose X-Forwarded-For names the client; from any other peer it is ignored."
    )
    chats_stream_maxlen: int = Field(1_000_000, description="Chat turns kept in the stream.")
    matchmaker_target_ci_width: float = Field(50.0, description="CI width (rating points) "
                                              "below which a version counts as established.")
    matchmaker_min_battles: int = Field(300, description="Below this a version gets exposure.")
    matchmaker_new_boost: float = Field(4.0, description="Pair weight multiplier for new versions.")
    matchmaker_uniform_mix: float = Field(0.2, description="Share of uniform pair sampling.")
    worker_check_interval_s: float = Field(10.0, description="How often /healthz pings Celery.")

    # --- vLLM ----------------------------------------------------------------------------
    vllm_port: int = Field(8100, description="Port of the (first) vLLM replica the launcher starts.")
    vllm_urls: list[str] = Field(
        default_factory=list,
        description="Base URLs of vLLM replicas (JSON list); empty = the ones the launcher starts.",
    )
    vllm_dtype: str = Field("auto", description="vLLM --dtype; auto: bfloat16 on a CPU with native bf16 (AVX512-BF16/AMX, ~40 % faster than float32), float32 on other CPUs (bf16 is emulated there, several times slower), vLLM's own choice on a GPU.")
    vllm_kvcache_gib: int = Field(2, description="VLLM_CPU_KVCACHE_SPACE for the CPU build.")
    vllm_max_model_len: int = Field(2048, description="Context length; longer prompts get 400.")
    vllm_max_lora_rank: int = Field(16, description="Highest LoRA rank vLLM accepts; higher adapters are refused.")
    vllm_max_loras: int = Field(4, description="LoRA versions vLLM batches together (--max-loras).")
    vllm_extra_args: list[str] = Field(default_factory=list, description="Extra vLLM arguments (JSON list).")
    vllm_start_timeout_s: float = Field(300.0, description="How long the launcher waits for vLLM to answer.")
    merged_current: bool = Field(True, description="Serve the current policy version from its merged weights on a replica of its own (blue/green: started beside the LoRA replicas, traffic moved once healthy, the old one drained); the LoRA path serves it meanwhile and whenever that replica is down. Off: every version on the LoRA path.")
    merged_ports: list[int] = Field(default_factory=lambda: [8180, 8181], min_length=2, description="Ports the merged-weights replicas take turns on (JSON list of two or more: the next one starts while the last one serves).")
    merged_enforce_eager: bool | None = Field(None, description="Start merged replicas with vLLM's --enforce-eager; unset: on a CPU only (measured on SmolLM2: starts in 26 s instead of 71 s, and under load in minutes less, at 8 % fewer tokens/s), not on a GPU (CUDA graphs).")
    merged_drain_s: float = Field(120.0, gt=0, description="How long a merged replica that was replaced may finish its running answers before it is stopped.")

    # --- launcher: supervision -------------------------------------------------------------
    restart_backoff_s: float = Field(1.0, gt=0, description="Delay before the launcher restarts a process that died; doubles with each quick death.")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="Cap on that delay for a process that keeps dying.")
    restart_backoff_reset_s: float = Field(120.0, gt=0, description="A process that ran this long before dying is restarted after the first delay again.")

    # --- archive -------------------------------------------------------------------------
    archive_url: str | None = Field(
        None, description="SQLAlchemy URL of the preference archive (default SQLite in data dir)."
    )
    archive_chats: bool = Field(True, description="Archive prompts users send (feeds prompt pool).")

    # --- feedback ------------------------------------------------------------------------
    stream_claim_idle_ms: int = Field(
        30_000, description="A stream entry pending this long is re-claimed by a live consumer."
    )
    stream_max_deliveries: int = Field(
        5, description="Failed deliveries before an entry moves to the dead-letter stream."
    )
    stream_batch_size: int = Field(100, description="Entries one consumer reads per XREADGROUP.")
    stream_block_ms: int = Field(1000, description="How long an idle XREADGROUP waits.")
    stream_dead_letter_maxlen: int = Field(
        10_000, ge=1, description="Dead letters kept (the oldest beyond this are trimmed, approximately)."
    )
    stream_replay_window_s: int = Field(
        7 * 24 * 3600, ge=1, description="`arena dead-letters replay` re-queues only entries younger than this."
    )
    stream_dedup_ttl_s: int = Field(
        8 * 24 * 3600, ge=1, description="How long the ranker and learner trigger remember a vote id they counted (must exceed the replay window)."
    )
    elo_k: float = Field(4.0, description="Online Elo step per vote.")
    bt_bootstrap_rounds: int = Field(100, description="Bootstrap rounds of the Bradley-Terry CIs.")
    refit_every_s: float = Field(30.0, description="Seconds between Bradley-Terry refits.")
    learn_every_votes: int = Field(200, description="New votes that start a learner iteration.")

    # --- learner -------------------------------------------------------------------------
    learner_preset: Literal["tiny", "cpu", "cpu-length-control", "gpu"] = Field("cpu", description="Hyper-parameter preset: tiny (tests), cpu, cpu-length-control (the reward model discounts the crowd's length preference), gpu.")
    learner_threads: int = Field(1, description="torch threads for training (leave cores to serving).")
    learner_nice: int = Field(10, description="Niceness of the training worker process.")
    learner_votes_jsonl: Path | None = Field(
        None, description="Train on votes from this JSONL file of VoteRecord JSON, not the archive."
    )
    learner_reward_base_model: Path | None = Field(
        None, description="Base of the reward model (same tokenizer; default the policy's base)."
    )
    learner_rollout: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="PPO rollouts on vLLM (runtime LoRA) or transformers; auto: vLLM on a GPU if reachable, else transformers (faster on CPU)."
    )
    learner_vllm_url: str | None = Field(
        None, description="A dedicated vLLM for rollouts (default: the first serving replica)."
    )
    learner_lock_ttl_s: int = Field(
        3 * 3600, description="Expiry of the one-iteration-at-a-time Redis lock (renewed while it runs)."
    )
    learner_lease_s: int = Field(
        600, ge=1, description="How long a running iteration may go without renewing its lock before a re-delivery of its task may take over (the old run then stops, never publishing)."
    )
    learner_user_prompts: int = Field(500, description="Recent user prompts mixed into the PPO pool.")
    learner_ppo_steps: int | None = Field(None, description="Override the preset's PPO steps.")
    learner_processes: int = Field(
        1, ge=1, description="Training processes of each learner phase: above 1 the worker runs the reward model and PPO data-parallel (DDP) under `accelerate launch` (gloo on CPUs, NCCL on GPUs); PPO's rollout_batch and minibatch_size must divide by it."
    )
    learner_accelerate_config: Path | None = Field(
        None, description="An `accelerate` config file for those processes (configs/accelerate/: `multi-gpu.yaml` DDP, `fsdp.yaml` the weights sharded, FSDP2); default: DDP on this machine."
    )

    # --- deploy --------------------------------------------------------------------------
    admin_url: str | None = Field(
        None, description="Gateway URL the operator commands call (default: gateway host/port)."
    )
    replica_sync_interval_s: float = Field(
        3.0, description="How often the gateway checks each vLLM replica and loads live versions."
    )
    auto_promote: bool = Field(
        True, description="The loop decides learner candidates: promote once the lower CI bound beats current's rating, reject, roll back (off: an operator decides)."
    )
    loop_min_battles: int = Field(
        150, ge=1, description="Votes a learner candidate needs before it can be promoted."
    )
    loop_max_battles: int = Field(
        600, ge=1, description="Votes after which a learner candidate that has not qualified is rejected."
    )
    import_roots: list[Path] = Field(
        default_factory=list, description="Folders a checkpoint may be registered from (`arena register`, POST /admin/versions), after symlinks are resolved (JSON list); <data dir>/imports and the versions folder always count."
    )

    @field_validator(*SECRET_FIELDS)
    @classmethod
    def _refuse_empty_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # An empty token would let `Authorization: Bearer ` pass and anyone sign cookies.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(f"ARENA_{info.field_name.upper()} is set but empty: unset it to have "
                             "one generated into the data dir, or give it a value")
        return value

    @field_validator("stream_dedup_ttl_s")
    @classmethod
    def _dedup_outlives_replay(cls, value: int, info: ValidationInfo) -> int:
        # A replayed vote must find its id still remembered, or it would be counted twice.
        window = info.data.get("stream_replay_window_s")
        if window is not None and value <= window:
            raise ValueError(f"ARENA_STREAM_DEDUP_TTL_S ({value}) must exceed "
                             f"ARENA_STREAM_REPLAY_WINDOW_S ({window})")
        return value

    @model_validator(mode="after")
    def _ports_do_not_overlap(self) -> Settings:
        # Ranges of the parts the launcher starts: a clash would only show as a start failure.
        taken: dict[int, str] = {}
        parts = [("redis", [self.redis_port]), ("gateway", self.gateway_ports),
                 ("merged replica", self.merged_ports)]
        if not self.vllm_urls:
            parts.append(("vLLM replica", self.launched_vllm_ports))
        for part, ports in parts:
            for port in ports:
                if port in taken:
                    raise ValueError(f"port {port} is given to both the {taken[port]} and a "
                                     f"{part}: move ARENA_*_PORT(S) apart")
                taken[port] = part
        return self

    @property
    def gateway_ports(self) -> list[int]:
        return [self.gateway_port + i for i in range(self.gateways)]

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://{self.gateway_host}:{port}" for port in self.gateway_ports]

    @property
    def launched_vllm_ports(self) -> list[int]:
        return [self.vllm_port + i for i in range(self.vllm_replicas)]

    @property
    def base_model_path(self) -> Path:
        return self.base_model if self.base_model is not None else self.data_dir / "models" / "base"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def versions_dir(self) -> Path:
        return self.data_dir / "versions"

    @property
    def allowed_import_roots(self) -> list[Path]:
        """Where registration may copy from: the versions folder (the learner's own),
        <data dir>/imports, and `import_roots`; resolved (symlinks followed)."""
        roots = [self.versions_dir, self.data_dir / "imports", *self.import_roots]
        return [root.expanduser().resolve() for root in roots]

    @property
    def own_redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or self.own_redis_url

    @property
    def effective_vllm_urls(self) -> list[str]:
        return self.vllm_urls or [f"http://127.0.0.1:{port}" for port in self.launched_vllm_ports]

    @property
    def effective_archive_url(self) -> str:
        if self.archive_url:
            return self.archive_url
        return f"sqlite:///{(self.data_dir / 'archive.db').resolve()}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    def redacted(self) -> dict[str, object]:
        """Effective settings for display: secrets and URL passwords hidden."""
        shown: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                value = "<set>" if value is not None else "<generated in data dir>"
            shown[name] = value
        shown["base_model (effective)"] = self.base_model_path
        shown["redis (effective)"] = self.effective_redis_url
        shown["vllm replicas (effective)"] = self.effective_vllm_urls
        shown["archive (effective)"] = self.effective_archive_url
        return {name: _hide_url_password(value) for name, value in shown.items()}


def _hide_url_password(value: object) -> object:
    """scheme://user:password@host -> scheme://user:***@host, in strings and lists."""
    if isinstance(value, list):
        return [_hide_url_password(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", value)
    return value


def settings_environ(settings: Settings) -> dict[str, str]:
    """Every field set on `settings` as ARENA_<FIELD>, plus the values it resolved (data
    folder, Redis URL, base model): a child process building `Settings()` from them (and
    no .env file of its own) gets the same settings."""
    env = {f"ARENA_{name.upper()}": _env_value(getattr(settings, name))
           for name in sorted(settings.model_fields_set) if getattr(settings, name) is not None}
    env.update(ARENA_DATA_DIR=str(settings.data_dir.resolve()),
               ARENA_REDIS_URL=settings.effective_redis_url,
               ARENA_BASE_MODEL=str(settings.base_model_path.resolve()))
    return env


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)

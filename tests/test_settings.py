"""The settings object: env prefix, derived paths, redaction, generated secrets."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from core.secrets import ensure_secret
from core.settings import Settings


def test_env_prefix_and_derived_paths(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("ARENA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ARENA_VLLM_URLS", '["http://10.1.1.1:8100", "http://10.1.1.2:8100"]')
    monkeypatch.setenv("ARENA_GATEWAY_PORT", "9001")
    settings = Settings(_env_file=None)
    assert settings.base_model_path == tmp_path / "data" / "models" / "base"
    assert settings.effective_vllm_urls == ["http://10.1.1.1:8100", "http://10.1.1.2:8100"]
    assert settings.gateway_url == "http://127.0.0.1:9001"
    assert settings.effective_redis_url == f"redis://127.0.0.1:{settings.redis_port}/0"
    assert settings.effective_archive_url.startswith("sqlite:///")
    assert settings.effective_archive_url.endswith("data/archive.db")


def test_redacted_hides_secrets(tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path, admin_token="s3cret",
                        redis_url="redis://user:pw@host:1/0")
    shown = settings.redacted()
    text = repr(shown)
    assert "s3cret" not in text and "pw@" not in text
    assert shown["admin_token"] == "<set>"


def test_generated_secret_is_stable_and_private(tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    token, created = ensure_secret(settings, "admin_token")
    again, created_again = ensure_secret(settings, "admin_token")
    assert created and not created_again and token == again and len(token) >= 32
    mode = (tmp_path / "secrets" / "admin_token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_arena_config_prints_effective_settings(tmp_path: Path):
    env = dict(os.environ, ARENA_DATA_DIR=str(tmp_path), ARENA_ADMIN_TOKEN="hidden-value",
               COLUMNS="200")
    out = subprocess.run([sys.executable, "-m", "arena.cli", "config"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "gateway_port" in out and str(tmp_path) in out
    assert "hidden-value" not in out


def test_readme_documents_every_setting():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`ARENA_{name.upper()}`" not in readme]
    assert missing == [], f"README settings table lacks: {missing}"


def test_vllm_dtype_auto_follows_the_cpu(monkeypatch):
    from core import vllm_server
    from core.settings import Settings
    from core.vllm_server import serving_dtype, vllm_command

    monkeypatch.setattr(vllm_server, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(vllm_server, "cpu_has_bf16", lambda: False)
    assert serving_dtype("auto") == "float32"  # bf16 would be emulated: slower
    monkeypatch.setattr(vllm_server, "cpu_has_bf16", lambda: True)
    assert serving_dtype("auto") == "bfloat16"
    assert serving_dtype("float16") == "float16"  # an explicit choice is kept
    argv, _ = vllm_command(Settings(_env_file=None), vllm_server.Path("/m"), 8100)
    assert argv[argv.index("--dtype") + 1] == "bfloat16"


def test_settings_travel_to_a_child_process_unchanged(tmp_path, monkeypatch):
    """The environment the tests and benchmarks start the gateway and the worker with
    (testkit/processes.py) rebuilds the same settings there."""
    from pydantic import SecretStr

    from core.settings import Settings
    from testkit.processes import settings_env

    settings = Settings(_env_file=None, data_dir=tmp_path / "var", base_model=tmp_path / "m",
                        redis_url="redis://127.0.0.1:6390/2", admin_token="t0ken",
                        vllm_urls=["http://127.0.0.1:9001", "http://127.0.0.1:9002"],
                        import_roots=[tmp_path], trusted_proxies=["10.0.0.0/8"],
                        archive_chats=False, refit_every_s=1.5, learner_preset="tiny")
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    child = Settings(_env_file=None)
    assert child.model_dump() == settings.model_dump()
    assert isinstance(child.admin_token, SecretStr)
    assert child.admin_token.get_secret_value() == "t0ken"


def test_topology_ports_must_not_overlap():
    import pytest
    from pydantic import ValidationError

    from core.settings import Settings

    two = Settings(_env_file=None, gateways=2, vllm_replicas=3)
    assert two.gateway_urls == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    assert two.effective_vllm_urls == [f"http://127.0.0.1:{p}" for p in (8100, 8101, 8102)]
    with pytest.raises(ValidationError, match="port 8100 is given to both the gateway"):
        Settings(_env_file=None, gateway_port=8099, gateways=2)
    with pytest.raises(ValidationError, match="port 8180 is given to both"):
        Settings(_env_file=None, vllm_port=8180)
    # Replicas started elsewhere (ARENA_VLLM_URLS) take no port here.
    assert Settings(_env_file=None, vllm_port=8180, vllm_urls=["http://10.0.0.5:8180"])


def test_vllm_engines_on_one_machine_get_their_own_cores(monkeypatch, tmp_path):
    from arena.launcher import plan_processes
    from core import hardware
    from core.settings import Settings
    from core.vllm_server import vllm_command

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model=tmp_path)
    assert vllm_command(settings, tmp_path, 8100)[1]["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert hardware.core_shares(2) == ["0,1", "2,3"] and hardware.core_shares(5) is None
    two = settings.model_copy(update={"vllm_replicas": 2})
    binds = [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plan_processes(two)
             if p.name.startswith("vllm")]
    assert binds == ["0,1", "2,3"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # an operator's choice wins
    assert vllm_command(settings, tmp_path, 8101, omp_bind="0,1")[1][
        "VLLM_CPU_OMP_THREADS_BIND"] == "nobind"

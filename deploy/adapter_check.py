"""Will this LoRA adapter load into our vLLM replicas, on our base model? Checked on the files
alone (no torch, no model load) before a version is registered:

- it is a peft LoRA folder (adapter_config.json + adapter_model.safetensors) whose safetensors
  file is well formed;
- its rank is at most the servers' `--max-lora-rank` (settings.vllm_max_lora_rank);
- it was made for this base: every LoRA matrix fits the base weight it adapts (shapes read
  from the base's safetensors headers), and no layer lies beyond the base's layer count.
  When adapter_config.json names a base folder that exists here, its hidden size and layer
  count must match ours as well.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_MAX_HEADER_BYTES = 100 * 1024 * 1024

RefusalCode = Literal["checkpoint_missing", "checkpoint_corrupt", "checkpoint_incompatible",
                      "path_not_allowed"]


class AdapterRefused(ValueError):
    """The checkpoint is not registered; `code` says why (missing, corrupt, incompatible)."""

    def __init__(self, message: str, code: RefusalCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: list[str]
    base_model_name: str | None
    n_tensors: int


@dataclass(frozen=True)
class BaseShape:
    hidden_size: int | None
    num_layers: int | None
    weights: dict[str, tuple[int, ...]]

    def describe(self) -> str:
        return f"hidden size {self.hidden_size}, {self.num_layers} layers"


def _incompatible(message: str) -> AdapterRefused:
    return AdapterRefused(message, "checkpoint_incompatible")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, checking that the header is sound and
    that the tensors exactly cover the data that follows it (a truncated file fails)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterRefused(f"{path.name} is truncated (no safetensors header)",
                                 "checkpoint_corrupt")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterRefused(f"{path.name} has a bad safetensors header length",
                                 "checkpoint_corrupt")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as error:
            raise AdapterRefused(f"{path.name} has an unreadable safetensors header: {error}",
                                 "checkpoint_corrupt") from error
    if not isinstance(header, dict):
        raise AdapterRefused(f"{path.name}: safetensors header is not a JSON object",
                             "checkpoint_corrupt")
    header.pop("__metadata__", None)
    shapes: dict[str, tuple[int, ...]] = {}
    data_end = 0
    try:
        for name, info in header.items():
            shapes[name] = tuple(int(d) for d in info["shape"])
            data_end = max(data_end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise AdapterRefused(f"{path.name}: malformed safetensors tensor entry ({error})",
                             "checkpoint_corrupt") from error
    if data_end != size - 8 - header_len:
        raise AdapterRefused(f"{path.name} is truncated or padded: its tensors need {data_end} "
                             f"bytes of data, the file has {size - 8 - header_len}",
                             "checkpoint_corrupt")
    return shapes


def read_base_shape(base_dir: Path) -> BaseShape:
    """The base model's hidden size, layer count and weight shapes (safetensors headers)."""
    config = _read_json(base_dir / "config.json")
    config = config.get("text_config", config)  # multimodal configs nest the LM's
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        shard_names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [base_dir / name for name in shard_names]
    else:
        files = sorted(base_dir.glob("*.safetensors"))
    weights: dict[str, tuple[int, ...]] = {}
    for file in files:
        weights.update(safetensors_shapes(file))
    return BaseShape(config.get("hidden_size"), config.get("num_hidden_layers"), weights)


def check_adapter(folder: Path, base: BaseShape, max_rank: int) -> AdapterInfo:
    """Raise AdapterRefused unless the adapter in `folder` can be served on `base`."""
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterRefused(f"no {ADAPTER_CONFIG}: not a peft adapter folder (save one with "
                             "model.save_pretrained)", "checkpoint_missing")
    if not weights_path.is_file():
        hint = " (.bin found: save with safe_serialization=True)" if (
            folder / "adapter_model.bin").exists() else ""
        raise AdapterRefused(f"no {ADAPTER_WEIGHTS}{hint}", "checkpoint_missing")
    config = _read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise _incompatible(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                            "can be served")
    shapes = safetensors_shapes(weights_path)
    if not shapes:
        raise AdapterRefused(f"{ADAPTER_WEIGHTS} holds no tensors", "checkpoint_corrupt")

    rank = _rank(config, shapes)
    if rank > max_rank:
        raise _incompatible(f"LoRA rank {rank} is above the servers' maximum rank {max_rank} "
                            "(settings.vllm_max_lora_rank, vLLM --max-lora-rank)")
    _check_named_base(config.get("base_model_name_or_path"), base)
    for name, shape in sorted(shapes.items()):
        _check_tensor(name, shape, base)
    return AdapterInfo(rank=rank, target_modules=sorted(config.get("target_modules") or []),
                       base_model_name=config.get("base_model_name_or_path"),
                       n_tensors=len(shapes))


def _rank(config: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    declared = [int(config.get("r") or 0)]
    declared += [int(r) for r in (config.get("rank_pattern") or {}).values()]
    actual = [shape[0] for name, shape in shapes.items() if name.endswith("lora_A.weight")]
    actual += [shape[0] for name, shape in shapes.items() if name.endswith("lora_embedding_A")]
    return max(declared + actual)


def _check_named_base(name: str | None, base: BaseShape) -> None:
    """If the adapter names a base folder we can read, it must have our base's shape."""
    if not name or not (Path(name) / "config.json").is_file():
        return
    named = _read_json(Path(name) / "config.json")
    named = named.get("text_config", named)
    theirs = (named.get("hidden_size"), named.get("num_hidden_layers"))
    if None not in theirs and None not in (base.hidden_size, base.num_layers) and theirs != (
            base.hidden_size, base.num_layers):
        raise _incompatible(
            f"adapter was trained on {name} (hidden size {theirs[0]}, {theirs[1]} layers), "
            f"a different base from ours ({base.describe()})")


def _check_tensor(name: str, shape: tuple[int, ...], base: BaseShape) -> None:
    layer = _LAYER.search(name)
    if layer and base.num_layers is not None and int(layer.group(1)) >= base.num_layers:
        raise _incompatible(f"tensor {name} adapts layer {layer.group(1)}, but the base model "
                            f"has {base.num_layers} layers: made for a different base")
    module, kind = _split(name)
    base_shape = _base_weight(module, base)
    if len(shape) != 2 or base_shape is None or len(base_shape) != 2:
        raise _incompatible(f"tensor {name} adapts {module}, which the base model has no "
                            f"matrix weight for: made for a different base ({base.describe()})")
    out_features, in_features = base_shape
    expected = {
        "lora_A": (shape[0], in_features), "lora_B": (out_features, shape[1]),
        # embeddings: base weight is (vocab, hidden); A is (r, vocab), B is (hidden, r)
        "lora_embedding_A": (shape[0], out_features), "lora_embedding_B": (in_features, shape[1]),
    }[kind]
    if shape != expected:
        raise _incompatible(f"tensor {name} has shape {list(shape)} but the base weight of "
                            f"{module} is {list(base_shape)} (expected {list(expected)}): "
                            f"made for a different base ({base.describe()})")


def _split(name: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    -> ('model.layers.0.self_attn.q_proj', 'lora_A')."""
    stem = name.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    module, _, kind = stem.rpartition(".")
    if kind not in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        raise _incompatible(f"tensor {name} is not a LoRA matrix (modules_to_save, DoRA and "
                            "other extras cannot be served by vLLM)")
    return module, kind


def _base_weight(module: str, base: BaseShape) -> tuple[int, ...] | None:
    for key in (module, f"model.{module}", module.removeprefix("model.")):
        if f"{key}.weight" in base.weights:
            return base.weights[f"{key}.weight"]
    return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterRefused(f"{path.name} cannot be read: {error}", "checkpoint_corrupt") \
            from error
    if not isinstance(value, dict):
        raise AdapterRefused(f"{path.name} is not a JSON object", "checkpoint_corrupt")
    return value

"""Merging a version's adapter into full weights (deploy/merge.py), on the tiny model: the merged
folder computes what base + adapter computes, is a complete model folder, and a bad adapter
is refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.merge import MAX_LOGIT_DIFF, MergeError, merge_adapter, merge_in_child, read_info

pytestmark = pytest.mark.slow  # merges model weights


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_merged_weights_compute_base_plus_adapter(tiny_model_dir: Path,
                                                  lora_adapters: list[Path],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "merged" / "policy-v1"
    info = merge_adapter(tiny_model_dir, lora_adapters[0], out, "policy-v1", dtype="float32")
    assert read_info(out) == info and info.dtype == "float32"
    assert 0 <= info.max_logit_diff <= MAX_LOGIT_DIFF * max(1.0, info.max_logit)

    tokens = torch.tensor([[1, 532, 2834, 314, 253, 1911, 30]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = _logits(PeftModel.from_pretrained(base, lora_adapters[0]).eval(), tokens)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(),
                     tokens)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                         dtype=torch.float32).eval(), tokens)
    assert (merged - with_adapter).abs().max() < 1e-4
    assert (merged - plain).abs().max() > 1e-2  # the adapter is in there

    # a model folder vLLM can serve alone: tokenizer and chat template came along
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and len(tokenizer) == base.config.vocab_size
    assert not list(out.glob("adapter_*"))

    bf16 = merge_adapter(tiny_model_dir, lora_adapters[0], tmp_path / "bf16", "policy-v1",
                         dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))


def test_a_bad_adapter_is_refused_and_nothing_is_written(tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(MergeError, match="cannot load adapter"):
        merge_adapter(tiny_model_dir, broken, tmp_path / "merged" / "policy-v1", "policy-v1")
    assert not (tmp_path / "merged" / "policy-v1").exists()
    # The same in the child process the merged-replica manager runs it in, at a low priority.
    with pytest.raises(MergeError, match="refused"):
        merge_in_child(tiny_model_dir, broken, tmp_path / "merged" / "policy-v1", "policy-v1",
                       "float32", nice=10)
    assert not (tmp_path / "merged" / "policy-v1").exists()

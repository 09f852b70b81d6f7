"""A policy version as full weights: the base model with the version's LoRA adapter merged in,
W' = W + (alpha / r) · B·A on every adapted projection, written as a model folder vLLM serves
without LoRA (issue 16: an adapter in the batch costs vLLM's CPU build over half its speed).

The merged copy is the same version, so it must compute the same function: the merge runs in
float32 and is checked against the base + adapter on fixed token sequences before anything is
written (largest logit difference at most MAX_LOGIT_DIFF of the largest logit: float32 sums
taken in another order over 30 layers differ by ~1e-4 of it, a wrong merge by the size of
the adapter's effect); only then are the weights cast to the serving dtype. In bf16 the two
serving paths round differently (LoRA: bf16 W, then the bf16 delta added to the activations;
merged: W + BA rounded once), so greedy text may diverge after some tokens there; in float32
they agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("arena.merge")

MERGE_INFO = "merged.json"  # written last: a folder without it is unfinished
MAX_LOGIT_DIFF = 1e-3  # float32 merged vs base + adapter: largest |Δ logit| / largest |logit|
CHECK_SEQUENCES = 4  # random token sequences the check runs
CHECK_LENGTH = 24  # tokens each
REFUSED_EXIT = 3  # `python -m deploy.merge`'s exit code for a MergeError
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16",
                "float32": "float32", "float": "float32"}


class MergeError(Exception):
    """The adapter could not be merged, or the merged weights do not match it."""


@dataclass(frozen=True)
class MergeInfo:
    version: str
    adapter: str
    base_model: str
    dtype: str
    max_logit_diff: float  # float32 check, before the cast to `dtype`: largest |Δ logit|
    max_logit: float  # largest |logit| of base + adapter on the check's tokens
    seconds: float


def read_info(folder: Path) -> MergeInfo | None:
    """The merge record of a finished merged folder, or None (missing or unfinished)."""
    try:
        return MergeInfo(**json.loads((folder / MERGE_INFO).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def saved_dtype(model_dir: Path) -> str:
    """The dtype a model folder's weights were saved in (its config.json), float32 if unsaid."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return TORCH_DTYPES.get(str(named), "float32")


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, version: str,
                  dtype: str = "auto") -> MergeInfo:
    """Write base + adapter as one model to `out_dir` (replaced atomically) in `dtype`
    ("auto": the base's own dtype). Raises MergeError if the check fails."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.eval()
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except Exception as error:  # noqa: BLE001 - peft raises many kinds for a bad folder
        raise MergeError(f"cannot load adapter {adapter_dir} on {base_dir}: {error}") from error
    model.eval()

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.config.vocab_size, (CHECK_SEQUENCES, CHECK_LENGTH),
                           generator=generator)
    with torch.no_grad():
        adapter_logits = model(input_ids=tokens).logits
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=tokens).logits
    max_diff = float((adapter_logits - merged_logits).abs().max())
    max_logit = float(adapter_logits.abs().max())
    if not max_diff <= MAX_LOGIT_DIFF * max(1.0, max_logit):  # also catches NaN
        raise MergeError(f"{version}: merged weights differ from base + adapter by {max_diff:.2e} "
                         f"in the logits, largest logit {max_logit:.1f} (at most "
                         f"{MAX_LOGIT_DIFF:.0e} of it allowed)")

    target = TORCH_DTYPES.get(dtype) or saved_dtype(Path(base_dir))
    merged = merged.to(getattr(torch, target))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        for item in Path(base_dir).iterdir():  # tokenizer, chat template, generation config
            weights = item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json")
            if item.is_file() and not weights and not (staging / item.name).exists():
                shutil.copy2(item, staging / item.name)
        info = MergeInfo(version=version, adapter=str(adapter_dir), base_model=str(base_dir),
                         dtype=target, max_logit_diff=max_diff, max_logit=max_logit,
                         seconds=round(time.perf_counter() - started, 2))
        (staging / MERGE_INFO).write_text(json.dumps(asdict(info), indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("merged %s into full weights (%s) in %.1f s; float32 check: max |Δ logit| %.1e, "
             "largest logit %.1f", version, target, info.seconds, max_diff, max_logit)
    return info


def merge_in_child(base_dir: Path, adapter_dir: Path, out_dir: Path, version: str,
                   dtype: str, nice: int) -> MergeInfo:
    """`merge_adapter` in a child process at niceness `nice`: the merge takes the cores
    serving leaves idle instead of slowing the answers (its log lines go to our output)."""
    code = subprocess.run([sys.executable, "-m", "deploy.merge", "--nice", str(nice),
                           "--dtype", dtype, str(base_dir), str(adapter_dir), str(out_dir),
                           version]).returncode
    if code == REFUSED_EXIT:
        raise MergeError(f"{version}: the merge was refused (the reason is logged above)")
    if code != 0 or (info := read_info(out_dir)) is None:
        raise RuntimeError(f"the merge of {version} exited with code {code}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a version's LoRA adapter into the base.")
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("version")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--nice", type=int, default=0, help="niceness to run at")
    args = parser.parse_args(argv)
    os.nice(args.nice)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        merge_adapter(args.base_dir, args.adapter_dir, args.out_dir, args.version, args.dtype)
    except MergeError as error:
        log.error("%s", error)
        return REFUSED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

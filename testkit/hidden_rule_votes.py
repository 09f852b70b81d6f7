"""Synthetic votes from a fixed hidden rule, for tests and benchmarks.

The rule: an answer that contains the marker word beats one that does not; when both or
neither contain it the voter calls a tie (a few votes are both_bad). A reward model that
learns the rule must find one token anywhere in the answer: something even the tiny random
model can detect through attention.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from feedback.vote_record import VoteRecord

MARKER = " banana"
_WORD_LIST = (
    "the a of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large"
)
WORDS = tuple(_WORD_LIST.split())


def random_answer(rng: random.Random, with_marker: bool, min_words: int = 4,
                  max_words: int = 10, marker: str = MARKER) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    text = " ".join(words)
    if with_marker:
        cut = rng.randint(0, len(words))
        text = " ".join(words[:cut]) + marker + (" " + " ".join(words[cut:]) if words[cut:] else "")
        text = text.strip()
    return text.capitalize() + "."


def hidden_rule_votes(n: int, prompts: list[str], seed: int = 0, model: str = "base",
                      tie_share: float = 0.1, both_bad_share: float = 0.05,
                      start_time: float = 1_700_000_000.0,
                      marker: str = MARKER) -> list[VoteRecord]:
    """`n` votes between two samples of `model` (a self-pair, as at the cold start)."""
    rng = random.Random(seed)
    votes = []
    for i in range(n):
        prompt = rng.choice(prompts)
        conversation = [{"role": "user", "content": prompt}]
        roll = rng.random()
        if roll < both_bad_share:
            winner, a_marked, b_marked = "both_bad", False, False
        elif roll < both_bad_share + tie_share:
            marked = rng.random() < 0.5
            winner, a_marked, b_marked = "tie", marked, marked
        else:
            winner = rng.choice(["a", "b"])
            a_marked, b_marked = winner == "a", winner == "b"
        votes.append(VoteRecord(
            battle_id=str(uuid.UUID(int=rng.getrandbits(128))), model_a=model, model_b=model,
            winner=winner, conversation_a=conversation, conversation_b=conversation,
            answer_a=random_answer(rng, a_marked, marker=marker),
            answer_b=random_answer(rng, b_marked, marker=marker),
            session=f"s{i % 7}", battle_created_at=start_time + i,
            voted_at=start_time + i + 0.5,
        ))
    return votes


def sft_tiny_base(base_dir: Path, out_dir: Path, prompts: list[str], n: int = 512,
                  marker_share: float = 0.2, steps: int = 60, batch_size: int = 16,
                  lr: float = 2e-2, seed: int = 0, min_words: int = 4,
                  max_words: int = 10) -> Path:
    """A supervised fine-tune of the tiny random model on synthetic answers (full weights),
    saved as a new base folder: the "SFT model" PPO starts from in tests.

    The random tiny model's logits have a std of ~0.16 (embeddings N(0, 0.02)), so no LoRA
    on it can move its near-uniform distribution over 49k tokens; after this it writes
    short word sequences that contain the marker in about `marker_share` of answers, which
    gives PPO something to find."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.sequences import encode_answer, encode_prompt, pack

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()  # no dropout
    rows = []
    for _ in range(n):
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": rng.choice(prompts)}], 96)
        answer = encode_answer(tokenizer, random_answer(rng, rng.random() < marker_share,
                                                        min_words, max_words), 32)
        rows.append((prompt, answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    trunk, lm_head = model.get_decoder(), model.get_output_embeddings()
    for _ in range(steps):
        chunk = rng.sample(rows, batch_size)
        batch = pack([p for p, _ in chunk], [a for _, a in chunk], tokenizer.pad_token_id)
        hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).last_hidden_state
        logits = lm_head(hidden[:, batch.prompt_width - 1: -1])  # answer positions only
        token_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.responses.flatten(), reduction="none")
        loss = (token_loss * batch.response_mask.flatten()).sum() / batch.response_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

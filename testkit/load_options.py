"""The command-line options the serving benchmarks share: which model, and how much load."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with --model (an HF folder, or 'tiny') and the load: --concurrency requests
    at a time, --requests per round, --rounds, --max-tokens per answer."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "var/models/base"),
                        help="HF folder of the base model, or 'tiny'")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    return parser

"""Train a byte-level BPE tokenizer (Hugging Face tokenizers) on the captions of tar shards.

Captions are lowercased, as in the paper, whose vocabulary is 16,384. A small corpus may run out
of merges before reaching --vocab-size; the size reached is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.data.sources import expand_shards
from dalle_repro.data.tokenizer import save_tokenizer, train_from_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shards: a glob, brace pattern, comma list or list file")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size (default 16384)")
    p.add_argument("--min-frequency", type=int, default=2, help="a merge needs this many occurrences (default 2)")
    p.add_argument("--output", required=True, help="where to write tokenizer.json")
    a = p.parse_args(argv)
    if a.vocab_size < 257 or a.min_frequency < 1:
        p.error("--vocab-size must be >= 257 and --min-frequency >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        tok, stats = train_from_shards(expand_shards(a.shards), a.vocab_size, a.min_frequency)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_tokenizer(tok, a.output)
    print(json.dumps(stats))
    print(f"tokenizer written to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

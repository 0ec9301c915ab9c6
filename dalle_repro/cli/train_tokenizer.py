"""Train a byte-level BPE tokenizer (Hugging Face tokenizers) on the captions of tar shards.

Captions are lowercased, as in the paper, whose vocabulary is 16,384. A small corpus may run out
of merges before reaching --vocab-size (bpe.vocab_size); the size reached is printed. So are the
captions' lengths in tokens (median, p90, p99, max) and the text.text_len that fits 99% of them
whole, also written beside the tokenizer (tokenizer.json -> tokenizer.lengths.json).
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.files import atomic_write_text
from dalle_repro.data.sources import expand_shards
from dalle_repro.data.tokenizer import (
    BPEArgs,
    TrainTokenizerArgs,
    length_stats_path,
    save_tokenizer,
    train_from_shards,
)

FLAGS = flag_aliases(TrainTokenizerArgs) | flag_aliases(BPEArgs, "bpe.")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(TrainTokenizerArgs, argv, __doc__ or "", aliases=FLAGS)
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        tok, stats = train_from_shards(expand_shards(a.shards), a.bpe.vocab_size, a.bpe.min_frequency)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_tokenizer(tok, a.output)
    lengths = stats["caption_tokens"]
    stats_path = length_stats_path(a.output)
    atomic_write_text(stats_path, json.dumps(lengths, indent=2) + "\n")
    print(json.dumps(stats))
    print(
        f"caption length in tokens: median {lengths['median']:g}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
        f"max {lengths['max']}; text.text_len={lengths['suggested_text_len']} fits 99% of the captions whole"
    )
    print(f"wrote the tokenizer to {a.output} and its caption lengths to {stats_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pre-encode image shards into token shards (KEY.tokens, KEY.txt, KEY.json) with a trained dVAE.

The layout below the input shards' common folder is kept (train/ and val/ stay apart). Output
shards are written atomically; a rerun skips shards already encoded with the same dVAE, and
samples that fail to decode are skipped and counted in OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.data.pre_encode import encode_token_shards
from dalle_repro.data.sources import expand_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="a dVAE folder (config.yaml + model.safetensors)")
    p.add_argument("--shards", required=True, help="image shards: a glob, brace pattern, comma list or list file")
    p.add_argument("--output", required=True, help="folder for the token shards and summary.json")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    p.add_argument(
        "--device",
        default="cuda" if __import__("torch").cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when present)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace token shards that another dVAE made in --output")
    a = p.parse_args(argv)
    if a.batch_size <= 0:
        p.error(f"--batch-size must be > 0, got {a.batch_size}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = encode_token_shards(
            a.dvae, expand_shards(a.shards), a.output, a.batch_size, a.device, overwrite=a.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "grid", "vocab_size")}))
    print(f"token shards in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

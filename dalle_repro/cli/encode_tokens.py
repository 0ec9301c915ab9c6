"""Pre-encode image shards into token shards (KEY.tokens, KEY.txt, KEY.json) with a trained dVAE.

The layout below the input shards' common folder is kept (train/ and val/ stay apart). Output
shards are written atomically; a rerun skips shards already encoded with the same dVAE, and
samples that fail to decode are skipped and counted in OUTPUT/summary.json.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.data.pre_encode import EncodeArgs, encode_token_shards
from dalle_repro.data.sources import expand_shards


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(EncodeArgs, argv, __doc__ or "", aliases=flag_aliases(EncodeArgs))
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device = a.device
    if device == "auto":
        device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    try:
        summary = encode_token_shards(
            a.dvae, expand_shards(a.shards), a.output, a.batch_size, device, overwrite=a.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "grid", "vocab_size")}))
    print(f"wrote token shards and summary.json in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

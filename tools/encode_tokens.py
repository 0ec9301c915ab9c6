"""Pre-encode image shards into token shards (KEY.tokens, KEY.txt, KEY.json) with a trained dVAE.

A thin entry point: the command is ``dalle_repro.cli.encode_tokens`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.encode_tokens import main

if __name__ == "__main__":
    sys.exit(main())

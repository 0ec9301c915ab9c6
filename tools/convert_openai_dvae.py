"""Convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a dalle-repro model folder.

A thin entry point: the command is ``dalle_repro.cli.convert_openai_dvae`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.convert_openai_dvae import main

if __name__ == "__main__":
    sys.exit(main())

"""Write a folder of captioned pattern images (KEY.png + KEY.txt), to try the own-data steps on.

A thin entry point: the command is ``dalle_repro.cli.make_pattern_folder`` (``--help`` for its usage).
"""

import sys

from dalle_repro.cli.make_pattern_folder import main

if __name__ == "__main__":
    sys.exit(main())

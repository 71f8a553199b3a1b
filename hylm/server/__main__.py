"""`python -m hylm.server [MODEL_DIR] [options]`: the same as `hylm serve`."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

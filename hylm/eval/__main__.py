"""`python -m hylm.eval MODEL_DIR ...` (same flags as `hylm eval-tasks`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m hylm.train --config cfg.json --out DIR --steps N ...` (same flags as `hylm train`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

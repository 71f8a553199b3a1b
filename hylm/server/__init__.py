"""The OpenAI-compatible HTTP server: `hylm serve MODEL`.

Modules, one job each: `protocol` (request / response models), `state` (the loaded model, engine and chat
format one server holds), `serving` (chat and completion requests -> engine requests -> responses and SSE
streams), `metrics` (Prometheus collectors), `app` (the FastAPI app: routes, auth, size limit, errors) and
`launch` (sockets, uvicorn, the start-up line, graceful shutdown).

Importing this package is cheap; the heavy modules import FastAPI and torch.
"""

from __future__ import annotations

from pathlib import Path

# The model `hylm serve` uses when given none: the repository's bundled tiny model (once it exists).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "hylm-tiny"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

__all__ = ["DEFAULT_HOST", "DEFAULT_MODEL_DIR", "DEFAULT_PORT"]

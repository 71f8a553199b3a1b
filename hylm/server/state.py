"""What one server holds: the engine on its thread, the chat format, the names it answers to, its limits."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.chat_format import ChatFormat
from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from .metrics import ServerMetrics
from .tokens import TokenTexts

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerState:
    engine: AsyncEngine
    fmt: ChatFormat
    model_path: str
    model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0  # seconds the engine gets to finish what is left at shutdown
    retry_after: int = 1  # seconds, with 503 when the waiting queue is full
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("a server needs at least one model name")
        self.metrics = ServerMetrics(self.engine.engine)
        self.token_texts = TokenTexts(self.fmt.tokenizer)

    @property
    def llm_engine(self) -> LLMEngine:
        return self.engine.engine

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.sizes.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm_engine.model.config.vocab_size

    def describe(self) -> str:
        """Model, parameter count, dtype and the state pool: the start-up line's middle."""
        model = self.llm_engine.model
        n = sum(p.numel() for p in model.parameters())
        count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        dtype = str(model.dtype).removeprefix("torch.")
        return f"model {self.model_path} ({count} params, {dtype}), {self.llm_engine.sizes.describe()}"


def load_state(model_dir: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu",
               engine_config: EngineConfig | None = None, engine: LLMEngine | None = None,
               served_model_names: list[str] | None = None, max_waiting: int | None = DEFAULT_MAX_WAITING,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               shutdown_timeout: float = 30.0, seed: int = 0) -> ServerState:
    """Load a checkpoint directory (model, tokenizer, chat template) and start its engine thread. `engine`
    replaces the engine built from the checkpoint (tests use it to serve a rigged model)."""
    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json: the server needs the model's tokenizer")
    fmt = ChatFormat.from_dir(path)
    if engine is None:
        from ..loader import load_model

        model = load_model(path, dtype=dtype, device=device)
        engine = LLMEngine(model, engine_config or EngineConfig(), seed=seed)
    names = list(served_model_names or [path.resolve().name])
    return ServerState(AsyncEngine(engine, max_waiting=max_waiting), fmt, str(model_dir), names, api_key=api_key,
                       max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout)

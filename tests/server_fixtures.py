"""Helpers for the server tests: a tiny chat checkpoint built once per process, a real uvicorn server on a free
loopback port in a background thread, an engine whose outputs follow scripts, and an SSE reader."""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.server.launch import bind, make_server, url
from hylm.server.state import load_state

from engine_models import tiny_chat_checkpoint

_CHECKPOINTS: dict[int, Path] = {}


def chat_checkpoint(seed: int = 0) -> Path:
    """The tiny random chat checkpoint (model + tokenizer + template), built once per test process."""
    if seed not in _CHECKPOINTS:
        root = Path(tempfile.mkdtemp(prefix="hylm-server-"))
        atexit.register(shutil.rmtree, root, True)
        _CHECKPOINTS[seed] = tiny_chat_checkpoint(root / "tiny-chat", seed=seed)
    return _CHECKPOINTS[seed]


# ---------------------------------------------------------------------------------------------- scripts
THINK_CLOSE_ID = 13
EOS_ID = 11  # <|im_end|>

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]

SCRIPTS = {
    # name: (reasoning, content); a prompt containing "SCRIPT:<name>" (the last one counts) gets this output
    "tool": ("The user wants the weather. I should call the tool.",
             "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    "answer": ("The tool says it is sunny.", "It is sunny in Paris."),
    "long": ("\n".join(f"step {i} of the reasoning goes on" for i in range(40)), "Done."),
}


class ScriptedEngine(LLMEngine):
    """The engine, except that a request whose prompt contains `SCRIPT:<name>` writes SCRIPTS[name]: the
    reasoning (when the prompt opened it), `</think>`, the content, then <|im_end|>. A forced close of the reasoning
    (a thinking budget) skips to the content. Other requests are untouched."""

    def __init__(self, model, config, tokenizer, seed: int = 0):
        super().__init__(model, config, seed=seed)
        self.tok = tokenizer
        self.newline = tokenizer.encode("\n")

    def add_request(self, prompt_ids, params=None, request_id=None):
        rid = super().add_request(prompt_ids, params, request_id)
        text = self.tok.decode(prompt_ids, skip_special_tokens=False)
        names = re.findall(r"SCRIPT:(\w+)", text)
        if names and names[-1] in SCRIPTS:
            reasoning, content = SCRIPTS[names[-1]]
            in_thinking = text.rstrip().endswith("<think>")
            self.requests[rid].script = (self.tok.encode(reasoning + "\n") if in_thinking else None,
                                         self.tok.encode(content) + [EOS_ID])
        return rid

    def _next_scripted(self, r) -> int:
        reasoning, content = r.script
        out = r.output_ids
        if reasoning is None:
            pos = len(out)
        elif THINK_CLOSE_ID not in out:
            return reasoning[len(out)] if len(out) < len(reasoning) else THINK_CLOSE_ID
        else:
            after = len(out) - out.index(THINK_CLOSE_ID) - 1
            if after < len(self.newline):
                return self.newline[after]
            pos = after - len(self.newline)
        return content[pos] if pos < len(content) else EOS_ID

    def _apply_token_rules(self, logits, reqs):
        super()._apply_token_rules(logits, reqs)
        for j, r in enumerate(reqs):
            if getattr(r, "script", None) is not None:
                logits[j, self._next_scripted(r)] = logits[j].max() + 30.0


# ---------------------------------------------------------------------------------------------- server
class ServerThread:
    """A real uvicorn server on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, ckpt: Path | None = None, *, scripted: bool = False, max_num_seqs: int = 8,
                 max_model_len: int | None = 1024, shutdown_timeout: float = 5.0, prefix_caching: bool = False,
                 **state_kwargs):
        ckpt = ckpt or chat_checkpoint()
        engine = None
        if scripted:
            from hylm.chat.tokenizer import Tokenizer
            from hylm.loader import load_model

            engine = ScriptedEngine(load_model(ckpt), EngineConfig(max_num_seqs=max_num_seqs,
                                                                    max_model_len=max_model_len),
                                    Tokenizer.from_dir(ckpt))
        self.state = load_state(ckpt, engine=engine, shutdown_timeout=shutdown_timeout,
                                engine_config=EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                                           enable_prefix_caching=prefix_caching),
                                **state_kwargs)
        self.sock = bind("127.0.0.1", 0)
        self.url = url(self.sock)
        self.server = make_server(self.state, log_level="warning", access_log=False,
                                  shutdown_timeout=shutdown_timeout, log_config=None)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="test-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def engine(self) -> LLMEngine:
        return self.state.llm_engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until the engine has no request left (aborts travel through the engine thread's queue)."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() or self.engine.scheduler.waiting or self.engine.scheduler.running:
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy: {list(self.engine.requests)}")
            time.sleep(0.02)

    def assert_all_free(self) -> None:
        self.wait_idle()
        pool, sizes = self.engine.pool, self.engine.sizes
        assert pool.num_free_slots == sizes.num_slots, (pool.num_free_slots, sizes.num_slots)
        assert pool.num_free_blocks == sizes.num_blocks, (pool.num_free_blocks, sizes.num_blocks)


class ErrorLog(logging.Handler):
    """Collects ERROR records (and worse) of every logger while installed on the root logger."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "ErrorLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


def sse_events(lines) -> list:
    """`data:` payloads of an SSE stream (JSON-decoded; "[DONE]" kept as the string)."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric_value(text: str, name: str, labels: dict | None = None) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, lab = key.partition("{")
        if metric != name:
            continue
        got = ",".join(sorted(p for p in lab.rstrip("}").split(",") if p))
        if labels is None or got == want:
            total += float(value)
    return total


def greedy_offline(ckpt: Path):
    """The offline API on the same checkpoint, for comparing outputs."""
    from hylm.chat.chat_format import ChatFormat
    from hylm.engine.llm import LLM

    fmt = ChatFormat.from_dir(ckpt)
    return LLM(str(ckpt), tokenizer=fmt.tokenizer, max_model_len=1024), fmt


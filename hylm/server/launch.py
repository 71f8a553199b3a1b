"""Run a server: bind the socket, print the start-up line, serve with uvicorn, shut down gracefully.

The socket is bound before the start-up line is printed, so the line states the real address (port 0 picks a
free port). On SIGINT or SIGTERM the server stops accepting connections, lets in-flight requests finish for up
to `shutdown_timeout` seconds, then cancels what is left (each cancelled request is aborted in the engine) and
stops the engine; a second SIGINT quits at once.
"""

from __future__ import annotations

import socket
import sys

import uvicorn

from .app import build_app
from .state import ServerState


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def startup_line(state: ServerState, sock: socket.socket) -> str:
    names = ", ".join(state.model_names)
    return f"hylm serve: {state.describe()}; serving as {names}; listening on {url(sock)}"


class Server(uvicorn.Server):
    """uvicorn's server, saying when it starts to shut down, and exiting normally after a signal (uvicorn
    re-raises the signal once it is done, which would turn a clean SIGTERM shutdown into a kill)."""

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            print(f"hylm serve: shutting down (in-flight requests get up to "
                  f"{self.config.timeout_graceful_shutdown} s)", file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def make_server(state: ServerState, *, log_level: str = "info", access_log: bool = True,
                shutdown_timeout: float = 30.0, log_config: dict | None = uvicorn.config.LOGGING_CONFIG) -> Server:
    """A uvicorn server for `state` (log_config=None leaves the process's logging set-up alone)."""
    config = uvicorn.Config(build_app(state), log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5, log_config=log_config)
    return Server(config)


def serve(state: ServerState, host: str, port: int, *, log_level: str = "info", access_log: bool = True,
          shutdown_timeout: float = 30.0) -> int:
    sock = bind(host, port)
    server = make_server(state, log_level=log_level, access_log=access_log, shutdown_timeout=shutdown_timeout)
    print(startup_line(state, sock), flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.engine.shutdown(timeout=5.0, abort=True)  # no-op when the lifespan already stopped it
    return 0

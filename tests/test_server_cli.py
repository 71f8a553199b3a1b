"""`hylm serve` as a user runs it: the missing-model message, the start-up line, the API key, and a graceful
SIGTERM shutdown that lets a short request finish and aborts a long one after the grace period."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from server_fixtures import chat_checkpoint


def test_serve_without_model_says_one_line(monkeypatch, tmp_path, capsys):
    import hylm.server
    from hylm.cli import main

    assert hylm.server.DEFAULT_MODEL_DIR.parts[-2:] == ("models", "hylm-tiny")
    monkeypatch.setattr(hylm.server, "DEFAULT_MODEL_DIR", tmp_path / "models" / "hylm-tiny")
    assert main(["serve"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("hylm: error: a model is required")
    # other user errors are one line too
    for args, words in ((["serve", str(tmp_path)], "config.json"), (["serve", str(tmp_path / "nope")], "not a model"),
                        (["serve", str(chat_checkpoint()), "--max-num-seqs", "0"], "--max-num-seqs")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def _read_stream(r, out: dict) -> None:
    out["events"] = []
    try:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out["events"].append(line[6:])
    except httpx.HTTPError as e:  # the server cut the stream
        out["error"] = repr(e)


def test_serve_startup_auth_and_graceful_shutdown():
    ckpt = chat_checkpoint()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hylm.cli", "serve", str(ckpt), "--port", "0", "--api-key", "k3y",
                             "--served-model-name", "tiny", "--max-num-seqs", "2", "--max-model-len", "2048",
                             "--shutdown-timeout", "3", "--no-access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.match(r"hylm serve: model (\S+) \((\S+)M params, float32\), state pool: 2 sequence slots x .* KV blocks "
                     r".*max length 2048, total .* GiB; serving as tiny; listening on http://127\.0\.0\.1:(\d+)$",
                     line.strip())
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(3)}"
        auth = {"Authorization": "Bearer k3y"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"

        # one short and one very long request in flight, then SIGTERM
        body = {"model": "tiny", "prompt": "hello", "ignore_eos": True, "stream": True}
        short, long = {}, {}
        client = httpx.Client(base_url=url, headers=auth, timeout=60)
        threads = []
        for out, n in ((short, 60), (long, 1900)):
            r = client.send(client.build_request("POST", "/v1/completions", json={**body, "max_tokens": n}),
                            stream=True)
            assert r.status_code == 200
            threads.append(threading.Thread(target=_read_stream, args=(r, out)))
            threads[-1].start()
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
        elapsed = time.monotonic() - t0
        stderr = proc.stderr.read()
        assert rc == 0, stderr
        assert "shutting down" in stderr and "Traceback" not in stderr, stderr
        # the short one finished normally
        assert short["events"][-1] == "[DONE]" and "error" not in short
        assert json.loads(short["events"][-2])["choices"][0]["finish_reason"] == "length"
        # the long one was cut after the grace period (aborted, said so), and the process ended soon after
        assert long["events"][-1] == "[DONE]" and "error" not in long
        assert "shutting down" in json.loads(long["events"][-2])["error"]["message"]
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in long["events"][:-2])
        assert elapsed < 3 + 15, elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

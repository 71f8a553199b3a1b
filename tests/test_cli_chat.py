"""`hylm chat` driven through stdin: toggles, reasoning budget, clean exit and one-line errors."""

import subprocess
import sys

import pytest

from engine_models import tiny_chat_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def chat(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "hylm.cli", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_chat_session(ckpt):
    r = chat(ckpt, "--max-tokens", 12, "--reasoning-budget", 4, stdin="hello\n/nothink\nhi again\n/reset\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "thinking on" in r.stdout and "[thinking off]" in r.stdout and "[conversation cleared]" in r.stdout
    assert r.stdout.count("> ") >= 4


def test_chat_errors(ckpt, tmp_path):
    r = chat(ckpt, "--reasoning-budget", -1)
    assert r.returncode == 2 and "reasoning-budget" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    r = chat(tmp_path)
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr

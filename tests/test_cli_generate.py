"""`hylm generate` on a saved checkpoint: output equals the offline API's, errors are one line."""

import subprocess
import sys

import pytest

from hylm.engine.llm import LLM
from hylm.engine.sampling_params import SamplingParams
from hylm.weights import save_hf_checkpoint

from engine_models import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    save_hf_checkpoint(tiny_model(), d)
    return d


def hylm(*args):
    return subprocess.run([sys.executable, "-m", "hylm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_generate_matches_offline_api(ckpt):
    ref = LLM(str(ckpt)).generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    for extra in ([], ["--no-stream"]):
        r = hylm("generate", ckpt, "--prompt-ids", "5,6,7,8", "--max-tokens", 8, *extra)
        assert r.returncode == 0, r.stderr
        assert [int(t) for t in r.stdout.split()] == ref.token_ids
        assert f"finish_reason: {ref.finish_reason}" in r.stderr


CPU_NOTICE = "hylm: no CUDA GPU found: running the CPU paths"


def test_device_auto_falls_back_to_the_cpu_with_a_one_line_notice(ckpt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is available")
    r = hylm("generate", ckpt, "--prompt-ids", "5,6", "--max-tokens", 2)
    assert r.returncode == 0 and r.stderr.count(CPU_NOTICE) == 1
    r = hylm("generate", ckpt, "--prompt-ids", "5,6", "--max-tokens", 2, "--device", "cpu")
    assert r.returncode == 0 and CPU_NOTICE not in r.stderr
    r = hylm("generate", ckpt, "--prompt-ids", "5,6", "--device", "cuda")
    assert r.returncode == 2 and r.stderr.strip() == "hylm: error: --device cuda: no CUDA GPU is available (use --device cpu)"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hi"], "has no tokenizer (tokenizer.json"),
    (["--prompt-ids", "5,x"], "--prompt-ids: expected comma-separated integers"),
    (["--prompt-ids", "5", "--max-tokens", "9000", "--max-model-len", "64"], "exceeds the maximum model length of 64"),
    (["--prompt-ids", "5", "--top-p", "3"], "top_p"),
    (["--prompt-ids", "5", "--speculative-min-confidence", "1.5"], "speculative_min_confidence must be in [0, 1), got 1.5"),
])
def test_generate_errors_are_one_line(ckpt, args, message):
    r = hylm("generate", ckpt, *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    # one line for the error (on a machine without a GPU, the CPU-fallback notice may come before it)
    assert len([x for x in r.stderr.strip().splitlines() if not x.startswith(CPU_NOTICE)]) == 1

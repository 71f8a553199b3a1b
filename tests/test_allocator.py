"""The engine's heap settings (hylm/engine/allocator.py): after a warm-up, a prefill reuses the memory of the
previous one's temporaries instead of faulting fresh pages in, where glibc's defaults hand it back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from engine_models import TINY
    import hylm
    from hylm.engine.allocator import tune_process_allocator
    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.engine.sampling_params import SamplingParams
    config = TINY.replace(hidden_size=256, pattern="ME*E", mamba_num_heads=8, mamba_head_dim=32,
                          max_position_embeddings=4096)
    model = hylm.load_model(config, seed=0)
    import hylm.model.mamba2 as mamba2
    mamba2.native_step_enabled = False  # the PyTorch scan: chunk-sized temporaries of several MB, as larger models
    prompt = torch.randint(3, 256, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    def prefill_faults():
        eng = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=2100, max_num_batched_tokens=2048))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults = [prefill_faults() for _ in range(4)]
    print(int(tune_process_allocator()), min(faults[2:]))
""")


def _prefill_faults(tuning: str) -> tuple[bool, int]:
    env = dict(os.environ, HYLM_MALLOC_TUNING=tuning)
    script = SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    tuned, faults = out.stdout.split()
    return bool(int(tuned)), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_warm_prefill_reuses_memory_instead_of_faulting_it_in():
    untuned, faults_default = _prefill_faults("0")
    tuned, faults_tuned = _prefill_faults("1")
    assert not untuned
    if not tuned:
        pytest.skip("this libc has no mallopt")
    if faults_default < 1000:
        pytest.skip(f"this libc reuses the memory by itself ({faults_default} faults per prefill)")
    assert faults_tuned < faults_default / 10, (faults_tuned, faults_default)

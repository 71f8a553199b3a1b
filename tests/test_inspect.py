"""`hylm.stats.model_stats` and `hylm inspect`: checked against NVIDIA's published Nemotron 3 numbers
(REFERENCE.md section 1) and against transformers' own NemotronH parameter count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hylm.cli import main
from hylm.config import ModelConfig, preset
from hylm.stats import model_stats

SUPER = "nemotron-3-super-120b-a12b"
NANO = "nemotron-3-nano-30b-a3b"
ROOT = Path(__file__).resolve().parents[1]

# Published numbers (computed by NVIDIA/HF with transformers on the meta device; MTP excluded).
PUBLISHED = {
    SUPER: dict(total=120.669e9, active=12.770e9, kv=8192, layers={"mamba": 40, "moe": 40, "attention": 8, "mlp": 0}),
    NANO: dict(total=31.578e9, active=3.580e9, kv=6144, layers={"mamba": 23, "moe": 23, "attention": 6, "mlp": 0}),
}


@pytest.fixture(scope="module")
def stats():
    return {name: model_stats(preset(name)) for name in PUBLISHED}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_numbers(stats, name):
    s, ref = stats[name], PUBLISHED[name]
    assert s["total_params"] == pytest.approx(ref["total"], rel=1e-3)
    assert s["active_params"] == pytest.approx(ref["active"], rel=5e-3)
    assert s["kv_cache_bytes_per_token"] == ref["kv"]
    assert s["layers"] == ref["layers"]


def test_published_numbers_to_the_digits_printed(stats):
    # the published figures have 3 decimals in billions: ours must round to exactly those
    assert round(stats[SUPER]["total_params"] / 1e9, 3) == 120.669
    assert round(stats[SUPER]["active_params"] / 1e9, 3) == 12.770
    assert round(stats[NANO]["total_params"] / 1e9, 3) == 31.578
    assert round(stats[NANO]["active_params"] / 1e9, 3) == 3.580


def test_memory_sizes(stats):
    s = stats[SUPER]
    assert s["kv_cache_bytes_1m_tokens"] == 8 * 2**30  # 8 GiB at 1M tokens
    ssm = 40 * 128 * 64 * 128 * 4  # 160 MiB of fp32 SSM state
    assert ssm == 160 * 2**20
    conv = 40 * 3 * (8192 + 2 * 8 * 128) * 2  # (conv_kernel - 1) x conv_dim per Mamba layer, bf16
    assert s["ssm_state_bytes_per_sequence"] == ssm + conv
    nano_ssm = 23 * 64 * 64 * 128 * 4
    assert round(nano_ssm / 2**20) == 46
    assert stats[NANO]["ssm_state_bytes_per_sequence"] == nano_ssm + 23 * 3 * (4096 + 2 * 8 * 128) * 2


def test_breakdown_is_consistent(stats):
    for name, s in stats.items():
        assert sum(s["params_by_kind"].values()) == s["total_params"], name
        assert s["params_by_kind"]["embeddings"] == s["params_by_kind"]["lm_head"] == 131072 * s["config"]["hidden_size"]
        assert s["weight_bytes"]["bf16"] == 2 * s["total_params"]
        cfg = preset(name)
        assert s["weight_bytes"]["fp32"] == 4 * cfg.pattern.count("E") * cfg.n_routed_experts  # router biases
        assert s["weight_bytes_total"] == sum(s["weight_bytes"].values())
    assert stats[SUPER]["mtp_params"] > 0 and stats[NANO]["mtp_params"] == 0


def test_dtype_changes_byte_sizes_only():
    cfg = preset(NANO)
    bf16, fp32 = model_stats(cfg, torch.bfloat16), model_stats(cfg, "fp32")
    assert fp32["total_params"] == bf16["total_params"]
    assert fp32["kv_cache_bytes_per_token"] == 2 * bf16["kv_cache_bytes_per_token"]
    assert fp32["weight_bytes"] == {"fp32": 4 * fp32["total_params"] + bf16["weight_bytes"]["fp32"]}
    assert fp32["ssm_state_bytes_per_sequence"] > bf16["ssm_state_bytes_per_sequence"]


TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48)


@pytest.mark.parametrize("extra", [
    dict(pattern="M*E-ME", moe_latent_size=24, num_nextn_predict_layers=1, mtp_pattern="*E"),
    dict(pattern="MEM*E-", n_group=2, topk_group=1),
    # (not attention_bias: transformers 5.x builds q/k/v/o without bias whatever the config says)
    dict(pattern="-M*E", mlp_bias=True, use_bias=True, use_conv_bias=False, moe_latent_size=24),
], ids=["latent_mtp", "plain_moe", "biases"])
def test_total_matches_transformers(extra):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**TINY, **extra)
    with torch.device("meta"):
        hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg.to_hf_dict()))
    s = model_stats(cfg)
    assert s["total_params"] == sum(p.numel() for p in hf.parameters())  # transformers ignores MTP
    # active = total minus the unchosen routed experts, whose size we know from the config
    n_moe = cfg.pattern.count("E")
    per_expert = 2 * cfg.moe_input_size * cfg.moe_intermediate_size
    assert s["total_params"] - s["active_params"] == n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert


def test_mtp_params_counted_apart():
    cfg = ModelConfig(**TINY, pattern="M*E", moe_latent_size=24)
    with_mtp = model_stats(cfg.replace(num_nextn_predict_layers=1, mtp_pattern="*E"))
    without = model_stats(cfg)
    assert with_mtp["total_params"] == without["total_params"]
    assert with_mtp["mtp_params"] > 0 and without["mtp_params"] == 0


# ---- the command line -----------------------------------------------------------------------------------

def _run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "hylm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_json_subprocess():
    r = _run_cli("inspect", SUPER, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["total_params"] == pytest.approx(120.669e9, rel=1e-3)
    assert s["active_params"] == pytest.approx(12.770e9, rel=5e-3)
    assert s["kv_cache_bytes_per_token"] == 8192
    assert s["config"]["hidden_size"] == 4096


def test_cli_bad_preset_subprocess():
    r = _run_cli("inspect", "no-such-model")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hylm: error: ") and "no-such-model" in lines[0]
    assert r.stdout == ""


def test_cli_human_output(capsys):
    assert main(["inspect", NANO]) == 0
    out = capsys.readouterr().out
    for text in ("31.578 B", "3.580 B", "6144 B", "6.00 GiB", "mamba", "attention", "moe"):
        assert text in out, text


def test_cli_model_dir_and_dtype(tmp_path, capsys):
    cfg = ModelConfig(**TINY, pattern="M*E-")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert main(["inspect", str(tmp_path), "--json", "--dtype", "fp32"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s == json.loads(json.dumps(model_stats(cfg, torch.float32)))
    assert s["kv_cache_bytes_per_token"] == 1 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("content, needle", [
    (None, "no config.json"),
    ("{not json", "not valid JSON"),
    (json.dumps({"model_type": "llama"}), "model_type"),
    (json.dumps({"hybrid_override_pattern": "MX"}), "hybrid_override_pattern"),
    (json.dumps({"num_attention_heads": 6, "num_key_value_heads": 4}), "num_attention_heads"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    assert main(["inspect", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hylm: error: ") and needle in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_missing_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hylm: error: ") and err.count("\n") == 1

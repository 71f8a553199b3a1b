"""ModelConfig: parsing of HF `nemotron_h` config.json files (old and new spellings), validation errors that
name the field, the round trip through transformers' NemotronHConfig, and the presets' published dims."""

from __future__ import annotations

import json
import math

import pytest

from hylm.config import PRESETS, ConfigError, ModelConfig, preset

BASE = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
            conv_kernel=4, chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48)


def hf(**changes):
    """A config.json dict in the newer transformers spelling (layers_block_type list)."""
    d = dict(BASE, model_type="nemotron_h",
             layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"])
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


# ---- parsing --------------------------------------------------------------------------------------------

def test_pattern_string_and_list_agree():
    from_list = ModelConfig.from_hf_dict(hf())
    from_pattern = ModelConfig.from_hf_dict(hf(layers_block_type=None, hybrid_override_pattern="ME*-ME"))
    assert from_list == from_pattern
    assert from_list.pattern == "ME*-ME"
    assert from_list.num_hidden_layers == 6
    # the older names in lists, and transformers' `layer_types` alias
    old_names = ModelConfig.from_hf_dict(hf(layers_block_type=["mamba", "moe", "attention", "mlp", "mamba", "moe"]))
    alias = ModelConfig.from_hf_dict(hf(layers_block_type=None,
                                        layer_types=["linear_attention", "moe", "full_attention", "mlp",
                                                     "linear_attention", "moe"]))
    assert old_names == from_list == alias
    # both given and consistent: fine; both given and different: an error naming the pattern
    assert ModelConfig.from_hf_dict(hf(hybrid_override_pattern="ME*-ME")) == from_list
    with pytest.raises(ConfigError, match="hybrid_override_pattern"):
        ModelConfig.from_hf_dict(hf(hybrid_override_pattern="MM*-ME"))


def test_legacy_keys():
    legacy = hf(n_groups=None, conv_kernel=None, chunk_size=None, mamba_n_groups=4, mamba_d_conv=3, mamba_expand=2,
                mamba_dt_min=0.002, mamba_dt_max=0.2, mamba_dt_limit=[0.0, 0.5], mamba_conv_bias=False,
                mamba_chunk_size=16, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    cfg = ModelConfig.from_hf_dict(legacy)
    assert (cfg.n_groups, cfg.conv_kernel, cfg.chunk_size) == (4, 3, 16)
    assert (cfg.time_step_min, cfg.time_step_max, cfg.time_step_limit) == (0.002, 0.2, (0.0, 0.5))
    assert cfg.use_conv_bias is False
    assert cfg.mtp_pattern == "*E"
    # mamba_expand is implied by mamba_num_heads * mamba_head_dim: accepted, sizes unchanged
    assert cfg.mamba_d_inner == 8 * 16
    # the new spellings give the same config
    new = hf(n_groups=4, conv_kernel=3, chunk_size=16, time_step_min=0.002, time_step_max=0.2,
             time_step_limit=[0.0, 0.5], use_conv_bias=False, num_nextn_predict_layers=1,
             mtp_layers_block_type=["full_attention", "moe"])
    assert ModelConfig.from_hf_dict(new) == cfg


def test_time_step_limit_spellings():
    for spelled in ([0.0, "inf"], [0.0, {"__float__": "Infinity"}], [0, math.inf]):
        assert ModelConfig.from_hf_dict(hf(time_step_limit=spelled)).time_step_limit == (0.0, math.inf)
    with pytest.raises(ConfigError, match="time_step_limit"):
        ModelConfig.from_hf_dict(hf(time_step_limit=0.5))
    with pytest.raises(ConfigError, match="time_step_limit"):
        ModelConfig.from_hf_dict(hf(time_step_limit=[0.5, 0.1]))


def test_mtp_fields():
    assert ModelConfig.from_hf_dict(hf()).mtp_pattern == ""
    # transformers writes mtp_layers_block_type even for models without MTP layers: no MTP then
    assert ModelConfig.from_hf_dict(hf(mtp_layers_block_type=["full_attention", "moe"])).mtp_pattern == ""
    assert ModelConfig.from_hf_dict(hf(num_nextn_predict_layers=0, mtp_hybrid_override_pattern="*E")).mtp_pattern == ""
    # num_nextn_predict_layers without a pattern: transformers' default MTP block (attention, moe)
    cfg = ModelConfig.from_hf_dict(hf(num_nextn_predict_layers=1))
    assert (cfg.num_nextn_predict_layers, cfg.mtp_pattern) == (1, "*E")
    cfg = ModelConfig.from_hf_dict(hf(num_nextn_predict_layers=1, mtp_layers_block_type=["full_attention", "mlp"]))
    assert cfg.mtp_pattern == "*-"
    with pytest.raises(ConfigError, match="mtp_layers_block_type"):
        ModelConfig.from_hf_dict(hf(num_nextn_predict_layers=1, mtp_layers_block_type=["full_attention", "conv"]))
    with pytest.raises(ConfigError, match="mtp_hybrid_override_pattern"):
        ModelConfig.from_hf_dict(hf(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*X"))
    # MTP layers count toward validation: an attention-only MTP block checks the attention heads
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelConfig.from_hf_dict(hf(layers_block_type=["linear_attention"], num_nextn_predict_layers=1,
                                    mtp_hybrid_override_pattern="*E", num_attention_heads=3))


def test_latent_moe():
    cfg = ModelConfig.from_hf_dict(hf(moe_latent_size=24))
    assert cfg.moe_latent_size == 24 and cfg.moe_input_size == 24
    plain = ModelConfig.from_hf_dict(hf(moe_latent_size=None))
    assert plain.moe_latent_size is None and plain.moe_input_size == 64
    assert ModelConfig.from_hf_dict(hf(moe_latent_size=0)).moe_latent_size is None
    with pytest.raises(ConfigError, match="moe_latent_size"):
        ModelConfig.from_hf_dict(hf(moe_latent_size=-4))


def test_unknown_keys_survive_a_round_trip():
    cfg = ModelConfig.from_hf_dict(hf(some_future_key={"a": 1}, torch_dtype="bfloat16"))
    out = cfg.to_hf_dict()
    assert out["some_future_key"] == {"a": 1} and out["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_round_trip(name):
    cfg = preset(name)
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == cfg
    # and through a JSON file (time_step_limit's inf survives as Python's json writes it)
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert again == cfg and again.to_hf_dict() == d


def test_to_hf_dict_accepted_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for cfg in (preset("nemotron-3-super-120b-a12b"), preset("nemotron-3-nano-30b-a3b"),
                ModelConfig(**BASE, pattern="M*E-", mlp_bias=True, use_bias=True, n_group=2, topk_group=1)):
        h = transformers.NemotronHConfig(**cfg.to_hf_dict())
        assert h.hybrid_override_pattern == cfg.pattern
        assert h.num_hidden_layers == cfg.num_hidden_layers
        for f in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
                  "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_latent_size",
                  "moe_shared_expert_intermediate_size", "routed_scaling_factor", "n_group", "topk_group",
                  "norm_topk_prob", "num_nextn_predict_layers", "layer_norm_epsilon", "use_conv_bias", "use_bias",
                  "mlp_bias", "attention_bias", "intermediate_size"):
            assert getattr(h, f) == getattr(cfg, f), f
        assert tuple(h.time_step_limit) == cfg.time_step_limit
        if cfg.num_nextn_predict_layers:
            assert h.mtp_hybrid_override_pattern == cfg.mtp_pattern
        # and what transformers saves, we read back to the same config
        h.save_pretrained(tmp_path)
        assert ModelConfig.from_json(tmp_path / "config.json") == cfg


# ---- presets: exact published dims (REFERENCE.md section 1) -----------------------------------------------

def test_super_preset():
    c = preset("nemotron-3-super-120b-a12b")
    assert c.hidden_size == 4096 and c.num_hidden_layers == 88
    assert c.pattern == ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*"
                         "EMEMEMEME")
    assert (c.pattern.count("M"), c.pattern.count("E"), c.pattern.count("*")) == (40, 40, 8)
    assert (c.mamba_num_heads, c.mamba_head_dim, c.mamba_d_inner) == (128, 64, 8192)
    assert (c.ssm_state_size, c.n_groups, c.conv_kernel, c.chunk_size) == (128, 8, 4, 128)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok) == (512, 22)
    assert (c.moe_intermediate_size, c.moe_latent_size, c.moe_shared_expert_intermediate_size) == (2688, 1024, 5376)
    assert (c.routed_scaling_factor, c.n_group, c.topk_group, c.norm_topk_prob) == (5.0, 1, 1, True)
    assert (c.vocab_size, c.max_position_embeddings) == (131072, 262144)
    assert (c.num_nextn_predict_layers, c.mtp_pattern) == (1, "*E")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    assert c.layer_norm_epsilon == 1e-5 and c.tie_word_embeddings is False


def test_nano_preset():
    c = preset("nemotron-3-nano-30b-a3b")
    assert c.hidden_size == 2688 and c.num_hidden_layers == 52
    assert c.pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    assert (c.pattern.count("M"), c.pattern.count("E"), c.pattern.count("*")) == (23, 23, 6)
    assert (c.mamba_num_heads, c.mamba_head_dim, c.mamba_d_inner) == (64, 64, 4096)
    assert (c.ssm_state_size, c.n_groups, c.conv_kernel, c.chunk_size) == (128, 8, 4, 128)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok) == (128, 6)
    assert (c.moe_intermediate_size, c.moe_latent_size, c.moe_shared_expert_intermediate_size) == (1856, None, 3712)
    assert (c.routed_scaling_factor, c.n_group, c.topk_group, c.norm_topk_prob) == (2.5, 1, 1, True)
    assert (c.vocab_size, c.max_position_embeddings) == (131072, 262144)
    assert (c.num_nextn_predict_layers, c.mtp_pattern) == (0, "")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    assert c.layer_norm_epsilon == 1e-5


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nemotron-4-huge")


# ---- validation: each error names its field ---------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
    (dict(layers_block_type=None, hybrid_override_pattern="MX*"), "hybrid_override_pattern"),
    (dict(layers_block_type=None, hybrid_override_pattern=""), "hybrid_override_pattern"),
    (dict(layers_block_type=["linear_attention", "ssm"]), "layers_block_type"),
    (dict(layers_block_type="M*"), "layers_block_type"),
    (dict(n_routed_experts=9, n_group=2, topk_group=1), "n_routed_experts"),
    (dict(mamba_num_heads=6, n_groups=4), "mamba_num_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=None, num_attention_heads=4), None),  # head_dim absent -> the default, valid
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act"),
])
def test_validation_names_the_field(changes, field):
    if field is None:
        ModelConfig.from_hf_dict(hf(**changes))
        return
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict(hf(**changes))
    assert str(e.value).startswith(field), str(e.value)


def test_replace_validates():
    cfg = ModelConfig.from_hf_dict(hf())
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=100)


def test_from_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"hidden_size\": 64,")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(bad)
    bad.write_text(json.dumps(hf(model_type="mamba2")))
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_json(bad)
    good = tmp_path / "config.json"
    good.write_text(json.dumps(hf()))
    assert ModelConfig.from_json(good) == ModelConfig.from_hf_dict(hf())
    # a config without model_type is read as nemotron_h
    good.write_text(json.dumps({k: v for k, v in hf().items() if k != "model_type"}))
    assert ModelConfig.from_json(good).pattern == "ME*-ME"

"""Checkpoint loading: layouts, dtypes, and the errors promised for bad checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hylm
from hylm.config import ModelConfig
from hylm.weights import CheckpointError, save_hf_checkpoint

CFG = ModelConfig(vocab_size=64, hidden_size=32, pattern="ME*-M", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=24, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                  chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16, moe_latent_size=8)


@pytest.fixture(scope="module")
def source():
    return hylm.load_model(CFG, seed=3)


@pytest.fixture
def ckpt(tmp_path, source):
    save_hf_checkpoint(source, tmp_path / "m")
    return tmp_path / "m"


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_both_layouts_load_identically(tmp_path, source):
    save_hf_checkpoint(source, tmp_path / "nv", nvidia_layout=True)
    save_hf_checkpoint(source, tmp_path / "hf", nvidia_layout=False)
    names_nv = load_file(str(tmp_path / "nv" / "model.safetensors")).keys()
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in names_nv
    names_hf = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert "model.layers.1.mixer.experts.up_proj" in names_hf
    ids = torch.randint(0, 64, (2, 11))
    ref = source(ids)
    for d in ("nv", "hf"):
        assert torch.equal(hylm.load_model(tmp_path / d)(ids), ref)


def test_dtype_choice(ckpt, source):
    m = hylm.load_model(ckpt, dtype="bf16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(m.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: (t.pop("backbone.layers.0.mixer.A_log"), t.pop("backbone.layers.1.mixer.experts.2.down_proj.weight")))
    with pytest.raises(CheckpointError) as e:
        hylm.load_model(ckpt)
    msg = str(e.value)
    assert "missing tensors (2)" in msg
    assert "model.layers.0.mixer.A_log" in msg
    assert "model.layers.1.mixer.experts.2.down_proj.weight" in msg


def test_wrong_shape_and_unexpected_listed_together(ckpt):
    def edit(t):
        t["backbone.layers.2.mixer.q_proj.weight"] = torch.zeros(33, 32)
        t["backbone.layers.9.mixer.bogus"] = torch.zeros(3)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as e:
        hylm.load_model(ckpt)
    msg = str(e.value)
    assert "backbone.layers.2.mixer.q_proj.weight: checkpoint [33, 32] vs model [32, 32]" in msg
    assert "unexpected tensors (1): backbone.layers.9.mixer.bogus" in msg


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        hylm.load_model(ckpt)


def test_garbage_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        hylm.load_model(ckpt)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(CheckpointError, match="only safetensors.*pytorch_model.bin"):
        hylm.load_model(ckpt)


def test_sharded_index_with_missing_shard(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(ckpt / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(ckpt / "model-00002-of-00002.safetensors"))
    (ckpt / "model.safetensors").unlink()
    wm = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, n in enumerate(names)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    hylm.load_model(ckpt)  # loads fine
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00002-of-00002"):
        hylm.load_model(ckpt)


def test_bad_config_in_checkpoint(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hylm.ConfigError, match="num_attention_heads: 4 is not divisible by num_key_value_heads=3"):
        hylm.load_model(ckpt)


def test_no_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hylm.load_model(d)


def test_generation_config_eos_ids_are_stop_ids(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 11]}))
    assert hylm.load_model(ckpt).config.eos_token_ids() == [2, 11]


def test_random_init_sets_every_parameter_and_buffer():
    """`load_model(config)` builds on the meta device and materialises with `to_empty` (uninitialised memory):
    initialisation must set everything, router correction biases included (they once kept whatever the
    memory held, so routing in random models differed from process to process)."""
    from hylm.model import NemotronHModel
    from hylm.model.init import init_weights

    model = NemotronHModel(CFG)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
        init_weights(model, CFG, seed=3)
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values()), [k for k, v in state.items() if not torch.isfinite(v).all()]
    biases = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert biases and all((b == 0).all() for b in biases)
    again = hylm.load_model(CFG, seed=3).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)

"""Training: packing with per-sequence resets, gradients through every block (MTP included), loss going
down on a fixed batch, checkpoint save -> load, exact resume, CLI flags."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import hylm
from hylm.chat import ChatTemplate, Tokenizer
from hylm.model import Batch
from hylm.train.configs import resolve_model_config, train_preset
from hylm.train.tokenizer import train_curriculum_tokenizer
from hylm.train.trainer import (ExampleStream, TrainConfig, Trainer, build_model, compute_losses, load_optimizer,
                                lr_at, make_optimizer, pack_sequences, save_optimizer)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead (and the machine is shared)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_curriculum_tokenizer(tmp_path_factory.mktemp("traintok"), 400, n_examples=300)


@pytest.fixture(scope="module")
def stream(tok_dir):
    return ExampleStream(ChatTemplate.from_dir(tok_dir), Tokenizer.from_dir(tok_dir), seq_len=256)


def micro():
    return train_preset("micro")


def small_cfg(tok_dir, out, **kw):
    base = dict(model="micro", out_dir=str(out), tokenizer=str(tok_dir), steps=6, batch_tokens=300, seq_len=128,
                warmup=2, lr=3e-3, min_lr=3e-4, progress=False, plot=False, save_interval=0, log_interval=1,
                mix={"copy": 1, "sort": 1, "arith_direct": 1, "reverse": 1})
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ packing
def test_pack_sequences_targets_stay_inside_sequences():
    pb = pack_sequences([([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1]), ([4], [1])])
    assert pb.ids.tolist() == [5, 6, 7, 8, 9, 10, 11]  # the 1-token sequence has nothing to predict
    assert pb.batch.seq_lens == [4, 3] and pb.batch.context_lens == [0, 0] and pb.batch.slots == [0, 1]
    assert pb.rows.tolist() == [1, 2, 4, 5] and pb.targets.tolist() == [7, 8, 10, 11]
    # MTP: sequences shortened by one; row r holds (hidden of token r, embedding of token r + 1)
    (one,) = pb.mtp_levels
    assert one.batch.seq_lens == [3, 2]
    assert one.src.tolist() == [0, 1, 2, 4, 5] and one.embed.tolist() == [1, 2, 3, 5, 6]
    assert one.rows.tolist() == [0, 1, 3] and one.targets.tolist() == [7, 8, 11]
    padded = pack_sequences([([5, 6, 7], [0, 1, 1]), ([9, 10, 11], [0, 1, 1])], pad_multiple=4, pad_id=0)
    assert padded.batch.seq_lens == [4, 4] and padded.ids.tolist() == [5, 6, 7, 0, 9, 10, 11, 0]
    assert padded.rows.tolist() == [0, 1, 4, 5] and padded.real_tokens == 6  # no pad is ever a target
    assert padded.pad_mask.tolist() == [False, False, False, True] * 2 and pb.pad_mask is None


def test_pack_sequences_mtp_levels_follow_the_draft_chain():
    """Level d row j reads level d-1 row j and the embedding of token j+d, and predicts token j+d+1."""
    pb = pack_sequences([([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([10, 11, 12, 13], [0, 1, 1, 1])], mtp_depth=3)
    one, two, three = pb.mtp_levels
    assert one.batch.seq_lens == [4, 3] and two.batch.seq_lens == [3, 2] and three.batch.seq_lens == [2, 1]
    assert two.src.tolist() == [0, 1, 2, 4, 5]  # into level 1's rows (sequence 2 starts at row 4 there)
    assert two.embed.tolist() == [2, 3, 4, 7, 8]
    assert two.rows.tolist() == [0, 1, 3] and two.targets.tolist() == [8, 9, 13]
    assert three.src.tolist() == [0, 1, 3] and three.embed.tolist() == [3, 4, 8]
    assert three.rows.tolist() == [0] and three.targets.tolist() == [9]
    assert len(pack_sequences([([1, 2, 3], [0, 1, 1])], mtp_depth=5).mtp_levels) == 2  # as deep as rows allow


def test_deeper_mtp_loss_equals_the_speculative_draft_chain_per_sequence():
    """compute_losses' level-2 loss, rebuilt one sequence at a time the way speculative decoding drafts:
    draft 2 at position t reads the MTP's own output at t and the embedding of token t+2."""
    import torch.nn.functional as F

    model = build_model(micro(), seed=4).eval()
    g = torch.Generator().manual_seed(3)
    seqs = []
    for n in (37, 12, 20):
        ids = torch.randint(0, 500, (n,), generator=g).tolist()
        seqs.append((ids, [0] * 4 + [1] * (n - 4)))
    with torch.no_grad():
        _, _, mtp = compute_losses(model, pack_sequences(seqs, mtp_depth=2), mtp_weight=1.0)
        per_level = [[], []]
        for ids, mask in seqs:
            t = torch.tensor(ids)
            n = len(ids)
            emb = model.model.embeddings(t)
            h0 = model.hidden_states(t, Batch([n], [0], [0]))
            o1 = model.mtp(emb[1:], h0[:-1], Batch([n - 1], [0], [0]), None)  # row j predicts token j+2
            o2 = model.mtp(emb[2:], o1[:-1], Batch([n - 2], [0], [0]), None)  # row j predicts token j+3
            for level, out in enumerate((o1, o2)):
                logits = model.logits(out)
                for j in range(out.shape[0]):
                    if j + level + 2 < n and mask[j + level + 2]:
                        per_level[level].append(-F.log_softmax(logits[j], -1)[ids[j + level + 2]])
        expected = (torch.stack(per_level[0]).mean() + torch.stack(per_level[1]).mean()) / 2
    torch.testing.assert_close(mtp, expected, rtol=1e-5, atol=1e-6)


def test_stream_batches_are_deterministic_and_bounded(stream):
    a, cur_a = stream.next_batch(0, 600)
    b, cur_b = stream.next_batch(0, 600)
    assert cur_a == cur_b and torch.equal(a.ids, b.ids)
    assert a.num_tokens <= 600 or a.num_examples == 1
    c, _ = stream.next_batch(cur_a, 600)
    assert not torch.equal(a.ids[:50], c.ids[:50])


def test_packed_forward_resets_state_per_sequence():
    torch.manual_seed(0)
    model = build_model(micro(), seed=1).eval()
    lens = [45, 17, 33]  # across SSD chunk boundaries (chunk 32)
    seqs = [torch.randint(0, 400, (n,)) for n in lens]
    with torch.no_grad():
        packed = model.hidden_states(torch.cat(seqs), Batch(lens, [0] * 3, [0, 1, 2]))
        alone = [model.hidden_states(s, Batch([len(s)], [0], [0])) for s in seqs]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ gradients
def test_gradients_reach_every_parameter_including_mtp(stream):
    model = build_model(micro(), seed=2)
    pb, _ = stream.next_batch(0, 1200)
    loss, main, mtp = compute_losses(model, pb, mtp_weight=0.3)
    assert mtp is not None and torch.isfinite(loss)
    assert math.isclose(loss.item(), main.item() + 0.3 * mtp.item(), rel_tol=1e-6)
    assert math.log(400) - 1 < main.item() < math.log(512) + 1  # near uniform at initialisation
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    mtp_params = [n for n, _ in model.named_parameters() if n.startswith("mtp.")]
    assert any("eh_proj" in n for n in mtp_params) and any("experts" in n for n in mtp_params)
    # every routed expert of the MoE layers got some gradient (gathered expert weights)
    for name, p in model.named_parameters():
        if name.endswith("experts.up_proj"):
            assert torch.all(p.grad.flatten(1).abs().sum(1) > 0), name


def test_gradients_match_finite_differences():
    """The backward pass through the packed model (SSD scan, conv, attention, gathered experts, MTP) is
    the true gradient: the directional derivative along the gradient matches central differences."""
    model = build_model(micro(), seed=5)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in (40, 23, 40, 9):
        ids = torch.randint(0, 500, (n,), generator=g).tolist()
        seqs.append((ids, [0] * (n // 3) + [1] * (n - n // 3)))
    pb = pack_sequences(seqs)
    compute_losses(model, pb)[0].backward()
    params = dict(model.named_parameters())
    groups = {"mamba": ("model.layers.0.mixer.", "model.layers.3.mixer."), "attention": ("model.layers.2.mixer.",),
              "experts": ("model.layers.1.mixer.experts",), "mtp": ("mtp.",), "embeddings": ("model.embeddings",)}
    for group, prefixes in groups.items():
        names = [n for n in params if n.startswith(prefixes)]
        assert names, group
        norm = torch.sqrt(sum(params[n].grad.pow(2).sum() for n in names))
        analytic = float(norm)  # derivative along grad / |grad|
        eps = 1e-2
        with torch.no_grad():
            for n in names:
                params[n].add_(eps * params[n].grad / norm)
            plus = compute_losses(model, pb)[0].item()
            for n in names:
                params[n].sub_(2 * eps * params[n].grad / norm)
            minus = compute_losses(model, pb)[0].item()
            for n in names:
                params[n].add_(eps * params[n].grad / norm)
        fd = (plus - minus) / (2 * eps)
        assert abs(fd - analytic) <= 0.05 * analytic + 3e-4, (group, analytic, fd)


def test_mtp_loss_alone_trains_the_mtp_head(stream):
    model = build_model(micro(), seed=3)
    pb, _ = stream.next_batch(0, 400)
    _, _, mtp = compute_losses(model, pb, mtp_weight=1.0)
    mtp.backward()
    assert all(torch.any(p.grad != 0) for n, p in model.named_parameters() if n.startswith("mtp."))
    assert torch.any(model.model.layers[0].mixer.in_proj.weight.grad != 0)  # through the hidden states


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and lr_at(500, cfg) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------ training
def test_training_on_a_fixed_batch_lowers_the_loss(tok_dir, tmp_path):
    cfg = small_cfg(tok_dir, tmp_path / "fixed", steps=200, warmup=10, lr=1e-2, min_lr=1e-3, batch_tokens=200)
    trainer = Trainer(cfg)
    pb = trainer.next_batch()
    first = trainer.train_step(pb)
    for _ in range(199):
        last = trainer.train_step(pb)
    assert last["main_loss"] < 0.5 * first["main_loss"], (first, last)
    assert first["moe_imbalance"] >= 1.0
    assert last["mtp_loss"] < 0.7 * first["mtp_loss"], (first, last)
    biases = [r.e_score_correction_bias for r in trainer.routers]
    assert len(biases) == 2 and all(torch.any(b != 0) for b in biases)  # MoE balancing moved the biases
    trainer.close()


def test_router_load_ignores_padding(tok_dir, tmp_path):
    trainer = Trainer(small_cfg(tok_dir, tmp_path / "pad", pad_multiple=16, router_bias_rate=0.0))
    pb = trainer.next_batch()
    assert pb.pad_mask is not None and pb.real_tokens < pb.num_tokens
    loads = {}
    trainer._update_router_bias = lambda: loads.update(trainer._loads)  # capture the counts of one step
    trainer.train_step(pb)
    k = trainer.config.num_experts_per_tok
    main, mtp = (loads[r] for r in trainer.routers)  # the trunk's MoE layer, then the MTP block's
    assert int(main.sum()) == k * pb.real_tokens
    assert int(mtp.sum()) == k * int((~pb.pad_mask)[pb.mtp_levels[0].embed].sum())  # rows embedding a real token
    trainer.close()


def test_save_load_round_trip_identical(tok_dir, tmp_path):
    trainer = Trainer(small_cfg(tok_dir, tmp_path / "rt", steps=3))
    for _ in range(3):
        trainer.train_step(trainer.next_batch())
    out = trainer.save_final()
    loaded = hylm.load_model(out)
    want = {k: v for k, v in trainer.model.state_dict().items()}
    got = loaded.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("mtp.") for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids = torch.randint(0, 400, (2, 40))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), trainer.model(ids), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    trainer.close()


def test_optimizer_state_round_trip(tmp_path, stream):
    model = build_model(micro(), seed=4)
    opt = make_optimizer(model, TrainConfig())
    pb, _ = stream.next_batch(0, 300)
    compute_losses(model, pb)[0].backward()
    opt.step()
    save_optimizer(model, opt, tmp_path / "opt.safetensors")
    opt2 = make_optimizer(model, TrainConfig())
    load_optimizer(model, opt2, tmp_path / "opt.safetensors")
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p][key])
    assert not any(f.suffix in (".pt", ".bin", ".pkl") for f in tmp_path.iterdir())


def test_resume_continues_exactly(tok_dir, tmp_path):
    full = Trainer(small_cfg(tok_dir, tmp_path / "a", steps=6, save_interval=3, keep_checkpoints=0))
    summary = full.run()
    full.close()
    assert summary["steps"] == 6
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_0000003", "step_0000006"]
    state = json.loads((tmp_path / "a" / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["cursor"] > 0 and len(state["history"]["loss"]) == 3
    # a fresh run directory holding only the step-3 checkpoint, resumed to step 6
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_0000003", tmp_path / "b" / "checkpoints" / "step_0000003")
    resumed = Trainer(small_cfg(tok_dir, tmp_path / "b", steps=6, resume=True))
    assert resumed.step == 3
    resumed.run()
    resumed.close()
    a, b = full.history, resumed.history
    assert b["step"] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(b["mtp_loss"]), torch.tensor(a["mtp_loss"]), rtol=1e-6, atol=1e-7)
    wa = hylm.load_model(tmp_path / "a").state_dict()
    wb = hylm.load_model(tmp_path / "b").state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all("tok_per_s" in r for r in log)


def test_init_from_checkpoint_starts_a_new_run(tok_dir, tmp_path):
    first = Trainer(small_cfg(tok_dir, tmp_path / "base", steps=2))
    first.run()
    first.close()
    again = Trainer(small_cfg(tok_dir, tmp_path / "cont", steps=1, init_from=str(tmp_path / "base"),
                              tokenizer=None))
    assert again.step == 0 and again.tokenizer_dir == tmp_path / "cont"  # the run keeps its own copy
    assert (tmp_path / "cont" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    w0 = hylm.load_model(tmp_path / "base").state_dict()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    assert all(p.requires_grad for p in again.model.parameters())
    again.close()


def test_mtp_only_training_leaves_every_other_weight_bit_for_bit(tok_dir, tmp_path):
    """--mtp-only (from a checkpoint): the MTP block learns (its loss falls on a fixed batch, its router balances),
    while every other tensor of the saved model, buffers and router biases included, stays bit for bit."""
    first = Trainer(small_cfg(tok_dir, tmp_path / "base", steps=2))
    first.run()
    first.close()
    cfg = small_cfg(tok_dir, tmp_path / "mtp", steps=40, warmup=2, lr=1e-2, min_lr=1e-3, batch_tokens=200,
                    init_from=str(tmp_path / "base"), tokenizer=None, mtp_only=True, mtp_depth=2)
    trainer = Trainer(cfg)
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {
        n for n, _ in trainer.model.named_parameters() if n.startswith("mtp.")}
    assert len(trainer.routers) == 1  # the MTP block's
    pb = trainer.next_batch()
    first_step = trainer.train_step(pb)
    for _ in range(39):
        last = trainer.train_step(pb)
    assert last["mtp_loss"] < 0.9 * first_step["mtp_loss"], (first_step, last)
    assert last["main_loss"] == first_step["main_loss"]  # the main model's output did not move
    trainer.save_final()
    trainer.close()
    before, after = hylm.load_model(tmp_path / "base").state_dict(), hylm.load_model(tmp_path / "mtp").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mtp.") for k in changed)
    assert any(k.endswith("e_score_correction_bias") for k in changed)


def test_trains_its_own_tokenizer_when_none_is_given(tmp_path):
    cfg = TrainConfig(model="micro", out_dir=str(tmp_path / "own"), tokenizer_corpus=200, steps=1,
                      batch_tokens=200, progress=False, plot=False, mix={"copy": 1})
    trainer = Trainer(cfg, log=lambda msg: None)
    assert (tmp_path / "own" / "tokenizer.json").is_file()
    assert trainer.tokenizer.token_to_id("<|im_end|>") == 11
    assert trainer.tokenizer.vocab_size <= trainer.config.vocab_size
    trainer.close()


# ------------------------------------------------------------------------------------------ config / CLI
def test_configs_and_cli_flags(tmp_path):
    from hylm.cli import build_parser
    from hylm.train.cli import config_from_args, parse_mix

    tiny = resolve_model_config("hylm-tiny")
    assert tiny.num_nextn_predict_layers == 1 and tiny.mtp_pattern == "*E" and tiny.moe_latent_size
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(micro().to_hf_dict()))
    assert resolve_model_config(str(cfg_file)).pattern == "ME*M"
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--out", str(tmp_path / "o"),
                                      "--steps", "7", "--mtp-weight", "0.5", "--mix", "copy=2,sort=1",
                                      "--resume", "--no-progress"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.mtp_weight, cfg.resume, cfg.progress) == (7, 0.5, True, False)
    assert cfg.mix == {"copy": 2.0, "sort": 1.0}
    assert parse_mix('{"tool_call": 1}') == {"tool_call": 1.0}
    with pytest.raises(ValueError):
        parse_mix("copy")
    assert build_parser().parse_args(["eval-tasks", "m", "--n", "3"]).n == 3


def test_loss_curve_png_or_notice(tmp_path, monkeypatch):
    import importlib.util

    from hylm.train import trainer as trainer_mod

    history = {"step": [1, 2, 3], "main_loss": [3.0, 2.0, 1.5], "mtp_loss": [3.5, 2.5, 2.0], "eval": [[3, 1.7]]}
    notices = []
    if importlib.util.find_spec("matplotlib") is not None:
        png = trainer_mod.plot_loss_curve(history, tmp_path / "curve.png", log=notices.append)
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setattr(trainer_mod, "_PLOT_NOTICE_SHOWN", False)
    assert trainer_mod.plot_loss_curve(history, tmp_path / "none.png", log=notices.append) is None
    assert len(notices) == 1 and "matplotlib" in notices[0] and not (tmp_path / "none.png").exists()


def test_resumed_run_keeps_writing_the_tokenizer_after_its_checkpoint_is_rotated_away(tok_dir, tmp_path):
    first = Trainer(small_cfg(tok_dir, tmp_path / "r", steps=2, save_interval=2, keep_checkpoints=1))
    first.run()
    first.close()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the run dir only has the checkpoint's copy
        (tmp_path / "r" / name).unlink(missing_ok=True)
    resumed = Trainer(small_cfg(tok_dir, tmp_path / "r", steps=6, save_interval=2, keep_checkpoints=1,
                                tokenizer=None, resume=True))
    resumed.run()
    resumed.close()
    ckpts = sorted((tmp_path / "r" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_0000006"]
    assert (ckpts[0] / "tokenizer.json").is_file() and (tmp_path / "r" / "tokenizer.json").is_file()

"""Tiny random models for engine tests: logits spread widely enough that greedy choices are clear."""

import torch

import hylm
from hylm.config import ModelConfig
from hylm.model.init import init_weights

TINY = ModelConfig(vocab_size=256, hidden_size=64, pattern="ME*EM-*M", num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=96, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                   n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   moe_shared_expert_intermediate_size=48, moe_latent_size=24, n_group=2, topk_group=1,
                   routed_scaling_factor=2.0, eos_token_id=2, max_position_embeddings=4096)


def tiny_model(seed: int = 0, config: ModelConfig = TINY):
    model = hylm.load_model(config, seed=seed)
    with torch.no_grad():
        init_weights(model, config, seed=seed, std=0.15)  # larger weights: decisive, input-dependent logits
        model.lm_head.weight.mul_(3.0)
    return model


def make_agreeable(model, token: int = 7, pull: float = 6.0):
    """Make the MTP head often agree with the model: a constant residual channel (dim 0) that every mixer leaves
    alone pulls both the target's and the MTP's logits toward `token` (the more, the larger `pull`). In place;
    returns the model."""
    with torch.no_grad():
        model.model.embeddings.weight[:, 0] = 3.0
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "fc2_latent_proj.weight",
                              "down_proj")) and p.ndim >= 2:
                (p[..., 0, :] if p.ndim == 3 else p[0]).zero_()
        model.mtp.layers[0].eh_proj.weight[0] = 0.0
        model.mtp.layers[0].eh_proj.weight[0, 0] = 1.0
        model.lm_head.weight[token] = 0.0
        model.lm_head.weight[token, 0] = pull
    return model


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


def tiny_chat_checkpoint(path, seed: int = 0):
    """A tiny random model with the test tokenizer and chat template: a checkpoint the chat layer, the
    CLI and the server can load."""
    from chat_fixtures import build_test_tokenizer

    from hylm.chat.tokenizer import Tokenizer
    from hylm.weights import save_hf_checkpoint

    build_test_tokenizer(path)
    vocab = Tokenizer.from_dir(path).vocab_size
    config = TINY.replace(vocab_size=vocab, eos_token_id=[2, 11])
    save_hf_checkpoint(tiny_model(seed, config), path)
    return path


def run_staggered(model, prompts, params, join_every=2, **cfg):
    """Requests join one by one every `join_every` steps while others are mid-flight; returns the
    outputs in prompt order and the engine's metrics, after checking every slot and block is free."""
    from hylm.engine.engine import EngineConfig, LLMEngine

    eng = LLMEngine(model, EngineConfig(**cfg))
    outs, pending, ids, step = {}, list(enumerate(prompts)), {}, 0
    while pending or eng.has_unfinished():
        if pending and step % join_every == 0:
            i, p = pending.pop(0)
            ids[eng.add_request(p, params[i] if isinstance(params, list) else params)] = i
        for o in eng.step():
            if o.finished:
                outs[ids[o.request_id]] = o.output_ids
        step += 1
    assert eng.pool.num_free_slots == eng.sizes.num_slots and eng.pool.num_free_blocks == eng.sizes.num_blocks
    return [outs[i] for i in range(len(prompts))], eng.metrics


def logprob_runs(model, prompts, params, **engine_config) -> list[tuple[list[int], list[float]]]:
    """(token ids, logprobs) of each prompt's completion through a fresh LLM with this engine config."""
    from hylm.engine.llm import LLM

    llm = LLM(model, **engine_config)
    return [(c.outputs[0].token_ids, c.outputs[0].logprobs) for c in llm.generate(prompts, params)]


def assert_runs_agree(a, b, tol: float = 1e-4) -> None:
    """Two logprob_runs of the same prompts: the same tokens, logprobs within tol."""
    assert len(a) == len(b)
    for (t1, lp1), (t2, lp2) in zip(a, b):
        assert t1 == t2 and max(abs(x - y) for x, y in zip(lp1, lp2)) < tol

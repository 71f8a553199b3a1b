"""Prefix caching behind the server: a multi-turn chat resumes from cached state, outputs unchanged,
and /metrics reports hits, reused tokens and misses by reason."""

import httpx
import openai

from server_fixtures import ServerThread, chat_checkpoint, metric_value


def conversation(url: str, turns: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    history, answers = [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        r = client.chat.completions.create(model=client.models.list().data[0].id, messages=history, max_tokens=6,
                                           temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        answer = r.choices[0].message.content or ""
        answers.append(answer)
        history.append({"role": "assistant", "content": answer})
    return answers


def test_multi_turn_chat_hits_the_cache():
    ckpt = chat_checkpoint()
    turns = ["hello there", "and what about tomorrow?", "thanks, one more thing"]
    plain = ServerThread(ckpt)
    try:
        want = conversation(plain.url, turns)
    finally:
        plain.stop()
    cached = ServerThread(ckpt, prefix_caching=True)
    try:
        assert conversation(cached.url, turns) == want
        text = httpx.get(cached.url + "/metrics").text
        assert metric_value(text, "hylm_prefix_cache_hits_total") >= 2
        assert metric_value(text, "hylm_prefix_cache_tokens_reused_total") > 20
        assert metric_value(text, "hylm_prefix_cache_misses_total", {"reason": "different_tokens"}) >= 1
        cached.wait_idle()
        cache = cached.engine.prefix_cache
        assert cache.stats.bytes_used <= cache.budget
        cache.clear()  # what checkpoints held comes back: nothing leaked
        cached.assert_all_free()
        assert all(r == 0 for r in cached.engine.pool.refs)
    finally:
        cached.stop()

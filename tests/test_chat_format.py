"""The chat layer end to end on token ids: prompt rendering, budget rules, streamed parsing."""

import pytest

from hylm.chat.chat_format import ChatFormat
from hylm.chat.reasoning import parse_reasoning
from hylm.chat.tool_calls import parse_tool_calls

from chat_fixtures import build_test_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(d)
    return ChatFormat.from_dir(d)


def test_prompt_flags(fmt):
    msgs = [{"role": "user", "content": "hi"}]
    on = fmt.prompt(msgs)
    off = fmt.prompt(msgs, enable_thinking=False)
    assert on.in_thinking and on.text.endswith("<|im_start|>assistant\n<think>\n")
    assert not off.in_thinking and off.text.endswith("<think></think>")
    assert fmt.tokenizer.decode(on.ids, skip_special_tokens=False) == on.text
    assert fmt.thinking_budget(off, 10) is None  # the budget never applies with thinking off
    tb = fmt.thinking_budget(on, 10)
    assert tb.end_marker_id == 13 and tb.end_ids[0] == 13 and tb.budget == 10
    nl = fmt.tokenizer.encode("\n")
    assert set(nl) <= tb.newline_ids and fmt.tokenizer.encode("a")[0] not in tb.newline_ids


@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_result_equals_one_piece_parse(fmt, thinking):
    msgs = [{"role": "user", "content": "weather?"}]
    prompt = fmt.prompt(msgs, tools=TOOLS, enable_thinking=thinking)
    out_text = ("Let me call the tool.\n</think>\n" if thinking else "") + \
        "Sure thing.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo 🌧\n</parameter>\n" \
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    ids = fmt.tokenizer.encode(out_text) + [11]  # ends with <|im_end|>
    for step in (1, 2, 5):
        s = fmt.stream(prompt)
        deltas = [s.add(ids[i: i + step]) for i in range(0, len(ids), step)] + [s.finish()]
        res = s.result()
        reasoning, content = parse_reasoning(out_text, thinking)
        want_content, want_calls = parse_tool_calls(content, TOOLS)
        assert res.reasoning == reasoning
        assert res.content == (want_content or None)
        assert [(c.name, c.arguments) for c in res.tool_calls] == [("get_weather", {"city": "São Paulo 🌧", "days": 3})]
        assert [(c.name, c.arguments) for c in want_calls] == [(c.name, c.arguments) for c in res.tool_calls]
        assert "".join(d.reasoning for d in deltas) == (reasoning or "")
        assert all("\ufffd" not in d.content + d.reasoning for d in deltas)


def test_budget_end_to_end_on_rambling_model(tmp_path):
    import torch

    import hylm
    from hylm.engine.llm import LLM
    from hylm.engine.sampling_params import SamplingParams

    from engine_models import tiny_chat_checkpoint

    ckpt = tiny_chat_checkpoint(tmp_path / "m", seed=2)
    model = hylm.load_model(ckpt)
    with torch.no_grad():  # rambles: never closes its reasoning, never ends its turn
        for t in (2, 11, 13):
            model.lm_head.weight[t] = 0.0
    fmt = ChatFormat.from_dir(ckpt)
    llm = LLM(model, tokenizer=fmt.tokenizer)
    msgs = [{"role": "user", "content": "tell me"}]
    budget, grace = 12, 6
    prompt = fmt.prompt(msgs)
    params = SamplingParams(temperature=0.0, max_tokens=60, thinking_budget=fmt.thinking_budget(prompt, budget, grace))
    ids = llm.generate(prompt.ids, params)[0].outputs[0].token_ids
    close = ids.index(13)
    assert budget <= close <= budget + grace
    res = fmt.parse(prompt, ids)
    assert res.reasoning and res.content  # the answer follows the closed reasoning
    free = llm.generate(prompt.ids, SamplingParams(temperature=0.0, max_tokens=60))[0].outputs[0].token_ids
    assert 13 not in free and fmt.parse(prompt, free).content is None  # without a budget: all reasoning

    off = fmt.prompt(msgs, enable_thinking=False)
    params_off = SamplingParams(temperature=0.0, max_tokens=60, thinking_budget=fmt.thinking_budget(off, budget, grace))
    ids_off = llm.generate(off.ids, params_off)[0].outputs[0].token_ids
    assert params_off.thinking_budget is None and 13 not in ids_off
    assert fmt.parse(off, ids_off).reasoning is None

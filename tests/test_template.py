"""Chat templates: the bundled Nemotron 3 template against hand-written prompts, template selection from a
checkpoint, the sandbox, message validation, and agreement with transformers' apply_chat_template."""

from __future__ import annotations

import json

import pytest
from chat_fixtures import build_test_tokenizer

from hylm.chat import ChatTemplate, TemplateError, Tokenizer
from hylm.chat.template import bundled_template_source, find_checkpoint_template, normalize_messages


@pytest.fixture(scope="module")
def bundled():
    return ChatTemplate.bundled()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("chat_tok"))


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD_BARE = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}

# What the system turn says about the call format, written out by hand.
CALL_FORMAT = (
    "To call a function, write one block per call, exactly like this:\n"
    "<tool_call>\n<function=NAME>\n<parameter=ARGUMENT>\nVALUE\n</parameter>\n</function>\n</tool_call>\n"
    "Use one <parameter> block per argument. Write a string VALUE as plain text, and any other VALUE as JSON. "
    "Only call the functions listed above, and give every required argument. "
    "You may write text before the calls, but nothing after them."
)


# ------------------------------------------------------------------------------------------ bundled template
def test_system_and_user_thinking_on(bundled):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"}]
    assert bundled.render(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert bundled.render(msgs, enable_thinking=True) == bundled.render(msgs)


def test_user_only_thinking_off(bundled):
    assert bundled.render([{"role": "user", "content": "Hi"}], enable_thinking=False) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )


def test_no_generation_prompt(bundled):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert bundled.render(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Hello.<|im_end|>\n"
    )


MULTI = [
    {"role": "system", "content": "Be concise."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7", "reasoning_content": "  Small primes: 2, 3, 5, 7.\n"},
    {"role": "user", "content": "Another one?"},
]


def test_multi_turn_history_reasoning_truncated(bundled):
    assert bundled.render(MULTI) == (
        "<|im_start|>system\nBe concise.<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>7<|im_end|>\n"
        "<|im_start|>user\nAnother one?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert bundled.render(MULTI, truncate_history_thinking=True) == bundled.render(MULTI)


def test_multi_turn_history_reasoning_kept(bundled):
    assert bundled.render(MULTI, truncate_history_thinking=False, enable_thinking=False) == (
        "<|im_start|>system\nBe concise.<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nSmall primes: 2, 3, 5, 7.\n</think>\n7<|im_end|>\n"
        "<|im_start|>user\nAnother one?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )


def test_reasoning_inside_content_is_split_out(bundled):
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\nb"},
            {"role": "user", "content": "c"}]
    assert bundled.render(msgs, truncate_history_thinking=False) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nhmm\n</think>\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert "hmm" not in bundled.render(msgs)


def test_low_effort_goes_on_last_user_message_only(bundled):
    assert bundled.render(MULTI, low_effort=True) == (
        "<|im_start|>system\nBe concise.<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>7<|im_end|>\n"
        "<|im_start|>user\nAnother one?\n\n{reasoning effort: low}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert bundled.render(MULTI, low_effort=False) == bundled.render(MULTI)


def test_reasoning_budget(bundled):
    msgs = [{"role": "user", "content": "Prove it."}]
    assert bundled.render(msgs, reasoning_budget=512) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nProve it.\n\n{thinking token budget: 512}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert bundled.render(msgs, reasoning_budget=64, low_effort=True) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nProve it.\n\n{reasoning effort: low}\n\n{thinking token budget: 64}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert bundled.render(msgs, reasoning_budget=None) == bundled.render(msgs)


def test_tools_declared_in_system_turn(bundled):
    msgs = [{"role": "system", "content": "You help with weather."}, {"role": "user", "content": "Paris?"}]
    assert bundled.render(msgs, tools=[WEATHER, ADD_BARE]) == (
        "<|im_start|>system\nYou help with weather.\n\n"
        "You can call the following functions:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        '{"type": "function", "function": {"name": "add", "parameters": {"type": "object", '
        '"properties": {"a": {"type": "number"}}}}}\n'
        "</tools>\n\n" + CALL_FORMAT + "<|im_end|>\n"
        "<|im_start|>user\nParis?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_tools_without_system_message(bundled):
    out = bundled.render([{"role": "user", "content": "Paris?"}], tools=[WEATHER], enable_thinking=False)
    assert out == (
        "<|im_start|>system\nYou can call the following functions:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\n" + CALL_FORMAT + "<|im_end|>\n"
        "<|im_start|>user\nParis?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )
    assert bundled.render([{"role": "user", "content": "x"}], tools=[]) == \
        bundled.render([{"role": "user", "content": "x"}])


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "reasoning_content": "I should look both up.",
     "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
         {"id": "c2", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2, "hourly": true}'}},
     ]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 24 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "rain, 9 C"},
]


def test_tool_calls_then_results(bundled):
    # the tool-calling turn comes after the last user message, so its reasoning is kept
    assert bundled.render(TOOL_CONVERSATION) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI should look both up.\n</think>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny, 24 C\n</tool_response>\n"
        "<tool_response>\nrain, 9 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    with_tools = bundled.render(TOOL_CONVERSATION, tools=[WEATHER])
    assert with_tools.startswith("<|im_start|>system\nYou can call the following functions:\n<tools>\n")
    assert with_tools.endswith(bundled.render(TOOL_CONVERSATION)[len("<|im_start|>system\n<|im_end|>\n"):])


def test_tool_call_after_text_and_json_values(bundled):
    msgs = [
        {"role": "user", "content": "Plan it."},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"function": {"name": "plan", "arguments": {
             "steps": ["a", "b"], "opts": {"fast": False}, "note": "two\nlines", "n": None}}}]},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "Planned."},
        {"role": "user", "content": "Thanks"},
    ]
    assert bundled.render(msgs, enable_thinking=False) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nPlan it.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Let me check.\n"
        "<tool_call>\n<function=plan>\n"
        '<parameter=steps>\n["a", "b"]\n</parameter>\n'
        '<parameter=opts>\n{"fast": false}\n</parameter>\n'
        "<parameter=note>\ntwo\nlines\n</parameter>\n"
        "<parameter=n>\nnull\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\ndone\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Planned.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )


def test_content_as_list_of_parts(bundled):
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Sys."}]},
            {"role": "user", "content": [{"type": "text", "text": "First part."},
                                         {"type": "text", "text": "Second part."}]}]
    assert bundled.render(msgs) == (
        "<|im_start|>system\nSys.<|im_end|>\n"
        "<|im_start|>user\nFirst part.\nSecond part.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_unicode_passes_through(bundled):
    assert bundled.render([{"role": "user", "content": "héllo 你好 😀"}], add_generation_prompt=False) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhéllo 你好 😀<|im_end|>\n")


def test_later_system_message_rendered_in_place(bundled):
    msgs = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    assert bundled.render(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n")


def test_caller_messages_not_mutated(bundled):
    msgs = json.loads(json.dumps(TOOL_CONVERSATION))
    before = json.dumps(msgs)
    bundled.render(msgs)
    assert json.dumps(msgs) == before


# ------------------------------------------------------------------------------------------ template choice
def test_from_dir_uses_tokenizer_config_template(tmp_path):
    build_test_tokenizer(tmp_path, chat_template="{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
                                                 "{{ m.content }}{% endfor %}{{ eos_token }}")
    t = ChatTemplate.from_dir(tmp_path)
    assert not t.is_bundled
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi<|im_end|>"
    assert Tokenizer.from_dir(tmp_path).chat_template == t.source


def test_from_dir_named_templates_use_default(tmp_path):
    build_test_tokenizer(tmp_path, with_template=False)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    cfg_path.write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_from_dir_prefers_chat_template_jinja(tmp_path):
    build_test_tokenizer(tmp_path, chat_template="FROM CONFIG")
    (tmp_path / "chat_template.jinja").write_text("FROM FILE {{ messages[0].content }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "FROM FILE x"
    assert find_checkpoint_template(tmp_path) == "FROM FILE {{ messages[0].content }}"
    assert Tokenizer.from_dir(tmp_path).chat_template == "FROM FILE {{ messages[0].content }}"


def test_from_dir_falls_back_to_bundled(tmp_path):
    build_test_tokenizer(tmp_path, with_template=False)
    t = ChatTemplate.from_dir(tmp_path)
    assert t.is_bundled and t.source == bundled_template_source()
    assert Tokenizer.from_dir(tmp_path).chat_template is None
    assert ChatTemplate.from_dir(tmp_path / "missing").is_bundled


# ------------------------------------------------------------------------------------------ environment
def _render(source, **kw):
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render([{"role": "user", "content": "x"}], **kw)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace(_secret=1) %}",
    "{{ raise_exception('no good') }}",
    "{{ 1 / 0 }}",
])
def test_sandbox_and_runtime_errors_raise_template_error(source):
    with pytest.raises(TemplateError) as info:
        _render(source)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_raise_exception_message_and_syntax_errors():
    with pytest.raises(TemplateError, match="^Conversation roles must alternate$"):
        _render("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")


def test_transformers_style_helpers():
    assert _render("{{ bos_token }}|{{ eos_token }}") == "<s>|</s>"
    assert _render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'
    assert _render("{{ [1, 2] | tojson(indent=2) }}") == "[\n  1,\n  2\n]"
    assert len(_render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert _render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "01"
    assert _render("{% generation %}A{% endgeneration %}B") == "AB"
    assert _render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}") == "2"
    assert _render("{{ dict(a=1)['a'] }}") == "1"
    assert _render("{{ flag }}", flag="yes") == "yes"
    # trim_blocks and lstrip_blocks, as transformers renders
    assert _render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("messages, needle", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"content": "x"}], "role"),
    (["x"], "object"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user"}], "needs 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "tool_calls"),
    ([{"role": "user", "content": "x", "reasoning_content": "r"}], "reasoning"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "JSON object"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}], "name"),
    ([{"role": "assistant", "content": "", "reasoning_content": 3}], "reasoning_content"),
])
def test_bad_messages_raise_value_error(bundled, messages, needle):
    with pytest.raises(ValueError) as info:
        bundled.render(messages)
    assert needle in str(info.value)
    assert not isinstance(info.value, TemplateError)


def test_bad_tools_raise_value_error(bundled):
    with pytest.raises(ValueError, match="tools"):
        bundled.render([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])
    with pytest.raises(ValueError, match="tools"):
        bundled.render([{"role": "user", "content": "x"}], tools="nope")


def test_normalize_messages_aliases_and_parses():
    (m,) = normalize_messages([{"role": "assistant", "content": [{"type": "text", "text": "a"}], "reasoning": "r",
                                "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}])
    assert m["content"] == "a"
    assert m["reasoning_content"] == m["thinking"] == "r"
    assert m["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]


# ------------------------------------------------------------------------------------------ vs transformers
CROSS = [
    (MULTI, None, {"enable_thinking": False}),
    (MULTI, None, {"truncate_history_thinking": False, "low_effort": True, "reasoning_budget": 100}),
    ([{"role": "system", "content": "You help."}] + [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])
                                               if isinstance(c["function"]["arguments"], str)
                                               else c["function"]["arguments"]}} for c in m["tool_calls"]]}
        if m.get("tool_calls") else m
        for m in TOOL_CONVERSATION], [WEATHER], {}),
]


@pytest.mark.parametrize("messages, tools, kwargs", CROSS)
def test_matches_transformers_apply_chat_template(ckpt, messages, tools, kwargs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"),
                                              chat_template=bundled_template_source(),
                                              bos_token="<s>", eos_token="<|im_end|>")
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    ours = ChatTemplate.from_dir(ckpt).render(messages, tools=tools, **kwargs)
    assert isinstance(theirs, str)
    assert ours == theirs
    # and the prompt tokenizes with the chat markers as single special tokens
    ids = Tokenizer.from_dir(ckpt).encode(ours)
    assert ids[0] == 10 and ids.count(11) == ours.count("<|im_end|>")

"""Chat templates: messages (+ tools) -> prompt text, rendered the way transformers' `apply_chat_template` does.

The template comes from the checkpoint when it has one (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`), else hylm's bundled Nemotron 3 template (`templates/nemotron3.jinja`, its format is
documented at its top). Checkpoint templates are untrusted code: they run in Jinja's immutable sandbox, and an
attempt to reach an unsafe attribute (`''.__class__`) fails instead of rendering as empty.

The template sees what transformers gives it: `messages`, `tools`, `documents`, `add_generation_prompt`, the
special tokens (`bos_token`, `eos_token`, ...), the caller's keyword arguments, the `raise_exception`,
`strftime_now`, `namespace` and `dict` globals, a `tojson` filter that does not HTML-escape (json.dumps with
ensure_ascii=False; indent, separators and sort_keys as keywords), `{% break %}`/`{% continue %}` and the
`{% generation %}` block (rendered as its body).

Messages are checked and normalised first (`normalize_messages`); a problem raises `ValueError` naming it,
which a server turns into HTTP 400. Errors while rendering raise `TemplateError` (also a `ValueError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

ROLES = ("system", "user", "assistant", "tool")
BUNDLED_TEMPLATE = "nemotron3.jinja"
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """A chat template failed to compile or render (one-line message)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------- sources
def bundled_template_source() -> str:
    """The text of hylm's bundled Nemotron 3 chat template."""
    return resources.files("hylm.chat").joinpath("templates", BUNDLED_TEMPLATE).read_text(encoding="utf-8")


def _pick_template(value: Any) -> str | None:
    """`chat_template` as tokenizer_config.json stores it: a string, or named templates (use "default",
    else the first)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):  # {name: template}
        if isinstance(value.get("default"), str):
            return value["default"]
        named = [v for v in value.values() if isinstance(v, str)]
        return named[0] if named else None
    if isinstance(value, Sequence):  # [{"name": ..., "template": ...}, ...]
        entries = [e for e in value if isinstance(e, Mapping) and isinstance(e.get("template"), str)]
        for e in entries:
            if e.get("name") == "default":
                return e["template"]
        return entries[0]["template"] if entries else None
    return None


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "tokenizer_config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _checkpoint_template(root: Path, config: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(source, origin) of the checkpoint's own template, or None."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config = _read_config(root) if config is None else config
    source = _pick_template(config.get("chat_template"))
    if source is not None:
        return source, str(root / "tokenizer_config.json")
    return None


def find_checkpoint_template(path: str | os.PathLike) -> str | None:
    """The chat template a checkpoint directory provides (`chat_template.jinja`, else tokenizer_config.json's
    `chat_template`), or None."""
    found = _checkpoint_template(Path(path))
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- inputs
def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only (what a template may see); anything else is refused."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {type(k).__name__}")
            out[str.__str__(k)] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where}: unsupported value of type {type(value).__name__}")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ValueError(f"{where}: content part {j} must be an object")
            kind = part.get("type", "text")
            if kind != "text":
                raise ValueError(f"{where}: content part {j} has unsupported type {kind!r} (only 'text' is supported)")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: content part {j} needs a string 'text'")
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: must be an object")
    call = dict(call)
    fn = call.get("function")
    if fn is None and "name" in call:  # a bare {"name", "arguments"}
        fn = {"name": call.pop("name"), "arguments": call.pop("arguments", None)}
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}: needs a 'function' object")
    kind = call.get("type", "function")
    if kind != "function":
        raise ValueError(f"{where}: unsupported type {kind!r}")
    fn = dict(fn)
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: function needs a non-empty string 'name'")
    args = fn.get("arguments")
    if args is None or (isinstance(args, str) and not args.strip()):
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: function arguments are not valid JSON ({e.msg})") from None
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}: function arguments must be a JSON object")
    fn["arguments"] = _plain(args, f"{where}.function.arguments")
    call["function"] = fn
    call["type"] = "function"
    return _plain(call, where)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked, plain-JSON copies of chat messages, as the template sees them.

    Roles: system, user, assistant, tool. Content: a string, or a list of text parts (`{"type": "text",
    "text": ...}`) which is joined with "\\n"; assistant messages may omit it (None). Assistant messages may
    carry `tool_calls` (`{"function": {"name", "arguments"}}`, arguments a dict or a JSON string, parsed to a
    dict) and `reasoning_content` (also accepted as `reasoning` or `thinking`; every name is filled in).
    Raises ValueError naming the first problem."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ValueError(f"{where}: must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str):
            raise ValueError(f"{where}: needs a string 'role'")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        m = dict(msg)
        if m.get("content") is None:
            if role != "assistant":
                raise ValueError(f"{where}: a {role} message needs 'content'")
            m["content"] = None
        else:
            m["content"] = _content_text(m["content"], where)
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages may carry reasoning_content")
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}: reasoning_content must be a string")
            for k in _REASONING_KEYS:
                m[k] = reasoning
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages may carry tool_calls")
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"{where}: tool_calls must be a list")
            m["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            if not m["tool_calls"]:
                del m["tool_calls"]
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ValueError(f"{where}: {key} must be a string")
        out.append(_plain(m, where))
    return out


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tool schemas as `{"type": "function", "function": {"name", "description", "parameters"}}`; a bare
    function schema is wrapped. None or [] -> None."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of tool objects")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where}: must be an object")
        if "function" in tool:
            kind = tool.get("type", "function")
            if kind != "function":
                raise ValueError(f"{where}: unsupported tool type {kind!r}")
            fn = tool["function"]
            tool = {**tool, "type": "function"}
        else:
            fn = tool
            tool = {"type": "function", "function": fn}
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: function needs a non-empty string 'name'")
        out.append(_plain(tool, where))
    return out or None


# ---------------------------------------------------------------------------------------------- jinja
class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, but an unsafe attribute is an error rather than an empty Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed names."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


class _DictGlobal:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise TemplateError(_one_line(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _DictGlobal()
    return env


def _describe(err: BaseException) -> str:
    if isinstance(err, jinja2.TemplateSyntaxError):
        where = f" (line {err.lineno})" if err.lineno else ""
        return _one_line(f"chat template syntax error{where}: {err.message}")
    if isinstance(err, jinja2.TemplateError):
        return _one_line(f"chat template error: {err.message or type(err).__name__}")
    return _one_line(f"chat template error: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------- template
class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, origin: str = "<string>"):
        if not isinstance(source, str):
            raise TypeError("a chat template must be a string")
        self.source = source
        self.origin = origin
        tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        if bos_token is not None:
            tokens["bos_token"] = bos_token
        if eos_token is not None:
            tokens["eos_token"] = eos_token
        self.special_tokens = tokens
        try:
            self._template = _environment().from_string(source)
        except Exception as e:  # noqa: BLE001 - syntax errors and anything the compiler raises
            raise TemplateError(_describe(e)) from e

    @property
    def is_bundled(self) -> bool:
        return self.origin == "bundled"

    @classmethod
    def bundled(cls, bos_token: str | None = "<s>", eos_token: str | None = "</s>") -> ChatTemplate:
        """hylm's Nemotron 3 template."""
        return cls(bundled_template_source(), bos_token, eos_token, origin="bundled")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTemplate:
        """The checkpoint's template (`chat_template.jinja`, else tokenizer_config.json's `chat_template`:
        a string, or named templates of which "default" is used), else the bundled one."""
        root = Path(path)
        config = _read_config(root)
        tokens = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            if isinstance(value, Mapping):
                value = value.get("content")
            if isinstance(value, str):
                tokens[key] = value
        found = _checkpoint_template(root, config)
        if found is None:
            return cls(bundled_template_source(), special_tokens=tokens, origin="bundled")
        source, origin = found
        return cls(source, special_tokens=tokens, origin=origin)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """From a `hylm.chat.Tokenizer`: its checkpoint's template, else the bundled one."""
        tokens = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token")
                  if isinstance(getattr(tokenizer, k, None), str)}
        source = getattr(tokenizer, "chat_template", None)
        if source is None:
            return cls(bundled_template_source(), special_tokens=tokens, origin="bundled")
        return cls(source, special_tokens=tokens, origin="tokenizer")

    def render(self, messages: Any, tools: Any = None, add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """The prompt text for `messages` (validated, see `normalize_messages`) and optional `tools`.
        Extra keyword arguments reach the template (`enable_thinking`, `low_effort`, `reasoning_budget`,
        `truncate_history_thinking`, ...). Raises ValueError for bad messages, TemplateError for template
        failures."""
        msgs = normalize_messages(messages)
        tool_schemas = normalize_tools(tools)
        context: dict[str, Any] = dict(self.special_tokens)
        context.update(_plain(template_kwargs, "template kwargs"))
        context.update(messages=msgs, tools=tool_schemas, add_generation_prompt=bool(add_generation_prompt))
        context.setdefault("documents", None)
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except RecursionError as e:
            raise TemplateError("chat template error: recursion too deep") from e
        except Exception as e:  # noqa: BLE001 - whatever the template does wrong is the template's error
            raise TemplateError(_describe(e)) from e

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r})"

"""Chat layer: tokenizer wrapper, streaming detokenizer and chat templates (text in, token ids out)."""

from .template import ChatTemplate, TemplateError, bundled_template_source, normalize_messages, normalize_tools
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "ChatTemplate",
    "IncrementalDetokenizer",
    "TemplateError",
    "Tokenizer",
    "bundled_template_source",
    "normalize_messages",
    "normalize_tools",
]

"""Render Hugging Face chat templates (Jinja) with ``transformers``' semantics.

What matches ``transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)``:

* an :class:`jinja2.sandbox.ImmutableSandboxedEnvironment` with ``trim_blocks`` and
  ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}`` block tag;
* globals ``raise_exception(msg)`` (raises :class:`jinja2.TemplateError`), ``strftime_now(fmt)``,
  a restricted ``dict`` and a ``namespace`` refusing underscore attributes;
* the ``tojson`` filter is ``json.dumps(x, ensure_ascii=False, indent=None, separators=None,
  sort_keys=False)`` (no HTML escaping, unlike Jinja's built-in one);
* message keys whose value is ``None`` are dropped; everything the template sees is rebuilt
  from plain JSON-like data (dataclasses and pydantic models are converted to dicts);
* tools may be JSON-schema dicts or Python functions (converted by :func:`get_json_schema`);
* ``continue_final_message`` leaves the last message open for the model to continue.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplate",
    "Message",
    "Tool",
    "get_json_schema",
    "render_chat_template",
]

logger = logging.getLogger(__name__)

Message = Mapping[str, Any]
Tool = Union[Mapping[str, Any], Callable[..., Any]]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# ---------------------------------------------------------------------------- environment
class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body and records its span.

    HF uses the spans to build assistant-token masks; here they are exposed by
    :meth:`ChatTemplate.render_with_spans`.
    """

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self._blocks: list[str] | None = None
        self._spans: list[tuple[int, int]] | None = None

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        rv = caller()
        if self._blocks is not None and self._spans is not None:
            start = sum(len(b) for b in self._blocks)
            self._spans.append((start, start + len(rv)))
        return rv


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` as seen by templates: calling and ``fromkeys`` only."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja ``namespace`` that refuses underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


# ---------------------------------------------------------------------------- data cleaning
def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON-like types (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _tool_schemas(tools: Sequence[Tool] | None) -> list[Any] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)):
        raise ValueError("tools must be a list of JSON-schema dicts or functions")
    schemas: list[Any] = []
    for tool in tools:
        if isinstance(tool, Mapping):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise ValueError(
                "each tool must be a JSON-schema dict or a function with type hints and a Google-style "
                f"docstring, got {type(tool).__name__}"
            )
    return schemas


# ---------------------------------------------------------------------------- template
@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _make_environment().from_string(source)


class ChatTemplate:
    """A compiled chat template. Thread-safe for :meth:`render`; not for :meth:`render_with_spans`."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError("chat template source must be a non-empty string")
        self.source = source
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"invalid chat template: {e}") from e

    def _prepare(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None,
        documents: Sequence[Mapping[str, Any]] | None,
        continue_final_message: bool | str,
        add_generation_prompt: bool,
        kwargs: Mapping[str, Any],
    ) -> tuple[dict[str, Any], str | None]:
        messages = getattr(messages, "messages", messages)  # HF Conversation-like objects
        if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
            raise ValueError("messages must be a list of message dicts")
        chat = list(messages)
        if not chat:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = _plain(chat)
        for m in chat:
            if not isinstance(m, dict):
                raise ValueError(f"chat messages must be dicts, dataclasses or pydantic models, got {m!r}")
        chat = [{k: v for k, v in m.items() if v is not None} for m in chat]
        chat = _alias_reasoning(chat)
        if documents is not None:
            for d in documents:
                if not isinstance(d, Mapping):
                    raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
        final: str | None = None
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt are mutually exclusive")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final_value = chat[-1].get(field)
            if final_value is None:
                raise ValueError(f'continue_final_message is set but the final message has no "{field}"')
            fields = [field]
            if field in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_value]
            if not any(f in self.source for f in fields):
                raise ValueError(f'continue_final_message="{field}" is not a field this chat template reads')
            if isinstance(final_value, (list, tuple)):
                for block in reversed(final_value):
                    if isinstance(block, dict) and "text" in block:
                        final = block["text"]
                        block["text"] = block["text"] + _CONTINUE_TAG
                        break
                else:
                    raise ValueError("continue_final_message is set but the final message has no text block")
            else:
                final = str(final_value)
                for f in fields:
                    chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
        variables = {
            **_plain(dict(kwargs)),
            "messages": chat,
            "tools": _plain(_tool_schemas(tools)),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
        }
        return variables, final

    @staticmethod
    def _finish_continue(rendered: str, final: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in rendered or tag not in rendered:
            raise ValueError(
                "continue_final_message is set but the final message does not appear in the rendered chat"
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:loc]
        return rendered[:loc].rstrip()

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """Render one conversation to the prompt string.

        Raises:
            ValueError: bad messages / tools / option combination.
            jinja2.TemplateError: the template itself raised (``raise_exception``) or failed.
        """
        variables, final = self._prepare(
            messages, tools, documents, continue_final_message, add_generation_prompt, kwargs
        )
        rendered = self._template.render(**variables)
        if final is not None:
            rendered = self._finish_continue(rendered, final)
        return rendered

    def render_with_spans(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render and return the character spans of ``{% generation %}`` blocks (assistant text)."""
        variables, _ = self._prepare(messages, tools, None, False, add_generation_prompt, kwargs)
        ext = self._template.environment.extensions[_GenerationBlock.identifier]
        assert isinstance(ext, _GenerationBlock)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        ext._blocks, ext._spans = blocks, spans
        try:
            for block in self._template.generate(**variables):
                blocks.append(block)
        finally:
            ext._blocks = ext._spans = None
        return "".join(blocks), spans


def render_chat_template(
    source: str,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """One-shot :meth:`ChatTemplate.render` (the compiled template is cached by source)."""
    return ChatTemplate(source).render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)


# ---------------------------------------------------------------------------- functions → schema
_JSON_SCALARS: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC: dict[Any, dict[str, Any]] = {
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    list: {"type": "array"},
    tuple: {"type": "array"},
    dict: {"type": "object"},
    Any: {},
}
_description_re = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_args_re = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_args_split_re = re.compile(
    r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)",
    re.DOTALL,
)
_returns_re = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        values = [m.value for m in hint]
        if not values or any(type(v) not in _JSON_SCALARS for v in values):
            raise ValueError(f"Enum {hint.__name__} must have JSON-scalar member values")
        return _enum_schema(values)
    if origin is None:
        try:
            schema = _BASIC.get(hint)
        except TypeError:  # unhashable hint
            schema = None
        if schema is None:
            raise ValueError(f"cannot convert type hint {hint!r} to a JSON schema")
        return dict(schema)
    if origin is Union or origin is types.UnionType:
        subs = [_hint_schema(t) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise ValueError("typing.Literal values must be JSON scalars")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ValueError(f"unsupported tuple hint {hint!r}; use list[...]")
        return {"type": "array", "prefixItems": [_hint_schema(t) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _hint_schema(args[1])
        return out
    raise ValueError(f"cannot convert type hint {hint!r} to a JSON schema")


def get_json_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """JSON schema of a Python function for ``tools=`` (same output as ``transformers.get_json_schema``).

    Needs type hints on every argument and a Google-style docstring describing each one;
    ``(choices: [...])`` at the end of an argument description becomes an ``enum``.
    """
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ValueError(f"cannot build a JSON schema for {name}: it has no docstring")
    doc = doc.strip()
    m = _description_re.search(doc)
    description = m.group(1).strip() if m else None
    m = _args_re.search(doc)
    arg_docs: dict[str, str] = {}
    if m:
        block = "\n".join(line for line in m.group(1).split("\n") if line.strip())
        arg_docs = {g[1]: re.sub(r"\s*\n+\s*", " ", g[2].strip()) for g in _args_split_re.findall(block)}
    m = _returns_re.search(doc)
    returns_doc = m.group(1).strip() if m else None

    hints = get_type_hints(func)
    sig = inspect.signature(func)
    first = next(iter(sig.parameters), None)
    implicit = (
        first if first in {"self", "cls"} and sig.parameters[first].annotation is inspect.Parameter.empty else None
    )
    required: list[str] = []
    for pname, param in sig.parameters.items():
        if pname == implicit:
            continue
        if param.annotation is inspect.Parameter.empty:
            raise ValueError(f"argument {pname} of {name} has no type hint")
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    properties: dict[str, Any] = {}
    return_schema: dict[str, Any] | None = None
    for pname, hint in hints.items():
        if pname == implicit:
            continue
        if pname == "return":
            try:
                return_schema = _hint_schema(hint)
            except ValueError:
                pass
            continue
        properties[pname] = _hint_schema(hint)
    for pname, schema in properties.items():
        if pname not in arg_docs:
            raise ValueError(f"cannot build a JSON schema for {name}: the docstring does not describe {pname!r}")
        desc = arg_docs[pname]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", desc, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            desc = choices.string[: choices.start()].strip()
        schema["description"] = desc
    params: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        params["required"] = required
    out: dict[str, Any] = {"name": name, "description": description, "parameters": params}
    if return_schema is not None:
        if returns_doc is not None:
            return_schema["description"] = returns_doc
        out["return"] = return_schema
    return {"type": "function", "function": out}

"""Pydantic models of the HTTP API: OpenAI's request/response shapes (vLLM's extra sampling
fields included), the seeds' `/chat`, `/tokenize` and `/detokenize`.

Validation here is purely structural (types, ranges, enums); anything that needs the model
(context length, model name, chat template, JSON-schema compilation) is checked by the
handlers, which raise `OpenAIError` naming the offending field.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # top alternatives per token
MAX_BAD_WORDS = 256

NonNegFloat = Annotated[float, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Priority = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
StopStr = Annotated[str, Field(min_length=1)]
BadWord = Annotated[str, Field(min_length=1, max_length=256)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Model(BaseModel):
    """Requests ignore unknown fields (as OpenAI does for fields it does not know)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# ============================================================================ errors
class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


# ============================================================================ shared pieces
class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class SamplingFields(_Model):
    """Sampling fields shared by chat and completions (OpenAI's plus vLLM's extras)."""

    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    seed: Seed | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    logit_bias: dict[str, Any] | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = Field(
        default=None, description="Only these token ids may be generated (vLLM)."
    )
    bad_words: Annotated[list[BadWord], Field(max_length=MAX_BAD_WORDS)] | None = Field(
        default=None, description="Words that must not be generated (vLLM)."
    )
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    priority: Priority | None = Field(
        default=None, description="Engine priority class: lower values are served first (vLLM)."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# ============================================================================ chat: messages
class TextContentPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(description="data:image/...;base64,... or http(s)://... (local paths only with --allowed-local-media-path).")
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLContentPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Model):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(_Model):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


MessageContent = Union[str, list[TextContentPart]]
# Images only in user messages (as OpenAI).
UserContentPart = Annotated[Union[TextContentPart, ImageURLContentPart], Field(discriminator="type")]
UserContent = Union[str, list[UserContentPart]]


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: MessageContent
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: UserContent
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: MessageContent | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Model):
    role: Literal["tool"]
    content: MessageContent
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = Annotated[
    Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")
]


# ============================================================================ chat: tools & formats
class FunctionDefinition(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON Schema object.")
    strict: bool | None = None


class ChatCompletionToolParam(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.type 'json_schema' needs a 'json_schema' object")
        return self


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        default=None, description="Deprecated by OpenAI in favour of max_completion_tokens."
    )
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[ChatCompletionToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ============================================================================ chat: responses
class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Out):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ============================================================================ completions
class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: Union[
        str,
        Annotated[list[str], Field(min_length=1)],
        Annotated[list[TokenId], Field(min_length=1)],
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
    ]
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None
    multi_modal_data: Any = Field(default=None, description="Refused: images go through chat (as vLLM).")

    @model_validator(mode="after")
    def _no_images(self) -> CompletionRequest:
        if self.multi_modal_data is not None:
            raise ValueError("images are accepted only by /v1/chat/completions, as image_url content parts")
        return self


class CompletionLogprobs(_Out):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Out):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionChunk(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ============================================================================ models
class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwenkit"
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ============================================================================ /chat (the seeds')
class SimpleChatRequest(_Model):
    prompt: Annotated[str, Field(min_length=1)]
    system: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] = 200
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    stream: bool = False
    priority: Priority | None = None


class SimpleChatResponse(_Out):
    response: str
    finish_reason: str | None = None
    usage: UsageInfo


# ============================================================================ tokenizer
class TokenizeCompletionRequest(_Model):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class TokenizeChatRequest(_Model):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ChatCompletionToolParam] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(_Out):
    prompt: str


class HealthResponse(_Out):
    status: Literal["ok", "loading", "ready", "shutting_down", "error"]
    detail: str | None = None

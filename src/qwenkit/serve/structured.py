"""OpenAI structured output -> `SamplingParams.structured_outputs`: `response_format`
(json_object / json_schema) and forced tool calls (`tool_choice` "required" or a named
function). The engine compiles and applies the grammar; this module translates the request,
validates the schemas, and maps compilation errors back to the request's field names.
"""
from __future__ import annotations

from qwenkit.engine.structured_output import StructuredOutputError, check_json_schema
from qwenkit.sampling_params import StructuredOutputsParams, ToolCallSpec
from qwenkit.serve.engine_client import EngineClient
from qwenkit.serve.errors import OpenAIError, bad_request
from qwenkit.serve.protocol import ChatCompletionRequest, NamedToolChoice

__all__ = ["StructuredOutputError", "check_json_schema", "chat_structured_outputs"]

SCHEMA_PARAM = "response_format.json_schema.schema"


def _unavailable(param: str) -> OpenAIError:
    return bad_request(
        "structured output needs xgrammar: pip install 'qwenkit[structured]'",
        param=param, code="structured_output_unavailable",
    )  # fmt: skip


def chat_structured_outputs(engine: EngineClient, req: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The grammar a chat request asks for (None: free text), compiled ahead of submission.
    Raises a 400 naming the offending request field. Blocking (compiles): run in a thread."""
    rf, choice = req.response_format, req.tool_choice
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if rf is not None and rf.type != "text" and forced:
        raise bad_request("response_format cannot be combined with a forced tool_choice", param="response_format")
    if forced and not req.tools:
        raise bad_request("tool_choice needs 'tools'", param="tool_choice")
    tool_index: list[int] = []  # tool_calls entry -> index in req.tools
    if rf is not None and rf.type == "json_object":
        so = StructuredOutputsParams(json_object=True)
    elif rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None
        if rf.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema needs a 'schema'", param=SCHEMA_PARAM)
        try:
            check_json_schema(rf.json_schema.schema_, SCHEMA_PARAM)
        except StructuredOutputError as e:
            raise bad_request(str(e), param=e.param, code="invalid_schema") from None
        so = StructuredOutputsParams(json=rf.json_schema.schema_)
    elif forced:
        assert req.tools is not None
        tool_index = list(range(len(req.tools)))
        if isinstance(choice, NamedToolChoice):
            tool_index = [i for i in tool_index if req.tools[i].function.name == choice.function.name]
            if not tool_index:
                raise bad_request(
                    f"tool_choice names '{choice.function.name}', which is not in 'tools'",
                    param="tool_choice.function.name",
                )  # fmt: skip
        specs = [ToolCallSpec(req.tools[i].function.name, req.tools[i].function.parameters) for i in tool_index]
        so = StructuredOutputsParams(tool_calls=specs)
    else:
        return None
    try:
        engine.compile_structured_output(so)
    except ImportError:
        raise _unavailable("tool_choice" if forced else "response_format") from None
    except StructuredOutputError as e:
        param = _request_param(e.param, tool_index)
        raise bad_request(str(e).replace(e.param, param), param=param, code="invalid_schema") from None
    return so


def _request_param(param: str, tool_index: list[int]) -> str:
    """`structured_outputs.json` -> the schema's request field; `...tool_calls.<i>.parameters`
    -> `tools.<j>.function.parameters`."""
    parts = param.split(".")
    if parts[1:2] == ["tool_calls"] and len(parts) > 2 and parts[2].isdigit():
        return f"tools.{tool_index[int(parts[2])]}.function.parameters"
    if parts[1:2] == ["json"]:
        return SCHEMA_PARAM
    return "tool_choice" if tool_index else "response_format"

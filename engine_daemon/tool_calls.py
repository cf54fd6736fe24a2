"""OpenAI tools in a chat: put into the prompt, constrained in the output, read back from it.

Torch-free, so both sides import it: the engine renders a request's tools and tool turns into the
prompt (``messages_for_template``), the portal builds the schema that forces a call
(``tool_call_schema``) and reads calls out of what the model wrote (``parse_tool_calls``).

A model's chat template that knows tools gets them as ``tools=`` and the messages as they are. For
one that does not, the generic block is Hermes' convention (which Qwen2.5 and many fine-tunes were
trained on): a system message lists the tools as JSON inside ``<tools></tools>`` and asks for each
call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; earlier calls are written back
in those tags, and tool results come as a user turn inside ``<tool_response></tool_response>``, so
that templates knowing only system, user and assistant still render the conversation.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

# Read as the template's variable, not as a word in its text: ``tools`` in an expression or a test.
_TOOLS_IN_TEMPLATE = re.compile(r"(\{\{|\{%)[^}]*\btools\b")
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

GENERIC_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_supports_tools(template_source: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (it uses the variable in a tag)."""
    return bool(template_source) and _TOOLS_IN_TEMPLATE.search(template_source) is not None


def messages_for_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          native: bool) -> list[dict[str, Any]]:
    """The messages to render: as they are for a template that knows tools, else in the generic block.

    Both ways an assistant's call arguments become objects: OpenAI sends them as JSON strings, and
    templates (HF's convention) write them with ``tojson``, which would quote a string again.
    """
    if native:
        return [_with_argument_objects(m) for m in messages]
    rendered: list[dict[str, Any]] = []
    after_tool = False
    for message in messages:
        if message.get("role") == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if after_tool:  # a run of results is one user turn: templates may insist that roles alternate
                rendered[-1] = {**rendered[-1], "content": f"{rendered[-1]['content']}\n{response}"}
            else:
                rendered.append({"role": "user", "content": response})
            after_tool = True
            continue
        after_tool = False
        if message.get("tool_calls"):
            calls = "\n".join(_call_block(call) for call in message["tool_calls"])
            content = message.get("content") or ""
            rendered.append({"role": message["role"], "content": f"{content}\n{calls}" if content else calls})
        else:
            rendered.append(dict(message))
    if tools:
        block = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if rendered and rendered[0].get("role") == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0].get('content') or ''}\n\n{block}"}
        else:
            rendered.insert(0, {"role": "system", "content": block})
    return rendered


def tool_call_schema(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of the call the output must be: of the named function, or ("required") of any tool.

    The constrained output is the call's JSON object itself, without tags; ``parse_tool_calls`` reads it.
    """
    if tool_choice == "required":
        shapes = [_call_shape(tool["function"]) for tool in tools]
        return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    if not isinstance(tool_choice, dict):
        raise ValueError(f"tool_choice must be 'required' or names a function, got {tool_choice!r}")
    name = tool_choice["function"]["name"]
    for tool in tools:
        if tool["function"]["name"] == name:
            return _call_shape(tool["function"])
    raise ValueError(f"tool_choice names {name!r}, which is not among the tools")


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content left once the calls are taken out, or None; the calls in OpenAI's shape).

    A call is a ``<tool_call>{json}</tool_call>`` block, or the whole text as one JSON object (as
    constrained output is, and as Llama 3.1 writes a call, with "parameters"). A block naming no
    declared tool, or whose JSON does not parse, stays in the content: it is no call.
    """
    names = {tool["function"]["name"] for tool in tools}
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        call = _call(match.group(1), names)
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    content = _TOOL_CALL_BLOCK.sub(take, text)
    if not calls and (whole := _call(text.strip(), names)) is not None:
        return None, [whole]
    content = content.strip()
    return (content or None) if calls else text, calls


def _call(source: str, names: set[str]) -> dict[str, Any] | None:
    """One call in OpenAI's shape from its JSON, or None when it is not a call of a declared tool."""
    try:
        value = json.loads(source)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _call_shape(function: dict[str, Any]) -> dict[str, Any]:
    # OpenAI: a function without "parameters" takes none.
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or _NO_PARAMETERS},
            "required": ["name", "arguments"], "additionalProperties": False}


def _call_block(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    body = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments"))}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def _with_argument_objects(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call.get("function", {}),
                                   "arguments": _arguments_object(call.get("function", {}).get("arguments"))}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _arguments_object(arguments: Any) -> Any:
    """OpenAI's JSON-string arguments as the object they encode (left as they are if they are no JSON)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments

"""Between the Responses API and chat completions: a request's input items become chat
messages (and its tools, tool choice and text format the chat fields), and a
``chat.completion`` becomes a response's output items.

Every backend serves chat, so the Responses API works on all of them this way: the
local model, chat-only upstreams (vLLM, Ollama, litellm's providers) and OpenAI alike.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from proxy.errors import InvalidRequestError
from proxy.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    InputItem,
    InputText,
    ItemReference,
    MessageItem,
    Part,
    ReasoningItem,
    Refusal,
    ResponsesRequest,
    function_tools,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- input -> chat ---------------------------------------------------------------------------

def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of items in their full form, each with an id (what
    ``GET /v1/responses/{id}/input_items`` lists)."""
    raw: list[InputItem]
    if req.input == "":  # a continuation with nothing new
        return []
    if isinstance(req.input, str):
        raw = [MessageItem(role="user", content=[InputText(type="input_text", text=req.input)])]
    else:
        raw = list(req.input)
    items = []
    for item in raw:
        data = item.model_dump(by_alias=True, exclude_none=True)
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            data["content"] = [{"type": kind, "text": item.content}]
        data.setdefault("id", new_id({"message": "msg", "function_call": "fc",
                                      "function_call_output": "fco"}.get(item.type, "item")))
        items.append(data)
    return items


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input (instructions aside) as chat messages."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}] if req.input else []
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(req.input):
        _add(messages, item, index)
    return messages


def _add(messages: list[dict[str, Any]], item: InputItem, index: int) -> None:
    if isinstance(item, MessageItem):
        content = item.content if isinstance(item.content, str) else _parts(item, index)
        messages.append({"role": item.role, "content": content})
    elif isinstance(item, FunctionCallItem):
        call = {"id": item.call_id, "type": "function",
                "function": {"name": item.name, "arguments": item.arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # one turn: text, then calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else "".join(
            p.text for p in item.output if isinstance(p, InputText))
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    elif isinstance(item, ItemReference):
        raise InvalidRequestError("Item references are not supported: send the item itself.",
                                  param=f"input.[{index}]", code="unsupported_item")
    elif isinstance(item, ReasoningItem):
        pass  # a reasoning model's own notes; a chat model has no use for them


def _parts(item: MessageItem, index: int) -> str | list[dict[str, Any]]:
    """Content parts as chat parts; text alone collapses to a string (every chat
    template reads that)."""
    assert isinstance(item.content, list)
    parts: list[dict[str, Any]] = []
    for at, part in enumerate(item.content):
        parts.append(_part(part, f"input.[{index}].content.[{at}]"))
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _part(part: Part, param: str) -> dict[str, Any]:
    if isinstance(part, InputText):
        return {"type": "text", "text": part.text}
    if isinstance(part, Refusal):
        return {"type": "text", "text": part.refusal}
    if isinstance(part, InputImage):
        if not part.image_url:
            raise InvalidRequestError("Images by file_id are not supported: send image_url "
                                      "(a URL or a data: URL).", param=f"{param}.file_id")
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail}}
    raise InvalidRequestError("File inputs are not supported by this proxy.", param=f"{param}.type",
                              code="unsupported_content")


def chat_body(req: ResponsesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request a backend answers for ``req``; ``messages``: the conversation,
    earlier turns of ``previous_response_id`` included."""
    if req.instructions:
        messages = [{"role": "system", "content": req.instructions}, *messages]
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    for field, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature),
                         ("top_p", req.top_p)):
        if value is not None:
            body[field] = value
    tools = function_tools(req)
    if tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True,
                                                                       exclude={"type"})}
                         for t in tools]
        if req.parallel_tool_calls is not None:  # chat refuses it without tools
            body["parallel_tool_calls"] = req.parallel_tool_calls
    choice = req.tool_choice
    if choice is not None and (tools or isinstance(choice, str)):
        body["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise InvalidRequestError("Missing required parameter: 'text.format.schema'.",
                                      param="text.format.schema", code="invalid_value")
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


# -- chat -> response ------------------------------------------------------------------------

def output_items(data: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """A chat.completion's first choice as output items, and its finish reason."""
    choices = data.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    items: list[dict[str, Any]] = []
    text = message.get("content")
    calls = message.get("tool_calls") or []
    if isinstance(text, str) and (text or not calls):
        items.append(message_item(new_id("msg"), text))
    for call in calls:
        fn = call.get("function") or {}
        items.append(function_call_item(new_id("fc"), call.get("id") or new_id("call"),
                                        fn.get("name") or "", _arguments(fn.get("arguments"))))
    return items, choice.get("finish_reason")


def _arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion)}


def response_object(req: ResponsesRequest, response_id: str, created: float, *,
                    status: str = "in_progress", output: list[dict[str, Any]] | None = None,
                    finish: str | None = None, chat_usage: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response object in OpenAI's shape. A ``length`` finish makes it incomplete."""
    incomplete = None
    if status == "completed" and finish == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if (
        req.text and req.text.format) else {"type": "text"}
    choice = req.tool_choice
    return {
        "id": response_id, "object": "response", "created_at": int(created),
        "status": status, "background": False, "error": error,
        "incomplete_details": incomplete, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "model": req.model,
        "output": output or [], "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": req.store,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": {"format": fmt},
        "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str)
        else (choice or "auto"),
        "tools": [t.model_dump(exclude_none=True) for t in function_tools(req)],
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": "disabled", "usage": usage(chat_usage), "user": req.user,
        "metadata": req.metadata or {},
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
    }


def reply_text(output: list[dict[str, Any]]) -> str:
    """The text of a response's messages (what write-back records as the reply)."""
    return "".join(part.get("text", "") for item in output if item.get("type") == "message"
                   for part in item.get("content") or [] if part.get("type") == "output_text")


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output as chat messages, to continue the conversation from."""
    text = reply_text(output)
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i.get("type") == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message] if text or calls else []

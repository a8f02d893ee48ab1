"""Drop-in: the clients people use, with only the base URL changed. LangChain (chat and
Responses), the OpenAI Agents SDK (Responses and chat models, a function tool round
trip) and pydantic-ai (chat and Responses), against the scripted fake upstream, which
serves chat only (so the Responses API is translated), and the embedded model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.openai import OpenAIResponsesModel as PaiResponses
from pydantic_ai.providers.openai import OpenAIProvider

from proxy.app import create_app
from proxy.testing.fake_upstream import FakeUpstream, Reply, completion
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings

set_tracing_disabled(True)  # the Agents SDK would send traces to OpenAI otherwise
TEXT = "Hello from the fake upstream."


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Live]:
    with serve(create_app(upstream_settings(tmp_path, upstream))) as server:
        yield server


def async_client(live: Live) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.base_url, api_key="sk-any", max_retries=0)


@pytest.mark.parametrize("responses", [False, True])
def test_langchain_chat_openai(live: Live, upstream: FakeUpstream, responses: bool) -> None:
    llm = ChatOpenAI(model="up", base_url=live.base_url, api_key="sk-any",  # type: ignore[arg-type]
                     use_responses_api=responses, max_retries=0)
    message = llm.invoke("Say hi")
    assert message.text == TEXT
    # Through /v1/responses when asked: its ids are the proxy's stored responses'.
    assert str(message.response_metadata.get("id", "")).startswith("resp_") == responses
    assert "".join(chunk.text for chunk in llm.stream("Say hi")) == TEXT
    assert upstream.history[-1].path.endswith("/chat/completions")
    assert upstream.history[-1].body["messages"][-1] == {"role": "user", "content": "Say hi"}


def weather_script(upstream: FakeUpstream) -> None:
    upstream.enqueue(
        Reply(completion(content=None, tool_calls=[{
            "id": "call_7", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}])),
        Reply(completion("It is snowing in Oslo.")))


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"snow in {city}"


def tool_result_sent(upstream: FakeUpstream) -> dict[str, object]:
    return next(m for m in upstream.history[-1].body["messages"] if m["role"] == "tool")


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_agents_sdk_function_tool_round_trip(live: Live, upstream: FakeUpstream,
                                             kind: str) -> None:
    client = async_client(live)
    model = (OpenAIResponsesModel(model="up", openai_client=client) if kind == "responses"
             else OpenAIChatCompletionsModel(model="up", openai_client=client))
    agent = Agent(name="weather", instructions="Use the tool.", model=model,
                  tools=[get_weather])
    weather_script(upstream)
    result = asyncio.run(Runner.run(agent, "Weather in Oslo?"))
    assert result.final_output == "It is snowing in Oslo."
    ids = [r.response_id or "" for r in result.raw_responses]
    assert len(ids) == 2 and all(i.startswith("resp_") == (kind == "responses") for i in ids)
    sent = tool_result_sent(upstream)
    assert sent["tool_call_id"] == "call_7" and sent["content"] == "snow in Oslo"
    first = upstream.history[-2].body
    assert first["messages"][0] == {"role": "system", "content": "Use the tool."}
    assert first["tools"][0]["function"]["name"] == "get_weather"


def test_agents_sdk_streamed_run(live: Live) -> None:
    agent = Agent(name="hi", model=OpenAIResponsesModel(model="up",
                                                        openai_client=async_client(live)))

    async def run() -> tuple[str, list[str]]:
        result = Runner.run_streamed(agent, "Say hi")
        kinds = [event.type async for event in result.stream_events()]
        return str(result.final_output), kinds

    output, kinds = asyncio.run(run())
    assert output == TEXT and "raw_response_event" in kinds


@pytest.mark.parametrize("responses", [False, True])
def test_pydantic_ai(live: Live, upstream: FakeUpstream, responses: bool) -> None:
    provider = OpenAIProvider(base_url=live.base_url, api_key="sk-any")
    model = (PaiResponses("up", provider=provider) if responses
             else OpenAIChatModel("up", provider=provider))
    agent = PydanticAgent(model, instructions="Be brief.")
    result = agent.run_sync("Say hi")
    assert result.output == TEXT
    assert str(result.response.provider_response_id).startswith("resp_") == responses
    sent = upstream.history[-1].body["messages"]
    assert sent[0]["role"] in ("system", "developer") and "Be brief." in json.dumps(sent[0])


def test_pydantic_ai_tool_round_trip_on_responses(live: Live, upstream: FakeUpstream) -> None:
    provider = OpenAIProvider(base_url=live.base_url, api_key="sk-any")
    agent = PydanticAgent(PaiResponses("up", provider=provider))

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"snow in {city}"

    weather_script(upstream)
    assert agent.run_sync("Weather in Oslo?").output == "It is snowing in Oslo."
    assert tool_result_sent(upstream)["content"] == "snow in Oslo"


# -- the embedded model ------------------------------------------------------------------


def test_clients_on_the_local_model(local_server: Live) -> None:
    base = local_server.base_url
    llm = ChatOpenAI(model="local", base_url=base, api_key="sk-any",  # type: ignore[arg-type]
                     use_responses_api=True, temperature=0, max_tokens=8, max_retries=0)
    assert llm.invoke("Say hi").text
    client = openai.AsyncOpenAI(base_url=base, api_key="sk-any", max_retries=0)
    agent = Agent(name="local", model=OpenAIResponsesModel(model="local", openai_client=client))
    assert asyncio.run(Runner.run(agent, "Say hi", max_turns=1)).final_output
    pai = PydanticAgent(PaiResponses("local", provider=OpenAIProvider(base_url=base,
                                                                      api_key="sk-any")))
    assert pai.run_sync("Say hi", model_settings={"max_tokens": 8}).output

"""A LangGraph agent to put behind agentwire: a graph served by ag-ui-langgraph (the official AG-UI
adapter for LangGraph) under uvicorn, with what a real LangGraph agent has and agentwire must
relay: a backend tool (a calculator, run by a ToolNode), a human-in-the-loop interrupt, a
frontend tool (one the client declares in RunAgentInput.tools and runs itself) and a
checkpointer (MemorySaver) keeping each thread's messages between runs.

The chat model is scripted (a langchain_core BaseChatModel that streams the way OpenAI's does,
tool calls as tool_call_chunks), so it runs with no LLM, no API key and no network;
`--model openai:gpt-4o` swaps in a real one. Everything about AG-UI (the RunAgentInput it reads,
the SSE events it streams, how it merges the client's history into the checkpoint, interrupts
and resumes) is ag-ui-langgraph's, not this file's.

What the scripted model does with the last message:
  - "what is 12 * (3 + 4)?"  calls `calculate`, then answers "12 * (3 + 4) = 84."
  - "ask me ..." / "confirm" calls `approve`, which interrupts the graph with
                             {"question": ..., "options": ["yes", "no"]}; once resumed with the
                             human's answer it says "You said: yes."
  - "what is my local time?" calls the client's `get_local_time` tool, if the client declared
                             one; the run ends there, and when the next run brings the tool's
                             result it answers "Your local time is <result>."
  - "... long ..."           answers with about 200 KB of text, in several chunks
  - "... slowly ..."         answers a word every half second (to try cancel)
  - anything else            "I have seen 3 messages from you."
With MODEL_INPUT_LOG set, each model call appends one JSON line to that file: the messages the
model was given.

    python agent.py --port 9001            # then [agent] kind = "ag-ui", url = "http://127.0.0.1:9001/"
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import operator
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import uvicorn
from ag_ui_langgraph import LangGraphAgent, add_langgraph_fastapi_endpoint
from ag_ui_langgraph.interrupts import DEFAULT_RESUME_SENTINEL_CANCELLED
from fastapi import FastAPI
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_chunk_to_message,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import MemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt

OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
}
ARITHMETIC = re.compile(r"[\d.]+(?:\s*[-+*/%^]\s*\(?\s*[\d.]+\s*\)?)+")
SYSTEM_PROMPT = "You are a helpful calculator. Ask the user before doing anything they may regret."


def evaluate(node: ast.AST) -> float:
    """Arithmetic only: numbers and + - * / % **, nothing else of Python."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    raise ValueError("only arithmetic is allowed")


@tool
def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression, like 12 * (3 + 4)."""
    try:
        value = evaluate(ast.parse(expression, mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError) as error:
        return f"error: {error}"
    return str(int(value)) if float(value).is_integer() else str(value)


@tool
def approve(question: str) -> str:
    """Asks the human a yes/no question and returns their answer."""
    # Pauses the graph: the run ends here, and the next run resumes it with the human's answer
    # (LangGraph re-runs this tool from the top, and interrupt() then returns that answer).
    answer = interrupt({"question": question, "options": ["yes", "no"]})
    if isinstance(answer, dict) and answer.get(DEFAULT_RESUME_SENTINEL_CANCELLED):
        return "cancelled"  # what ag-ui-langgraph resumes with for a resume entry of status "cancelled"
    return answer if isinstance(answer, str) else json.dumps(answer)


BACKEND_TOOLS = [calculate, approve]


def text_of(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(
        part if isinstance(part, str) else str(part.get("text", ""))
        for part in message.content
    )


def log_model_input(messages: Sequence[BaseMessage]) -> None:
    """One JSON line per model call, for tests to check what the model was given."""
    path = os.environ.get("MODEL_INPUT_LOG")
    if not path:
        return
    line = json.dumps([
        {
            "type": message.type,
            "id": message.id,
            "content": message.content,
            "tool_calls": [
                {"name": call["name"], "args": call["args"], "id": call["id"]}
                for call in getattr(message, "tool_calls", None) or []
            ],
            "tool_call_id": getattr(message, "tool_call_id", None),
        }
        for message in messages
    ])
    with open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


class ScriptedChatModel(BaseChatModel):
    """Stands in for an LLM, and streams like OpenAI's: text in several chunks, a tool call as
    tool_call_chunks (the first with the call's id and name, the next ones with pieces of its
    JSON arguments, all with the same index), then a last empty chunk with the finish reason."""

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _script(self, messages: list[BaseMessage], tools: list[dict]) -> tuple[list[AIMessageChunk], bool]:
        """The chunks of the answer to `messages`, and whether to send them slowly."""
        log_model_input(messages)
        tool_names = {t["function"]["name"] for t in tools}
        humans = [text_of(m) for m in messages if isinstance(m, HumanMessage)]
        last = messages[-1] if messages else HumanMessage("")

        if isinstance(last, ToolMessage):
            call = next(
                (c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls if c["id"] == last.tool_call_id),
                None,
            )
            name = call["name"] if call else last.name
            result = text_of(last)
            if name == "calculate" and call:
                answer = f"{call['args'].get('expression', '?')} = {result}."
            elif name == "approve":
                answer = f"You said: {result}."
            elif name == "get_local_time":
                answer = f"Your local time is {result}."
            else:
                answer = f"The tool {name} said: {result}."
            return text_chunks(answer), False

        latest = text_of(last) if isinstance(last, HumanMessage) else ""
        lowered = latest.lower()
        if "local time" in lowered and "get_local_time" in tool_names:
            return tool_call_chunks("get_local_time", {}), False
        if ("ask me" in lowered or "confirm" in lowered) and "approve" in tool_names:
            return tool_call_chunks("approve", {"question": f"Do you want me to go ahead with: {latest}?"}), False
        expression = ARITHMETIC.search(latest)
        if expression and "calculate" in tool_names:
            return tool_call_chunks("calculate", {"expression": expression.group(0).replace("^", "**")}), False
        seen = f"I have seen {len(humans)} message{'s' if len(humans) != 1 else ''} from you."
        if "long" in lowered:
            line = "This line is part of a long answer, written to make the thread big. " * 4 + "\n"
            body = line * (200_000 // len(line))
            size = 25_000
            return [AIMessageChunk(content=seen + "\n")] + [
                AIMessageChunk(content=body[i : i + size]) for i in range(0, len(body), size)
            ] + [last_chunk("stop")], False
        return text_chunks(seen), "slowly" in lowered

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks, _ = self._script(messages, kwargs.get("tools") or [])
        message = chunks[0]
        for chunk in chunks[1:]:
            message = message + chunk
        return ChatResult(generations=[ChatGeneration(message=message_chunk_to_message(message))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chunks, _ = self._script(messages, kwargs.get("tools") or [])
        for chunk in chunks:
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks, slowly = self._script(messages, kwargs.get("tools") or [])
        for chunk in chunks:
            if slowly and chunk.content:
                await asyncio.sleep(0.5)
            yield ChatGenerationChunk(message=chunk)


def last_chunk(finish_reason: str) -> AIMessageChunk:
    return AIMessageChunk(content="", response_metadata={"finish_reason": finish_reason}, chunk_position="last")


def text_chunks(answer: str) -> list[AIMessageChunk]:
    return [AIMessageChunk(content=word) for word in re.findall(r"\S+\s*", answer)] + [last_chunk("stop")]


def tool_call_chunks(name: str, args: dict) -> list[AIMessageChunk]:
    """As OpenAI streams a call: id and name first (arguments ""), then the JSON in pieces."""
    arguments = json.dumps(args)
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    pieces = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
    return [
        AIMessageChunk(content="", tool_call_chunks=[{"id": call_id, "name": name, "args": "", "index": 0}]),
        *(AIMessageChunk(content="", tool_call_chunks=[{"id": None, "name": None, "args": p, "index": 0}]) for p in pieces),
        last_chunk("tool_calls"),
    ]


class AgentState(MessagesState):
    # The client's tools (RunAgentInput.tools, as {name, description, parameters}):
    # ag-ui-langgraph writes them here when the graph's state has a `tools` key.
    tools: list[dict]


model: BaseChatModel = ScriptedChatModel()


async def call_model(state: AgentState, config: RunnableConfig) -> dict:
    bound = model.bind_tools([*BACKEND_TOOLS, *state.get("tools", [])])
    response = await bound.ainvoke([SystemMessage(SYSTEM_PROMPT), *state["messages"]], config)
    return {"messages": [response]}


def route(state: AgentState) -> str:
    """Our own tools run here; a call to any other tool (the client's) ends the run, and the
    client sends its result with the next one."""
    calls = getattr(state["messages"][-1], "tool_calls", None) or []
    backend = {t.name for t in BACKEND_TOOLS}
    if calls and all(call["name"] in backend for call in calls):
        return "tools"
    return END


builder = StateGraph(AgentState)
builder.add_node("model", call_model)
builder.add_node("tools", ToolNode(BACKEND_TOOLS))
builder.add_edge(START, "model")
builder.add_conditional_edges("model", route, ["tools", END])
builder.add_edge("tools", "model")
graph = builder.compile(checkpointer=MemorySaver())


def main() -> None:
    global model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--model", help="a real model instead of the scripted one, e.g. openai:gpt-4o")
    parser.add_argument("--no-raw-events", action="store_true", help="leave out ag-ui-langgraph's RAW events")
    parser.add_argument(
        "--interrupt-outcome",
        action="store_true",
        help="end an interrupted run with RUN_FINISHED's outcome {type: interrupt} as well",
    )
    options = parser.parse_args()
    if options.model:
        from langchain.chat_models import init_chat_model

        model = init_chat_model(options.model)

    agent = LangGraphAgent(
        name="calculator",
        description="A calculator that asks before it acts.",
        graph=graph,
        emit_raw_events=not options.no_raw_events,
        emit_interrupt_outcome=options.interrupt_outcome,
    )
    app = FastAPI()
    add_langgraph_fastapi_endpoint(app, agent, "/")
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    server = uvicorn.Server(config)

    async def serve() -> None:
        # The bound port, on one line, for whoever started us (the tests pass --port 0).
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            return await task
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"listening on http://{options.host}:{port}/", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()

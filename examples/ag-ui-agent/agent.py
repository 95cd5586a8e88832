"""A small AG-UI agent to put behind agentwire: Pydantic AI's AG-UI adapter serving an agent with
one real tool (a calculator).

The model is scripted (Pydantic AI's FunctionModel), so it runs with no LLM, no API key and no
network; `--model openai:gpt-4o` (or any model name Pydantic AI knows) swaps in a real one.
Everything about AG-UI (the RunAgentInput it reads, the SSE events it streams) is the
framework's, not this file's.

    python agent.py --port 9000            # then [agent] kind = "ag-ui", url = "http://127.0.0.1:9000/"
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import operator
import re
from collections.abc import AsyncIterator

import uvicorn
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.ui.ag_ui import AGUIAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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


def user_prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


async def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    """Stands in for an LLM: calls the calculator for arithmetic, then answers in a few chunks,
    saying what it remembers of the thread (the history agentwire sends with each run)."""
    prompts = user_prompts(messages)
    latest = prompts[-1] if prompts else ""
    last = messages[-1]
    tool_result = next(
        (p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart)),
        None,
    )
    expression = ARITHMETIC.search(latest)
    if expression and tool_result is None:
        args = json.dumps({"expression": expression.group(0).replace("^", "**")})
        yield {0: DeltaToolCall(name="calculate", json_args=args)}
        return
    if tool_result is not None:
        answer = f"The calculator says {tool_result.content}."
    else:
        answer = f"You said: {latest}."
    if len(prompts) > 1:
        answer += f" This thread has {len(prompts)} messages from you; the first was: {prompts[0]}"
    else:
        answer += " This is the first message of the thread."
    slowly = "slowly" in latest
    for word in re.findall(r"\S+\s*", answer):
        if slowly:
            await asyncio.sleep(0.5)
        yield word


agent = Agent(FunctionModel(stream_function=scripted_model), instructions="You are a helpful calculator.")


@agent.tool_plain
def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression, like 12 * (3 + 4)."""
    try:
        value = evaluate(ast.parse(expression, mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError) as error:
        return f"error: {error}"
    return str(int(value)) if float(value).is_integer() else str(value)


async def run(request: Request) -> Response:
    return await AGUIAdapter.dispatch_request(request, agent=agent)


async def health(_: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/", run, methods=["POST"]), Route("/healthz", health)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--model", help="a real model instead of the scripted one, e.g. openai:gpt-4o")
    options = parser.parse_args()
    if options.model:
        agent.model = options.model
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    server = uvicorn.Server(config)

    async def serve() -> None:
        # The bound port, on one line, for whoever started us (the tests pass --port 0).
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"listening on http://{options.host}:{port}/", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()

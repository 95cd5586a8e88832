// The AG-UI project's own client (@ag-ui/client's HttpAgent) against agentwire's POST /ag-ui.
// Its runAgent() checks every event against AG-UI's ordering rules and throws on the first
// violation, so a run that completes here is a valid AG-UI run.
//
//   node client.mjs conversation <url> <user JWT> <threadId>   two turns, prints what it saw
//   node client.mjs cancel <url> <user JWT> <threadId>         aborts a run once it streams
//   node client.mjs frontend-tool <url> <user JWT> <threadId>  a frontend tool's round trip:
//     declares get_local_time, runs it when the agent calls it, sends the result back
import { HttpAgent } from "@ag-ui/client";

const [mode, url, token, threadId] = process.argv.slice(2);
const agent = new HttpAgent({ url, threadId, headers: { Authorization: `Bearer ${token}` } });

async function turn(id, content, runId) {
  agent.addMessage({ id, role: "user", content });
  const events = [];
  const result = await agent.runAgent(runId ? { runId } : {}, {
    onEvent({ event }) {
      events.push(event);
    },
  });
  return { events, newMessages: result.newMessages };
}

if (mode === "conversation") {
  const first = await turn("u1", "what is 12 * (3 + 4)?", "run-one");
  const second = await turn("u2", "and how many words is this?");
  console.log(JSON.stringify({ runs: [first, second], messages: agent.messages }));
} else if (mode === "cancel") {
  agent.addMessage({ id: "u1", role: "user", content: "a long question that takes a while" });
  const events = [];
  await agent.runAgent({ runId: "run-aborted" }, {
    onEvent({ event }) {
      events.push(event.type);
      if (event.type === "TOOL_CALL_START") agent.abortRun();
    },
  });
  console.log(JSON.stringify({ events }));
} else if (mode === "frontend-tool") {
  const tools = [{ name: "get_local_time", description: "The user's local time",
    parameters: { type: "object", properties: {} } }];
  agent.addMessage({ id: "u1", role: "user", content: "what is my local time?" });
  const first = [];
  await agent.runAgent({ tools }, { onEvent({ event }) { first.push(event); } });
  const start = first.find((e) => e.type === "TOOL_CALL_START" && e.toolCallName === "get_local_time");
  // The client runs its tool and answers with a tool message, as CopilotKit does.
  agent.addMessage({ id: "tool-1", role: "tool", toolCallId: start.toolCallId, content: "14:05" });
  const second = [];
  await agent.runAgent({ tools }, { onEvent({ event }) { second.push(event); } });
  const text = second.filter((e) => e.type === "TEXT_MESSAGE_CONTENT").map((e) => e.delta).join("");
  console.log(JSON.stringify({ first: first.map((e) => e.type), second: second.map((e) => e.type), text }));
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}

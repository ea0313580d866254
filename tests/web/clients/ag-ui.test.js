// The AG-UI dialect (`/v1/ag-ui`) driven by the published `@ag-ui/client`: `HttpAgent.runAgent`,
// whose verifier enforces the protocol's event order and whose schemas parse every event.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { HttpAgent } from "@ag-ui/client";

import { api, echoOf, failingUpstream, history, startParley } from "./lib.js";

const KEY = "pk_acme_0123456789abcdef0123456789abcdef";
const OTHER_KEY = "pk_globex_fedcba9876543210fedcba9876543210";

let parley;
let failing;
let upstream;

before(async () => {
  upstream = await failingUpstream();
  [parley, failing] = await Promise.all([
    startParley({ PARLEY_AUTH: "api_key", PARLEY_API_KEYS: `acme:${KEY},globex:${OTHER_KEY}` }),
    startParley({
      PARLEY_MODEL_PROVIDER: "openai",
      OPENAI_BASE_URL: upstream.url,
      OPENAI_API_KEY: "sk-clients-test",
      PARLEY_MODEL_MAX_RETRIES: "0",
      PARLEY_AUTH: "api_key",
      PARLEY_API_KEYS: `acme:${KEY}`,
    }),
  ]);
});

after(async () => {
  await Promise.all([parley?.stop(), failing?.stop()]);
  await upstream?.close();
});

let threads = 0;
const newThread = () => `thread-${Date.now()}-${++threads}`;

function agent(base, threadId, key = KEY) {
  return new HttpAgent({ url: `${base}/v1/ag-ui`, threadId, headers: { Authorization: `Bearer ${key}` } });
}

/** Runs the agent once with a new user message; the events it received, in order. */
async function run(a, id, content) {
  if (content !== undefined) a.addMessage({ id, role: "user", content });
  const events = [];
  const result = await a.runAgent({ runId: `run-${id}` }, { onEvent: ({ event }) => events.push(event) });
  return { events, result };
}

const types = (events) => events.map((e) => e.type);
const contents = (messages) => messages.map((m) => m.content);

test("a plain turn: RUN_STARTED, parley's turn, one text message, RUN_FINISHED", async () => {
  const threadId = newThread();
  const a = agent(parley.base, threadId);
  const { events, result } = await run(a, "m1", "hello");
  const deltas = events.filter((e) => e.type === "TEXT_MESSAGE_CONTENT").length;
  assert.deepEqual(types(events), [
    "RUN_STARTED",
    "CUSTOM",
    "TEXT_MESSAGE_START",
    ...Array(deltas).fill("TEXT_MESSAGE_CONTENT"),
    "TEXT_MESSAGE_END",
    "RUN_FINISHED",
  ]);
  assert.equal(events[0].threadId, threadId);
  assert.equal(events[0].runId, "run-m1");
  assert.equal(events[1].name, "parley.turn");
  assert.equal(events[1].value.session_id, threadId);
  const reply = a.messages.at(-1);
  assert.equal(reply.role, "assistant");
  assert.equal(reply.content, echoOf("hello"));
  assert.deepEqual(result.newMessages.map((m) => m.id), [reply.id]);
  const stored = await history(parley.base, threadId, { key: KEY });
  assert.deepEqual(contents(stored), ["hello", echoOf("hello")]);
  assert.equal(stored[1].id, reply.id, "the assistant message id is parley's");
  assert.equal(stored[0].metadata.client_message_id, "m1");
});

test("parley's history is the truth: the resent history is never stored twice", async () => {
  const threadId = newThread();
  const a = agent(parley.base, threadId);
  await run(a, "m1", "one");
  // The agent resends its whole history (m1 and the reply) with m2: only m2 is new.
  await run(a, "m2", "two");
  assert.equal(a.messages.at(-1).content, echoOf("two", 2));
  const expected = ["one", echoOf("one"), "two", echoOf("two", 2)];
  assert.deepEqual(contents(await history(parley.base, threadId, { key: KEY })), expected);
  // A stale client (a fresh agent that knows other messages) only adds its newest user message;
  // the model sees parley's history.
  const stale = agent(parley.base, threadId);
  stale.addMessage({ id: "x1", role: "user", content: "something parley never saw" });
  stale.addMessage({ id: "x2", role: "assistant", content: "made up" });
  await run(stale, "m3", "three");
  assert.equal(stale.messages.at(-1).content, echoOf("three", 4));
  // Running again with nothing new is refused (422), and nothing is stored.
  await assert.rejects(run(a), /422|no user message/);
  assert.deepEqual(contents(await history(parley.base, threadId, { key: KEY })), [...expected, "three", echoOf("three", 4)]);
});

test("a tool turn: TOOL_CALL_START/ARGS/END and TOOL_CALL_RESULT, then the answer", async () => {
  const threadId = newThread();
  const a = agent(parley.base, threadId);
  const { events } = await run(a, "m1", '/tool calculator {"expression": "2 + 3"}');
  const kinds = types(events);
  const start = kinds.indexOf("TOOL_CALL_START");
  assert.deepEqual(kinds.slice(start, start + 4), ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"]);
  const [call, args, , result] = events.slice(start, start + 4);
  assert.equal(call.toolCallName, "calculator");
  assert.deepEqual(JSON.parse(args.delta), { expression: "2 + 3" });
  assert.equal(result.toolCallId, call.toolCallId);
  assert.match(result.content, /5/);
  assert.equal(kinds.at(-1), "RUN_FINISHED");
  const caller = a.messages.find((m) => m.role === "assistant" && m.toolCalls?.length);
  assert.equal(caller.toolCalls[0].function.name, "calculator");
  assert.equal(a.messages.find((m) => m.role === "tool").toolCallId, call.toolCallId);
  assert.match(a.messages.at(-1).content, /^echo: tool calculator returned: .*5/);
  const stored = await history(parley.base, threadId, { key: KEY });
  assert.deepEqual(stored.map((m) => m.role), ["user", "assistant", "tool", "assistant"]);
});

test("an upstream failure ends the run with RUN_ERROR, and nothing is stored", async () => {
  const threadId = newThread();
  const a = agent(failing.base, threadId);
  const events = [];
  a.addMessage({ id: "m1", role: "user", content: "hello" });
  await a
    .runAgent({ runId: "r1" }, { onEvent: ({ event }) => events.push(event), onRunFailed: () => ({ stopPropagation: true }) })
    .catch(() => {});
  assert.equal(events.at(-1).type, "RUN_ERROR");
  assert.equal(events.at(-1).message, "the model endpoint answered with HTTP status 500");
  assert.equal(events.at(-1).code, "upstream_error");
  assert.ok(!JSON.stringify(events).includes("db-7"));
  assert.deepEqual(await history(failing.base, threadId, { key: KEY }), []);
});

test("the agent's headers carry the key; another tenant cannot read the thread (404)", async () => {
  const threadId = newThread();
  await run(agent(parley.base, threadId), "m1", "mine");
  const other = await api(parley.base, "GET", `/v1/sessions/${threadId}/messages`, undefined, OTHER_KEY);
  assert.equal(other.status, 404);
  const anonymous = new HttpAgent({ url: `${parley.base}/v1/ag-ui`, threadId });
  anonymous.addMessage({ id: "m2", role: "user", content: "no key" });
  await assert.rejects(anonymous.runAgent({ runId: "r2" }, { onRunFailed: () => ({}) }), /401/);
  assert.equal((await history(parley.base, threadId, { key: KEY })).length, 2);
});

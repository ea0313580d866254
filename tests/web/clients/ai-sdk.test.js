// The Vercel AI SDK dialect (`/v1/ai-sdk/chat`) driven by the published `ai` packages: `ai` 7
// and `ai` 5.0.0 (the `ai5` alias, whose strict chunk schemas reject any field they do not know),
// through `DefaultChatTransport.sendMessages`, `reconnectToStream` and `readUIMessageStream`,
// exactly as `useChat` uses them.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import * as ai7 from "ai";
import * as ai5 from "ai5";

import {
  api,
  collect,
  echoOf,
  eventually,
  failingUpstream,
  history,
  startParley,
  streamOf,
  userMessage,
  words,
} from "./lib.js";

const KEY = "pk_acme_0123456789abcdef0123456789abcdef";
const OTHER_KEY = "pk_globex_fedcba9876543210fedcba9876543210";

let parley;
let secured;
let failing;
let upstream;

before(async () => {
  upstream = await failingUpstream();
  [parley, secured, failing] = await Promise.all([
    startParley({ PARLEY_ECHO_DELAY_MS: "15" }),
    startParley({ PARLEY_ECHO_DELAY_MS: "15", PARLEY_AUTH: "api_key", PARLEY_API_KEYS: `acme:${KEY},globex:${OTHER_KEY}` }),
    startParley({
      PARLEY_MODEL_PROVIDER: "openai",
      OPENAI_BASE_URL: upstream.url,
      OPENAI_API_KEY: "sk-clients-test",
      PARLEY_MODEL_MAX_RETRIES: "0",
    }),
  ]);
});

after(async () => {
  await Promise.all([parley?.stop(), secured?.stop(), failing?.stop()]);
  await upstream?.close();
});

let chats = 0;
const newChat = () => `chat-${Date.now()}-${++chats}`;

function transport(sdk, base, headers) {
  return new sdk.DefaultChatTransport({ api: `${base}/v1/ai-sdk/chat`, headers });
}

/** Sends as `useChat` does and returns every chunk, each parsed by the SDK's own schema. */
async function send(chat, { chatId, messages, trigger = "submit-message", messageId, abortSignal }) {
  return collect(await chat.sendMessages({ chatId, messages, trigger, messageId, abortSignal }));
}

/** The assistant message the SDK builds from chunks, and the errors it reported. */
async function build(sdk, chunks) {
  const errors = [];
  let message;
  for await (const m of sdk.readUIMessageStream({ stream: streamOf(chunks), onError: (e) => errors.push(e) })) {
    message = m;
  }
  return { message, errors };
}

const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const types = (chunks) => chunks.map((c) => c.type);
const contents = (messages) => messages.map((m) => m.content);

/** Reads a stream until `n` text deltas came; returns the reader and what it read. */
async function readDeltas(stream, n) {
  const reader = stream.getReader();
  const chunks = [];
  while (chunks.filter((c) => c.type === "text-delta").length < n) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
  }
  return { reader, chunks };
}

async function rest(reader, chunks) {
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return chunks;
    chunks.push(value);
  }
}

for (const [name, sdk] of [
  ["ai 7", ai7],
  ["ai 5.0.0", ai5],
]) {
  describe(`AI SDK dialect with ${name}`, () => {
    test("a plain turn streams one assistant message with parley's id", async () => {
      const chatId = newChat();
      const chunks = await send(transport(sdk, parley.base), { chatId, messages: [userMessage("u1", "hello")] });
      const deltas = chunks.filter((c) => c.type === "text-delta").length;
      assert.deepEqual(types(chunks), [
        "start",
        "start-step",
        "text-start",
        ...Array(deltas).fill("text-delta"),
        "text-end",
        "finish-step",
        "finish",
      ]);
      const { message, errors } = await build(sdk, chunks);
      assert.deepEqual(errors, []);
      assert.equal(message.role, "assistant");
      assert.equal(textOf(message), echoOf("hello"));
      assert.equal(message.metadata.session_id, chatId);
      const stored = await history(parley.base, chatId);
      assert.deepEqual(contents(stored), ["hello", echoOf("hello")]);
      assert.equal(stored[1].id, message.id, "the UI message id is parley's assistant message id");
      assert.equal(stored[0].metadata.client_message_id, "u1", "the client's id is kept with the user message");
      assert.equal(message.metadata.seq, stored[1].seq);
    });

    test("parley's history is the truth: a stale client history is neither stored nor sent to the model", async () => {
      const chatId = newChat();
      const chat = transport(sdk, parley.base);
      await send(chat, { chatId, messages: [userMessage("u1", "one")] });
      const stale = [
        userMessage("x1", "a message parley never saw"),
        { id: "x2", role: "assistant", parts: [{ type: "text", text: "a reply parley never gave" }] },
        userMessage("x3", "another one"),
        { id: "x4", role: "assistant", parts: [{ type: "text", text: "and another" }] },
        userMessage("u2", "two"),
      ];
      const { message } = await build(sdk, await send(chat, { chatId, messages: stale }));
      assert.equal(textOf(message), echoOf("two", 2), "the model saw parley's two stored messages");
      const expected = ["one", echoOf("one"), "two", echoOf("two", 2)];
      assert.deepEqual(contents(await history(parley.base, chatId)), expected);
      // The same request again (a client retry) runs that message again, in its place: the
      // active history still holds it once.
      await send(chat, { chatId, messages: stale });
      assert.deepEqual(contents(await history(parley.base, chatId)), expected);
    });

    test("a tool turn shows as a dynamic tool part, then the answer in a second step", async () => {
      const chatId = newChat();
      const ask = '/tool calculator {"expression": "2 + 3"}';
      const chunks = await send(transport(sdk, parley.base), { chatId, messages: [userMessage("u1", ask)] });
      assert.equal(types(chunks).filter((t) => t === "start-step").length, 2);
      const { message } = await build(sdk, chunks);
      const tool = message.parts.find((p) => p.type === "dynamic-tool");
      assert.ok(tool, JSON.stringify(message.parts));
      assert.equal(tool.toolName, "calculator");
      assert.equal(tool.state, "output-available");
      assert.deepEqual(tool.input, { expression: "2 + 3" });
      assert.match(String(tool.output), /5/);
      assert.match(textOf(message), /^echo: tool calculator returned: .*5/);
      const stored = await history(parley.base, chatId);
      assert.deepEqual(stored.map((m) => m.role), ["user", "assistant", "tool", "assistant"]);
    });

    test("an upstream failure is an error chunk with the problem's detail, and nothing is stored", async () => {
      const chatId = newChat();
      const chunks = await send(transport(sdk, failing.base), { chatId, messages: [userMessage("u1", "hello")] });
      assert.equal(chunks.at(-1).type, "error");
      assert.equal(chunks.at(-1).errorText, "the model endpoint answered with HTTP status 500");
      assert.ok(!JSON.stringify(chunks).includes("db-7"), "nothing of the upstream's body reaches the client");
      const { errors } = await build(sdk, chunks);
      assert.equal(errors.length, 1);
      assert.deepEqual(await history(failing.base, chatId), []);
    });

    test("stop cancels the turn mid-stream: the stream ends with abort and the partial text is saved", async () => {
      const chatId = newChat();
      const long = words(80);
      const stream = await transport(sdk, parley.base).sendMessages({
        chatId,
        messages: [userMessage("u1", long)],
        trigger: "submit-message",
      });
      const { reader, chunks } = await readDeltas(stream, 3);
      const stopped = await api(parley.base, "POST", `/v1/ai-sdk/chat/${chatId}/stop`);
      assert.equal(stopped.status, 204);
      await rest(reader, chunks);
      assert.deepEqual(types(chunks).slice(-3), ["text-end", "finish-step", "abort"]);
      const { message } = await build(sdk, chunks);
      const stored = await history(parley.base, chatId);
      assert.equal(stored.length, 2);
      assert.equal(stored[1].metadata.status, "cancelled");
      assert.equal(stored[1].content, textOf(message), "the client shows exactly what was saved");
      assert.ok(stored[1].content.length < echoOf(long).length);
    });

    test("resume after a dropped connection rebuilds the whole message; then 204 when idle", async () => {
      const chatId = newChat();
      const long = words(60);
      const chat = transport(sdk, parley.base);
      const dropped = new AbortController();
      const stream = await chat.sendMessages({
        chatId,
        messages: [userMessage("u1", long)],
        trigger: "submit-message",
        abortSignal: dropped.signal,
      });
      const { reader, chunks: before } = await readDeltas(stream, 3);
      dropped.abort();
      await reader.cancel().catch(() => {});
      const resumed = await chat.reconnectToStream({ chatId });
      assert.ok(resumed, "a turn runs: the stream is resumed");
      const chunks = await collect(resumed);
      assert.equal(chunks[0].type, "start", "replayed from start");
      assert.equal(chunks[0].messageId, before[0].messageId);
      const { message } = await build(sdk, chunks);
      assert.equal(textOf(message), echoOf(long));
      assert.deepEqual(contents(await history(parley.base, chatId)), [long, echoOf(long)]);
      assert.equal(await chat.reconnectToStream({ chatId }), null, "204: no turn runs");
    });

    test("regenerate runs the last turn again and supersedes the old reply", async () => {
      const chatId = newChat();
      const chat = transport(sdk, parley.base);
      const first = (await build(sdk, await send(chat, { chatId, messages: [userMessage("u1", "again")] }))).message;
      const again = await send(chat, {
        chatId,
        messages: [userMessage("u1", "again")],
        trigger: "regenerate-message",
        messageId: first.id,
      });
      const { message } = await build(sdk, again);
      assert.notEqual(message.id, first.id);
      assert.equal(textOf(message), echoOf("again"));
      const active = await history(parley.base, chatId);
      assert.deepEqual(contents(active), ["again", echoOf("again")]);
      assert.equal(active[1].id, message.id);
      assert.equal((await history(parley.base, chatId, { includeSuperseded: true })).length, 4);
      // Only the last turn can be regenerated.
      await send(chat, { chatId, messages: [userMessage("u2", "later")] });
      await assert.rejects(
        send(chat, { chatId, messages: [userMessage("u1", "again")], trigger: "regenerate-message", messageId: message.id }),
        /turn_not_last/,
      );
    });

    test("a submit with the messageId of a stored user message is an edit", async () => {
      const chatId = newChat();
      const chat = transport(sdk, parley.base);
      await send(chat, { chatId, messages: [userMessage("u1", "first")] });
      await send(chat, { chatId, messages: [userMessage("u1", "first"), userMessage("u2", "second")] });
      const { message } = await build(
        sdk,
        await send(chat, { chatId, messages: [userMessage("u1", "first, edited")], messageId: "u1" }),
      );
      assert.equal(textOf(message), echoOf("first, edited"), "the edit runs with the history before it");
      assert.deepEqual(contents(await history(parley.base, chatId)), ["first, edited", echoOf("first, edited")]);
      assert.equal((await history(parley.base, chatId, { includeSuperseded: true })).length, 6);
    });

    test("a second submit while a turn runs is a 409 problem the transport reports", async () => {
      const chatId = newChat();
      const chat = transport(sdk, parley.base);
      const stream = await chat.sendMessages({ chatId, messages: [userMessage("u1", words(40))], trigger: "submit-message" });
      const { reader, chunks } = await readDeltas(stream, 1);
      await assert.rejects(send(chat, { chatId, messages: [userMessage("u2", "too soon")] }), /turn_in_progress/);
      await rest(reader, chunks);
      assert.equal(chunks.at(-1).type, "finish");
    });
  });
}

describe("AI SDK dialect with API keys", () => {
  const keyed = (key) => transport(ai7, secured.base, key ? { Authorization: `Bearer ${key}` } : undefined);

  test("the transport's headers carry the key; without one the request is refused", async () => {
    const chatId = newChat();
    const { message } = await build(ai7, await send(keyed(KEY), { chatId, messages: [userMessage("u1", "hi")] }));
    assert.equal(textOf(message), echoOf("hi"));
    assert.deepEqual(contents(await history(secured.base, chatId, { key: KEY })), ["hi", echoOf("hi")]);
    await assert.rejects(send(keyed(undefined), { chatId: newChat(), messages: [userMessage("u1", "hi")] }), /unauthorized/);
  });

  test("another tenant can neither read, resume nor stop the chat (404)", async () => {
    const chatId = newChat();
    const long = words(60);
    const stream = await keyed(KEY).sendMessages({ chatId, messages: [userMessage("u1", long)], trigger: "submit-message" });
    const { reader, chunks } = await readDeltas(stream, 2);
    await assert.rejects(keyed(OTHER_KEY).reconnectToStream({ chatId }), /session_not_found/);
    assert.equal((await api(secured.base, "POST", `/v1/ai-sdk/chat/${chatId}/stop`, undefined, OTHER_KEY)).status, 404);
    assert.equal((await api(secured.base, "GET", `/v1/sessions/${chatId}/messages`, undefined, OTHER_KEY)).status, 404);
    await rest(reader, chunks);
    const { message } = await build(ai7, chunks);
    assert.equal(textOf(message), echoOf(long), "the owner's turn ran to its end");
    await eventually(async () => assert.equal((await history(secured.base, chatId, { key: KEY })).length, 2));
  });
});

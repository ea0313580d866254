// Helpers of the chat-client tests (tests/web/clients): they drive a real parley with the
// published client packages (`ai` 7, `ai` 5.0.0 under the `ai5` alias, `@ag-ui/client`), under
// the Node 22 that the `node` npm package brings (scripts/web-test runs them with it).

import { createServer } from "node:http";

export { api, echoOf, eventually, history, startParley } from "../lib/harness.js";

/** Every item of a ReadableStream (or async iterable), in order. */
export async function collect(stream) {
  const items = [];
  for await (const item of stream) items.push(item);
  return items;
}

/** A stream of these items, to hand to `readUIMessageStream` after they were inspected. */
export function streamOf(items) {
  return ReadableStream.from(items);
}

/** A message of `text`, as `useChat` builds a user message. */
export function userMessage(id, text) {
  return { id, role: "user", parts: [{ type: "text", text }] };
}

/** A model endpoint that answers every request with HTTP 500 (and a secret in its body). */
export async function failingUpstream() {
  const server = createServer((request, response) => {
    request.resume();
    response.writeHead(500, { "content-type": "application/json" });
    response.end(JSON.stringify({ error: { message: "upstream exploded; internal host db-7.corp" } }));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}/v1`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** A sentence of `n` words, long enough for a slow echo to be stopped or dropped mid-stream. */
export function words(n, prefix = "word") {
  return Array.from({ length: n }, (_, i) => `${prefix}${i}`).join(" ");
}

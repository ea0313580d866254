// The chat page behind a load balancer of two parley replicas sharing one Redis: a reload in the
// middle of a reply lands on the other replica, which follows the same reply from the turn event
// log to its end (issue 18, streams on any replica). Needs REDIS_URL (scripts/test exports it).

import assert from "node:assert/strict";
import http from "node:http";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { echoOf, eventually, history, launchBrowser, messages, openPage, sendMessage, startParley } from "./lib/harness.js";

/**
 * A load balancer in front of the replicas: every request goes to the replica `to()` last named,
 * and `served` says which replica answered which path.
 */
async function balancer() {
  let target = null;
  const served = [];
  const server = http.createServer((req, res) => {
    const backend = target;
    served.push({ backend, path: req.url });
    const upstream = http.request(new URL(req.url, backend), { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    upstream.on("error", () => res.destroy());
    req.pipe(upstream);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    served,
    to: (backend) => {
      target = backend;
    },
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

const redisUrl = process.env.REDIS_URL;
let browser;
let replicas = [];
let lb;

before(async () => {
  if (!redisUrl) {
    throw new Error("REDIS_URL is not set: this test runs two parley replicas on one Redis. Run it with scripts/test, or set REDIS_URL.");
  }
  const shared = {
    PARLEY_STORE: "redis",
    REDIS_URL: redisUrl,
    PARLEY_REDIS_PREFIX: `parley_test_web_${randomBytes(6).toString("hex")}`,
    PARLEY_DISTRIBUTED: "true",
    PARLEY_ECHO_DELAY_MS: "150",
  };
  [browser, lb, ...replicas] = await Promise.all([launchBrowser(), balancer(), startParley(shared), startParley(shared)]);
});

after(async () => {
  await browser?.close();
  await lb?.close();
  await Promise.all(replicas.map((r) => r.stop()));
});

const WORDS = Array.from({ length: 24 }, (_, i) => `w${i + 1}`).join(" ");

async function lastReply(page) {
  const replies = (await messages(page)).filter((m) => m.name.startsWith("Assistant"));
  return replies.at(-1) ?? { name: "", text: "" };
}

describe("the chat page on two replicas", () => {
  test("a reload mid-reply that lands on the other replica follows the same reply to its end", async () => {
    const [a, b] = replicas;
    lb.to(a.base);
    const { page, context, errors } = await openPage(browser, lb.base);
    await sendMessage(page, WORDS);
    const before = await eventually(async () => {
      const text = (await lastReply(page)).text;
      assert.match(text, /w4\b/);
      return text;
    });
    const id = decodeURIComponent(new URL(page.url()).hash.slice(1));
    // The balancer now sends everything to B: the reload, the history, the follow request.
    lb.to(b.base);
    const followedOnB = lb.served.length;
    await page.reload();
    const resumed = await eventually(async () => {
      const reply = await lastReply(page);
      assert.match(reply.name, /replying/);
      assert.ok(reply.text.startsWith(before), `${reply.text} goes on from ${before}`);
      assert.ok(reply.text.length > before.length, "more text arrived after the reload");
      return reply.text;
    });
    assert.ok(resumed.length < echoOf(WORDS).length, "still arriving live on B");
    const follows = lb.served.slice(followedOnB).filter((s) => s.path.includes("/events"));
    assert.equal(follows.length, 1, "one follow request");
    assert.equal(follows[0].backend, b.base, "served by the other replica");
    await eventually(
      async () => {
        const shown = await messages(page);
        assert.deepEqual(
          shown.map((m) => [m.name, m.text]),
          [
            ["You", WORDS],
            ["Assistant", echoOf(WORDS)],
          ],
        );
      },
      { timeout: 15000 },
    );
    const stored = await history(b.base, id);
    assert.deepEqual(
      stored.map((m) => [m.role, m.content]),
      [
        ["user", WORDS],
        ["assistant", echoOf(WORDS)],
      ],
    );
    assert.deepEqual(errors, []);
    await context.close();
  });
});

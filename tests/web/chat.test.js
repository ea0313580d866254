// The chat page in a real Chromium against a real parley: streaming, stop, reload mid-reply,
// paging back through history, safe text, the narrow layout, and no console errors.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  api,
  echoOf,
  eventually,
  history,
  launchBrowser,
  messages,
  openPage,
  screenshot,
  sendMessage,
  startParley,
} from "./lib/harness.js";

let browser;
let slow; // the echo model pauses 150 ms before each word, so replies stream visibly
let fast; // no pause: for seeding and layout

before(async () => {
  [browser, slow, fast] = await Promise.all([
    launchBrowser(),
    startParley({ PARLEY_ECHO_DELAY_MS: "150" }),
    startParley({ PARLEY_ECHO_DELAY_MS: "0" }),
  ]);
});

after(async () => {
  await browser?.close();
  await Promise.all([slow?.stop(), fast?.stop()]);
});

const WORDS = Array.from({ length: 24 }, (_, i) => `w${i + 1}`).join(" ");

/** The assistant reply's text and name, as shown. */
async function lastReply(page) {
  const all = await messages(page);
  const replies = all.filter((m) => m.name.startsWith("Assistant"));
  return replies.at(-1) ?? { name: "", text: "" };
}

/** The id of the open chat (the page keeps it in the URL's fragment). */
function chatId(page) {
  return decodeURIComponent(new URL(page.url()).hash.slice(1));
}

describe("the chat page", () => {
  test("a reply is rendered as it streams, then completes", async () => {
    const { page, context, errors } = await openPage(browser, slow.base);
    const content = "one two three four five six seven eight";
    await sendMessage(page, content);
    const full = echoOf(content);
    // An intermediate state: part of the reply is shown, marked as still arriving.
    const partial = await eventually(async () => {
      const reply = await lastReply(page);
      assert.match(reply.name, /replying/);
      assert.ok(reply.text.length > 6 && reply.text.length < full.length - 10, `partial: ${reply.text}`);
      return reply.text;
    });
    assert.ok(full.startsWith(partial), `${partial} is the start of the reply`);
    await page.getByRole("button", { name: "Stop" }).waitFor();
    await eventually(async () => {
      const reply = await lastReply(page);
      assert.equal(reply.text, full);
      assert.equal(reply.name, "Assistant");
    });
    await page.getByRole("button", { name: "Send" }).waitFor();
    // The first message titled the chat, in the sidebar and the heading.
    const nav = page.getByRole("navigation", { name: "Chats" });
    await nav.getByRole("button", { name: content }).waitFor();
    assert.equal(await page.getByRole("heading", { level: 1 }).textContent(), content);
    const session = await api(slow.base, "GET", `/v1/sessions/${chatId(page)}`);
    assert.equal(session.body.metadata.title, content);
    assert.deepEqual((await history(slow.base, chatId(page))).map((m) => m.content), [content, full]);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("Stop cancels the turn and keeps the partial reply, marked cancelled", async () => {
    const { page, context, errors } = await openPage(browser, slow.base);
    await sendMessage(page, WORDS);
    await eventually(async () => assert.match((await lastReply(page)).text, /w3\b/));
    await page.getByRole("button", { name: "Stop" }).click();
    const stopped = await eventually(async () => {
      const reply = await lastReply(page);
      assert.equal(reply.name, "Assistant, cancelled");
      return reply.text;
    });
    assert.ok(echoOf(WORDS).startsWith(stopped) && stopped.length < echoOf(WORDS).length, stopped);
    const stored = await history(slow.base, chatId(page));
    assert.equal(stored.length, 2);
    assert.equal(stored[1].metadata.status, "cancelled");
    assert.equal(stored[1].content, stopped);
    // Still there, still marked, after a reload.
    await page.reload();
    await eventually(async () => assert.deepEqual(await lastReply(page), { name: "Assistant, cancelled", text: stopped, seq: 2 }));
    await page.getByRole("button", { name: "Send" }).waitFor();
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("a reload mid-reply follows the running turn and the same reply completes", async () => {
    const { page, context, errors } = await openPage(browser, slow.base);
    await sendMessage(page, WORDS);
    const before = await eventually(async () => {
      const text = (await lastReply(page)).text;
      assert.match(text, /w4\b/);
      return text;
    });
    const id = chatId(page);
    const follows = [];
    page.on("request", (r) => {
      if (r.url().includes("/events")) follows.push(r.headers()["last-event-id"]);
    });
    await page.reload();
    // The reply goes on from where it was: still arriving, and at least what was shown before.
    const resumed = await eventually(async () => {
      const reply = await lastReply(page);
      assert.match(reply.name, /replying/);
      assert.ok(reply.text.startsWith(before), `${reply.text} goes on from ${before}`);
      return reply.text;
    });
    assert.ok(resumed.length < echoOf(WORDS).length);
    assert.equal(follows.length, 1, "one follow request");
    assert.match(follows[0] ?? "", /^\d+$/, "it sends Last-Event-ID");
    await page.getByRole("button", { name: "Stop" }).waitFor();
    await eventually(async () => {
      const all = await messages(page);
      assert.deepEqual(
        all.map((m) => [m.name, m.text]),
        [
          ["You", WORDS],
          ["Assistant", echoOf(WORDS)],
        ],
      );
    }, { timeout: 15000 });
    assert.deepEqual((await history(slow.base, id)).map((m) => m.content), [WORDS, echoOf(WORDS)]);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("a failed turn shows its problem detail", async () => {
    const failing = await startParley({ PARLEY_ECHO_DELAY_MS: "100", PARLEY_TURN_TIMEOUT: "250ms" });
    try {
      const { page, context, errors } = await openPage(browser, failing.base);
      await sendMessage(page, "this turn will run out of time");
      const reply = page.getByRole("article", { name: "Assistant, failed" });
      await reply.waitFor();
      assert.match(await reply.textContent(), /upstream_timeout/);
      await page.getByRole("article", { name: "You" }).getByText("Not saved").waitFor();
      assert.deepEqual(errors, []);
      await context.close();
    } finally {
      await failing.stop();
    }
  });

  test("scrolling up loads older pages of a 200-message chat, one page at a time", async () => {
    const id = `long-${Date.now()}`;
    await api(fast.base, "POST", "/v1/sessions", { id, metadata: { title: "A long chat" } });
    for (let i = 1; i <= 100; i += 1) {
      const { status } = await api(fast.base, "POST", `/v1/sessions/${id}/messages`, { content: `m${i}` });
      assert.equal(status, 200);
    }
    const { page, context, errors } = await openPage(browser, fast.base, { path: `/#${id}` });
    const pages = [];
    page.on("request", (r) => {
      if (r.url().includes("/messages?")) pages.push(new URL(r.url()).searchParams);
    });
    const log = page.getByRole("log", { name: "Conversation" });
    await eventually(async () => assert.equal((await messages(page)).length, 30));
    const first = await messages(page);
    assert.equal(first.at(-1).seq, 200, "the newest message is shown");
    assert.equal(first[0].seq, 171, "only the newest page is loaded");
    // Scroll up as a person would, until the first message shows.
    await eventually(async () => {
      await log.hover();
      await page.mouse.wheel(0, -4000);
      const seqs = (await messages(page)).map((m) => m.seq);
      assert.equal(seqs[0], 1);
    }, { timeout: 20000, interval: 200 });
    const seqs = (await messages(page)).map((m) => m.seq);
    assert.deepEqual(seqs, Array.from({ length: 200 }, (_, i) => i + 1), "every message once, in order");
    assert.ok(pages.length >= 6, `${pages.length} page requests`);
    for (const query of pages) {
      assert.equal(query.get("limit"), "30", "each request reads one page");
      assert.equal(query.get("order"), "desc");
    }
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("an HTML and script payload is shown as text and never runs", async () => {
    const { page, context, errors } = await openPage(browser, fast.base);
    const payload = `<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>`;
    await sendMessage(page, payload);
    await eventually(async () => assert.equal((await lastReply(page)).text, echoOf(payload)));
    const mine = (await messages(page)).find((m) => m.name === "You");
    assert.equal(mine.text, payload);
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.equal(await page.locator("#messages img, #messages script, #messages b, #sessions img").count(), 0);
    // The chat's title (the payload too) is text in the sidebar and the heading.
    assert.equal(await page.getByRole("heading", { level: 1 }).textContent(), `${payload.slice(0, 59)}…`);
    await page.reload();
    await eventually(async () => assert.equal((await messages(page)).length, 2));
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.equal(await page.locator("#messages img, #sessions img").count(), 0);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("at 375 px there is no horizontal scrolling, and the chats open from a button", async () => {
    const { page, context, errors } = await openPage(browser, fast.base, { width: 375, height: 740 });
    const long = `${"x".repeat(300)}\n\n\`\`\`\n${"const line = 'a long line of code that does not wrap';".repeat(4)}\n\`\`\`\n\n- a list item\n- another with \`code\``;
    await sendMessage(page, long);
    await eventually(async () => assert.equal((await messages(page)).length, 2));
    await sendMessage(page, "/tool calculator {\"expression\": \"2^10 + 1\"}");
    await eventually(async () => assert.match((await lastReply(page)).text, /1025/));
    const overflow = await page.evaluate(() => ({
      doc: document.documentElement.scrollWidth,
      body: document.body.scrollWidth,
      log: document.getElementById("log").scrollWidth - document.getElementById("log").clientWidth,
      width: window.innerWidth,
    }));
    assert.ok(overflow.doc <= overflow.width && overflow.body <= overflow.width, JSON.stringify(overflow));
    assert.equal(overflow.log, 0, "the conversation does not scroll sideways");
    await screenshot(page, "mobile");
    const chats = page.getByRole("button", { name: "Chats" });
    assert.equal(await chats.getAttribute("aria-expanded"), "false");
    assert.equal(await page.getByRole("button", { name: "New chat" }).isVisible(), false);
    await chats.click();
    await page.getByRole("button", { name: "New chat" }).waitFor();
    await screenshot(page, "mobile-chats");
    await page.getByRole("button", { name: "New chat" }).click();
    await eventually(async () => assert.equal((await messages(page)).length, 0));
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("keyboard only: send, rename, and delete with a confirm", async () => {
    const { page, context, errors } = await openPage(browser, fast.base);
    const box = page.getByRole("textbox", { name: "Message" });
    await box.focus();
    await page.keyboard.type("first line");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("second line");
    await page.keyboard.press("Enter");
    // Two lines: a line break (no text) between them.
    await eventually(async () => assert.equal((await lastReply(page)).text, "echo: first linesecond line (context: 0 messages)"));
    assert.equal(await page.locator("article.user .text br").count(), 1);
    const id = chatId(page);
    await page.getByRole("button", { name: "Rename" }).focus();
    await page.keyboard.press("Enter");
    const title = page.getByRole("textbox", { name: "Chat title" });
    await title.fill("Renamed by keyboard");
    await title.press("Enter");
    await eventually(async () => assert.equal(await page.getByRole("heading", { level: 1 }).textContent(), "Renamed by keyboard"));
    assert.equal((await api(fast.base, "GET", `/v1/sessions/${id}`)).body.metadata.title, "Renamed by keyboard");
    const item = page.getByRole("listitem").filter({ hasText: "Renamed by keyboard" });
    page.once("dialog", (dialog) => dialog.dismiss());
    await item.getByRole("button", { name: "Delete" }).focus();
    await page.keyboard.press("Enter");
    assert.equal((await api(fast.base, "GET", `/v1/sessions/${id}`)).status, 200, "dismissed: kept");
    page.once("dialog", (dialog) => dialog.accept());
    await page.keyboard.press("Enter");
    await eventually(async () => assert.equal((await api(fast.base, "GET", `/v1/sessions/${id}`)).status, 404));
    await eventually(async () => assert.equal(await item.count(), 0));
    assert.equal(await page.getByRole("heading", { level: 1 }).textContent(), "New chat");
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("screenshots of the desktop layout, light and dark", async () => {
    // A parley of its own, so the sidebar holds only these chats.
    const shots = await startParley({ PARLEY_ECHO_DELAY_MS: "0" });
    for (const title of ["Notes on the release", "Trip to Lisbon"]) {
      const { body } = await api(shots.base, "POST", "/v1/sessions", { metadata: { title } });
      await api(shots.base, "POST", `/v1/sessions/${body.id}/messages`, { content: title });
    }
    for (const colorScheme of ["light", "dark"]) {
      const { page, context, errors } = await openPage(browser, shots.base, { colorScheme, height: 900 });
      await sendMessage(page, "What can this page do?");
      await eventually(async () => assert.equal((await messages(page)).length, 2));
      await sendMessage(page, "/tool calculator {\"expression\": \"2^10 + (3 % 2) * -4.5\"}");
      await eventually(async () => assert.match((await lastReply(page)).text, /1019.5/));
      await page.locator("details.tool").first().locator("summary").click();
      await sendMessage(page, "Show a list:\n- streaming replies\n- Stop keeps the partial reply\n- `code` and fenced blocks");
      // user, the call, its result, the answer: four messages for the tool turn.
      await eventually(async () => assert.equal((await messages(page)).length, 8));
      await page.getByRole("textbox", { name: "Message" }).fill("Shift+Enter for a new line, Enter to send");
      await screenshot(page, `desktop-${colorScheme}`);
      assert.deepEqual(errors, []);
      await context.close();
    }
    await shots.stop();
  });
});

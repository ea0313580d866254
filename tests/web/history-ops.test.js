// Regenerate, Edit and Fork change the history as the API says (`POST …/turns/{turn_id}/regenerate`,
// `replace_from` on a post, `POST …/fork`), and a replaced message can be shown on demand.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { api, echoOf, eventually, history, launchBrowser, messages, openPage, sendMessage, startParley } from "./lib/harness.js";

let browser;
let parley;

before(async () => {
  [browser, parley] = await Promise.all([launchBrowser(), startParley({ PARLEY_ECHO_DELAY_MS: "20" })]);
});

after(async () => {
  await browser?.close();
  await parley?.stop();
});

function chatId(page) {
  return decodeURIComponent(new URL(page.url()).hash.slice(1));
}

/** Sends a message and waits until its reply is complete. */
async function turn(page, content, context) {
  const before = (await messages(page)).length;
  await sendMessage(page, content);
  await eventually(async () => {
    const all = await messages(page);
    assert.equal(all.length, before + 2);
    assert.deepEqual(all.at(-1), { name: "Assistant", text: echoOf(content, context), seq: all.at(-1).seq });
    assert.ok(all.at(-1).seq > 0, "stored");
  });
}

const shown = async (page) => (await messages(page)).map((m) => [m.name, m.text]);

describe("history operations", () => {
  test("Regenerate runs the last turn again and replaces its reply", async () => {
    const { page, context, errors } = await openPage(browser, parley.base);
    await turn(page, "first", 0);
    await turn(page, "say it again", 2);
    const id = chatId(page);
    const old = await history(parley.base, id);
    const reply = page.getByRole("article", { name: "Assistant" }).last();
    await reply.getByRole("button", { name: "Regenerate" }).click();
    await eventually(async () => {
      const all = await messages(page);
      assert.deepEqual(all.map((m) => m.seq), [1, 2, 5, 6], "the replaced turn's bubbles are gone; fresh seqs");
      assert.equal(all.at(-1).name, "Assistant");
    });
    assert.deepEqual(await shown(page), [
      ["You", "first"],
      ["Assistant", echoOf("first", 0)],
      ["You", "say it again"],
      ["Assistant", echoOf("say it again", 2)],
    ]);
    const active = await history(parley.base, id);
    assert.deepEqual(active.map((m) => m.seq), [1, 2, 5, 6]);
    assert.equal(active[2].metadata.regenerated_from, old[2].turn_id);
    const all = await history(parley.base, id, { includeSuperseded: true });
    assert.deepEqual(all.filter((m) => m.superseded_by).map((m) => m.seq), [3, 4]);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("Edit resends a user message with replace_from; the replaced messages show on demand", async () => {
    const { page, context, errors } = await openPage(browser, parley.base);
    await turn(page, "one", 0);
    await turn(page, "two", 2);
    await turn(page, "three", 4);
    const id = chatId(page);
    const two = page.getByRole("article", { name: "You" }).filter({ hasText: "two" });
    await two.getByRole("button", { name: "Edit" }).click();
    const box = page.getByRole("textbox", { name: "Message" });
    assert.equal(await box.inputValue(), "two", "the message to edit is in the box");
    await box.fill("two, edited");
    await box.press("Enter");
    await eventually(async () =>
      assert.deepEqual(await shown(page), [
        ["You", "one"],
        ["Assistant", echoOf("one", 0)],
        ["You", "two, edited"],
        ["Assistant", echoOf("two, edited", 2)],
      ]),
    );
    const active = await history(parley.base, id);
    assert.deepEqual(active.map((m) => m.content), ["one", echoOf("one", 0), "two, edited", echoOf("two, edited", 2)]);
    const replaced = (await history(parley.base, id, { includeSuperseded: true })).filter((m) => m.superseded_by);
    assert.deepEqual(replaced.map((m) => m.seq), [3, 4, 5, 6]);
    // "Show replaced" lists them again, marked and without buttons.
    await page.getByRole("checkbox", { name: "Show replaced" }).check();
    await eventually(async () => assert.equal((await messages(page)).length, 8));
    const marked = page.getByRole("article", { name: /replaced/ });
    assert.equal(await marked.count(), 4);
    assert.equal(await marked.getByRole("button").count(), 0);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test("Fork copies the chat up to a message into a new chat and opens it", async () => {
    const { page, context, errors } = await openPage(browser, parley.base);
    await turn(page, "keep this", 0);
    await turn(page, "not this", 2);
    const source = chatId(page);
    const firstReply = page.getByRole("article", { name: "Assistant" }).first();
    await firstReply.getByRole("button", { name: "Fork" }).click();
    await eventually(async () => assert.notEqual(chatId(page), source));
    const fork = chatId(page);
    await eventually(async () =>
      assert.deepEqual(await shown(page), [
        ["You", "keep this"],
        ["Assistant", echoOf("keep this", 0)],
      ]),
    );
    assert.equal(await page.getByRole("heading", { level: 1 }).textContent(), "keep this (fork)");
    await page.getByRole("navigation", { name: "Chats" }).getByRole("button", { name: "keep this (fork)" }).waitFor();
    const copied = await history(parley.base, fork);
    assert.deepEqual(copied.map((m) => m.seq), [1, 2]);
    assert.equal(copied[1].metadata.forked_from.session_id, source);
    assert.equal((await history(parley.base, source)).length, 4, "the source is unchanged");
    // The fork goes on by itself.
    await turn(page, "and on", 2);
    assert.equal((await api(parley.base, "GET", `/v1/sessions/${source}`)).body.message_count, 4);
    assert.deepEqual(errors, []);
    await context.close();
  });
});

// With PARLEY_AUTH=api_key the page asks for a key, refuses a wrong one, keeps the right one in
// this tab only (sessionStorage), and sends it as a Bearer header.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { api, echoOf, eventually, launchBrowser, messages, openPage, sendMessage, startParley } from "./lib/harness.js";

const KEY = "pk_webtest_0123456789abcdef0123456789abcdef";
const WRONG = "pk_webtest_fedcba9876543210fedcba9876543210";

let browser;
let parley;

before(async () => {
  [browser, parley] = await Promise.all([
    launchBrowser(),
    startParley({ PARLEY_AUTH: "api_key", PARLEY_API_KEYS: `acme:${KEY}` }),
  ]);
});

after(async () => {
  await browser?.close();
  await parley?.stop();
});

test("the page asks for an API key, refuses a wrong one and works with the right one", async () => {
  // The browser reports each 401 answer as a failed resource load: those are expected here.
  const { page, context, errors } = await openPage(browser, parley.base, { allow: [/status of 401/] });
  const prompt = page.getByRole("dialog", { name: "API key" });
  await prompt.waitFor();
  const requests = [];
  page.on("request", (r) => requests.push({ url: r.url(), auth: r.headers().authorization }));
  await prompt.getByLabel("API key").fill(WRONG);
  await prompt.getByRole("button", { name: "Use key" }).click();
  await prompt.getByText("That API key was refused").waitFor();
  assert.ok(requests.some((r) => r.auth === `Bearer ${WRONG}`), "the wrong key was sent as a Bearer header");
  await prompt.getByLabel("API key").fill(KEY);
  await prompt.getByRole("button", { name: "Use key" }).press("Enter");
  await prompt.waitFor({ state: "hidden" });
  await sendMessage(page, "hello with a key");
  await eventually(async () => assert.equal((await messages(page)).at(-1)?.text, echoOf("hello with a key")));
  const sessions = await api(parley.base, "GET", "/v1/sessions", undefined, KEY);
  assert.equal(sessions.body.data.length, 1, "the chat belongs to the key's tenant");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("parley.apiKey")), KEY);
  assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing in localStorage");
  assert.ok(requests.every((r) => !r.url.includes(KEY)), "the key never goes in a URL");
  // A reload in the same tab keeps the key; a new tab (a fresh session storage) asks again.
  await page.reload();
  await eventually(async () => assert.equal((await messages(page)).length, 2));
  assert.equal(await prompt.isVisible(), false);
  const other = await openPage(browser, parley.base, { allow: [/status of 401/] });
  await other.page.getByRole("dialog", { name: "API key" }).waitFor();
  await other.context.close();
  // A key that stops working (here: removed from this tab's storage and replaced) asks again.
  await page.evaluate((wrong) => sessionStorage.setItem("parley.apiKey", wrong), WRONG);
  await page.getByRole("button", { name: "New chat" }).click();
  await sendMessage(page, "after the key changed");
  await prompt.getByText("That API key was refused").waitFor();
  await prompt.getByLabel("API key").fill(KEY);
  await prompt.getByLabel("API key").press("Enter");
  await eventually(async () => assert.equal((await messages(page)).at(-1)?.text, echoOf("after the key changed")));
  assert.deepEqual(errors, []);
  await context.close();
});

// The browser tests' harness: starts a real parley (target/debug/parley, built by scripts/test)
// on a free port with the echo model, launches Debian's Chromium through playwright-core, and
// gives small helpers to drive the API and to wait for what a person would see.

import { spawn } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
const TARGET = process.env.CARGO_TARGET_DIR ? `${process.env.CARGO_TARGET_DIR.replace(/\/$/, "")}/` : `${ROOT}target/`;
export const BINARY = process.env.PARLEY_BIN || `${TARGET}debug/parley`;
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const SCREENSHOTS = fileURLToPath(new URL("../screenshots/", import.meta.url));

/** A running parley: `base` is its URL; `stop()` ends it. */
export async function startParley(env = {}) {
  if (!existsSync(BINARY)) {
    throw new Error(`${BINARY} is missing: build it with \`cargo build\` (scripts/test does)`);
  }
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PARLEY_")));
  const child = spawn(BINARY, [], {
    env: {
      ...inherited,
      PARLEY_ADDR: "127.0.0.1:0",
      PARLEY_LOG: "info",
      PARLEY_LOG_FORMAT: "json",
      PARLEY_STORE: "memory",
      PARLEY_MODEL_PROVIDER: "echo",
      ...env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const log = [];
  const base = await new Promise((resolve, reject) => {
    let buffer = "";
    const timer = setTimeout(() => reject(new Error(`parley did not start:\n${log.join("\n")}`)), 15000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      buffer += chunk;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        log.push(line);
        try {
          const entry = JSON.parse(line);
          if (entry.fields?.message === "parley listening") {
            clearTimeout(timer);
            resolve(`http://${entry.fields.addr}`);
          }
        } catch {
          // Not JSON: kept in the log for the error message.
        }
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`parley exited (${code}) before listening:\n${log.join("\n")}`));
    });
  });
  return {
    base,
    log,
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill("SIGKILL");
      await new Promise((resolve) => child.once("exit", resolve));
    },
  };
}

/** Debian's Chromium, headless; a clear error when it is missing. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)`);
  }
  return chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
}

/**
 * A fresh page (its own storage) on parley's chat page. `errors` collects console errors and
 * uncaught exceptions; `allow` lists patterns of console errors a test expects.
 */
export async function openPage(browser, base, { width = 1280, height = 800, colorScheme = "light", path = "/", allow = [] } = {}) {
  const context = await browser.newContext({ viewport: { width, height }, colorScheme });
  const page = await context.newPage();
  const errors = [];
  page.on("console", (message) => {
    if (message.type() === "error" && !allow.some((pattern) => pattern.test(message.text()))) {
      errors.push(`console: ${message.text()}`);
    }
  });
  page.on("pageerror", (error) => errors.push(`page error: ${error.message}`));
  await page.goto(base + path);
  return { page, context, errors };
}

/** Calls the API from the test (to seed data or check what the page did). */
export async function api(base, method, path, body, key) {
  const headers = { "content-type": "application/json" };
  if (key) headers.authorization = `Bearer ${key}`;
  const response = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: response.status, headers: response.headers, body: json };
}

/** Every message of a session, oldest first (`include_superseded` when asked). */
export async function history(base, id, { includeSuperseded = false, key } = {}) {
  const all = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "100" });
    if (cursor) query.set("cursor", cursor);
    if (includeSuperseded) query.set("include_superseded", "true");
    const { status, body } = await api(base, "GET", `/v1/sessions/${id}/messages?${query}`, undefined, key);
    if (status !== 200) throw new Error(`history ${id}: ${status} ${JSON.stringify(body)}`);
    all.push(...body.data);
    cursor = body.next_cursor;
  } while (cursor);
  return all;
}

/** Retries `check` (which throws while its condition does not hold) until it passes or time is up. */
export async function eventually(check, { timeout = 10000, interval = 50 } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      return await check();
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
    await sleep(interval);
  }
}

/** The page's messages as a person reads them: role label, status and text. */
export async function messages(page) {
  return page.getByRole("article").evaluateAll((nodes) =>
    nodes.map((n) => ({
      name: n.getAttribute("aria-label"),
      text: n.querySelector(".text")?.textContent ?? n.querySelector(".msg-body")?.textContent ?? "",
      seq: Number(n.dataset.seq || 0),
    })),
  );
}

/** The full reply of the echo model to a first message. */
export function echoOf(content, context = 0) {
  return `echo: ${content} (context: ${context} messages)`;
}

/** Saves a screenshot to tests/web/screenshots/ (git-ignored). */
export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: `${SCREENSHOTS}${name}.png` });
}

/** Types a message in the textbox labelled "Message" and presses Enter. */
export async function sendMessage(page, text) {
  const box = page.getByRole("textbox", { name: "Message" });
  await box.fill(text);
  await box.press("Enter");
}

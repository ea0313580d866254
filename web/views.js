// The views: DOM nodes for messages, tool calls and chats. Text from messages only ever enters the
// DOM as text nodes (textContent, createTextNode): never as markup.

/** An element with properties (or `aria-*`/`data-*` attributes) and children (nodes or text). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("aria-") || name.startsWith("data-") || name === "role" || name === "for") {
      node.setAttribute(name, String(value));
    } else {
      node[name] = value;
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", tool: "Tool", system: "System" };

/** "14:05" today, "3 Dec, 14:05" on another day; the full date and time in the title. */
export function timeView(iso) {
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return null;
  const today = new Date().toDateString() === at.toDateString();
  const short = today
    ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : at.toLocaleString([], { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
  return el("time", { dateTime: iso, title: at.toLocaleString() }, short);
}

/**
 * Renders text as paragraphs, lists and fenced code blocks, with `inline code`: a small,
 * markdown-like reading that builds nodes only.
 */
export function renderText(container, text) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      const code = [];
      for (i += 1; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i += 1) code.push(lines[i]);
      i += 1;
      const codeNode = el("code", {}, code.join("\n"));
      if (fence[1]) codeNode.dataset.lang = fence[1];
      container.append(el("pre", { tabIndex: 0 }, codeNode));
      continue;
    }
    if (/^\s*$/.test(line)) {
      i += 1;
      continue;
    }
    const bullet = /^\s*[-*•]\s+/;
    const number = /^\s*\d{1,3}[.)]\s+/;
    const kind = bullet.test(line) ? bullet : number.test(line) ? number : null;
    if (kind) {
      const list = el(kind === bullet ? "ul" : "ol");
      for (; i < lines.length && kind.test(lines[i]); i += 1) {
        list.append(inline(el("li"), lines[i].replace(kind, "")));
      }
      container.append(list);
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() !== "" && !/^\s*```/.test(lines[i]); i += 1) {
      if (paragraph.length && (bullet.test(lines[i]) || number.test(lines[i]))) break;
      paragraph.push(lines[i]);
    }
    const p = el("p");
    paragraph.forEach((part, n) => {
      if (n) p.append(el("br"));
      inline(p, part);
    });
    container.append(p);
  }
}

/** Appends text to a node, with `backticked` spans as code elements. */
function inline(node, text) {
  text.split(/(`[^`\n]+`)/).forEach((part) => {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) node.append(el("code", {}, part.slice(1, -1)));
    else if (part) node.append(document.createTextNode(part));
  });
  return node;
}

function pretty(value) {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** A collapsible block: a tool call with its arguments, or a tool's result. */
export function toolBlock(title, body, { error = false } = {}) {
  return el(
    "details",
    { className: error ? "tool error" : "tool" },
    el("summary", {}, title),
    el("pre", { tabIndex: 0 }, el("code", {}, body)),
  );
}

/**
 * One message. `state`: `streaming` (the reply is arriving), `failed` (with `error`, a problem),
 * `unsaved` (a user message whose turn saved nothing). Returns the article, with the message
 * itself as its `message` property.
 */
export function messageView(message, state = {}) {
  const role = message.role;
  const status = statusOf(message, state);
  const label = status === "streaming" ? "replying…" : status;
  const head = el(
    "header",
    { className: "msg-head" },
    el("span", { className: "role" }, ROLE_NAMES[role] || role),
    message.created_at ? timeView(message.created_at) : null,
    status ? el("span", { className: `badge ${status}` }, label) : null,
  );
  const body = el("div", { className: "msg-body" });
  const article = el("article", {
    className: `msg ${role}${message.superseded_by ? " superseded" : ""}`,
    "aria-label": [ROLE_NAMES[role] || role, label].filter(Boolean).join(", "),
    "data-id": message.id,
    "data-seq": message.seq || null,
    "data-turn": message.turn_id,
    "aria-busy": state.streaming ? "true" : null,
  });
  article.append(head, body);
  if (role === "tool") {
    const title = `Tool result: ${message.name || "tool"}`;
    body.append(toolBlock(title, message.content, { error: message.metadata?.is_error === true }));
  } else {
    const text = el("div", { className: "text" });
    if (message.content) renderText(text, message.content);
    body.append(text);
    for (const call of message.tool_calls || []) {
      body.append(toolBlock(`Tool call: ${call.name}`, pretty(call.arguments)));
    }
  }
  if (state.failed && state.error) body.append(errorView(state.error));
  if (state.unsaved) body.append(el("p", { className: "note" }, "Not saved: the turn failed."));
  const actions = el("div", { className: "actions" });
  article.append(actions);
  article.message = message;
  return article;
}

function statusOf(message, state) {
  if (state.streaming) return "streaming";
  if (state.failed) return "failed";
  if (message.superseded_by) return "replaced";
  const status = message.metadata?.status;
  return status === "cancelled" || status === "failed" ? status : null;
}

/** The problem detail of a failed turn or request. */
export function errorView(problem) {
  const title = problem.title || "Error";
  const code = problem.code ? ` (${problem.code})` : "";
  return el(
    "div",
    { className: "problem" },
    el("strong", {}, `${title}${code}`),
    problem.detail ? el("span", {}, `: ${problem.detail}`) : null,
  );
}

/** A chat in the sidebar: a link-like button with its title, and Delete. */
export function sessionItem(session, { current, onOpen, onDelete }) {
  const title = titleOf(session);
  const open = el(
    "button",
    { type: "button", className: "session-open", title, "aria-current": current ? "page" : null, onclick: onOpen },
    title,
  );
  const remove = el("button", { type: "button", className: "session-delete quiet", "aria-label": "Delete", title: `Delete “${title}”`, onclick: onDelete }, "✕");
  return el("li", { className: current ? "session current" : "session", "data-id": session.id }, open, remove);
}

/** A chat's title: its `metadata.title`, or a stand-in. */
export function titleOf(session) {
  const title = session?.metadata?.title;
  return typeof title === "string" && title.trim() ? title.trim() : "Untitled chat";
}

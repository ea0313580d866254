// The chat page's state and wiring: the chats in the sidebar, the open conversation (paged back
// as the user scrolls up), and the running turn, streamed, stoppable and resumed after a reload.

import { Api, ApiError } from "./api.js";
import { readEvents } from "./sse.js";
import { el, errorView, messageView, renderText, sessionItem, titleOf } from "./views.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"),
  toggle: $("toggle-sidebar"),
  sessions: $("sessions"),
  moreSessions: $("more-sessions"),
  sessionsEmpty: $("sessions-empty"),
  newChat: $("new-chat"),
  title: $("chat-title"),
  rename: $("rename"),
  renameForm: $("rename-form"),
  renameInput: $("rename-input"),
  renameCancel: $("rename-cancel"),
  supersededLabel: $("superseded-label"),
  showSuperseded: $("show-superseded"),
  log: $("log"),
  older: $("older"),
  messages: $("messages"),
  empty: $("empty"),
  alert: $("alert"),
  composer: $("composer"),
  editing: $("editing"),
  cancelEdit: $("cancel-edit"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  status: $("status"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyReason: $("key-reason"),
};

const PAGE = 30;

const state = {
  sessions: [], // the sidebar's chats, newest first
  sessionsCursor: null,
  current: null, // the open chat (a Session), or null for a new one
  olderCursor: null, // `before` for the next older page of history
  loadingOlder: null,
  turn: null, // the running turn, see runTurn
  editing: null, // {seq, content} while a user message is being edited
  generation: 0, // bumped when another chat opens, so late answers for the old one are dropped
};

// ---- The API key -------------------------------------------------------------------------------

let keyPrompt = null;

/** Asks for an API key once, however many requests were refused meanwhile. */
function askKey(reason) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    ui.keyReason.textContent =
      reason === "refused"
        ? "That API key was refused. Enter a valid key for this parley."
        : "This parley needs an API key. It is kept in this tab only (sessionStorage) and sent as a Bearer header.";
    ui.keyInput.value = "";
    ui.keyForm.onsubmit = (event) => {
      event.preventDefault();
      const key = ui.keyInput.value.trim();
      if (!key) return;
      Api.key = key;
      ui.keyDialog.close();
      keyPrompt = null;
      resolve();
    };
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return keyPrompt;
}

// Without a key nothing works: Escape does not close the prompt.
ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault());

const api = new Api({ askKey });

// ---- Small helpers -----------------------------------------------------------------------------

function showAlert(error) {
  const problem = error instanceof ApiError ? error.problem : { title: "Error", detail: String(error?.message || error) };
  ui.alert.replaceChildren(errorView(problem));
  ui.alert.hidden = false;
}

function clearAlert() {
  ui.alert.hidden = true;
  ui.alert.replaceChildren();
}

function setStatus(text) {
  ui.status.textContent = text;
}

function titleFrom(content) {
  const line = content.trim().split("\n")[0].replace(/\s+/g, " ");
  return line.length > 60 ? `${line.slice(0, 59)}…` : line;
}

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function scrollToBottom() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function articles() {
  return [...ui.messages.querySelectorAll("article.msg")];
}

function updateEmpty() {
  ui.empty.hidden = ui.messages.childElementCount > 0;
}

// ---- The running-turn record: what a reload needs to follow the turn -------------------------

const running = {
  key: (sessionId) => `parley.running.${sessionId}`,
  get(sessionId) {
    try {
      return JSON.parse(sessionStorage.getItem(this.key(sessionId)) || "null");
    } catch {
      return null;
    }
  },
  save(turn) {
    const record = {
      turnId: turn.turnId,
      lastEventId: turn.lastEventId,
      user: turn.user,
      text: turn.replyText,
      replacesFrom: turn.replacesFrom,
    };
    sessionStorage.setItem(this.key(turn.sessionId), JSON.stringify(record));
  },
  forget(sessionId) {
    sessionStorage.removeItem(this.key(sessionId));
  },
};

// ---- The sidebar -------------------------------------------------------------------------------

function renderSessions() {
  ui.sessions.replaceChildren(
    ...state.sessions.map((session) =>
      sessionItem(session, {
        current: state.current?.id === session.id,
        onOpen: () => openChat(session.id),
        onDelete: () => deleteChat(session),
      }),
    ),
  );
  ui.moreSessions.hidden = !state.sessionsCursor;
  ui.sessionsEmpty.hidden = state.sessions.length > 0;
}

async function loadSessions({ more = false } = {}) {
  const page = await api.listSessions(more ? state.sessionsCursor : null);
  const known = new Set(more ? state.sessions.map((s) => s.id) : []);
  const fresh = page.data.filter((s) => !known.has(s.id));
  state.sessions = more ? [...state.sessions, ...fresh] : page.data;
  state.sessionsCursor = page.next_cursor;
  renderSessions();
}

/** Puts a chat at the top of the list (it was just written to), or refreshes it in place. */
function upsertSession(session, { toTop = true } = {}) {
  const index = state.sessions.findIndex((s) => s.id === session.id);
  if (index >= 0 && !toTop) state.sessions[index] = session;
  else {
    if (index >= 0) state.sessions.splice(index, 1);
    state.sessions.unshift(session);
  }
  if (state.current?.id === session.id) {
    state.current = session;
    showTitle();
  }
  renderSessions();
}

async function deleteChat(session) {
  if (!window.confirm(`Delete “${titleOf(session)}”? Its whole history is deleted too.`)) return;
  try {
    await api.deleteSession(session.id);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) return showAlert(error);
  }
  running.forget(session.id);
  state.sessions = state.sessions.filter((s) => s.id !== session.id);
  if (state.current?.id === session.id) newChat();
  renderSessions();
  setStatus("Chat deleted.");
}

function setSidebar(open) {
  ui.sidebar.classList.toggle("open", open);
  ui.toggle.setAttribute("aria-expanded", String(open));
}

// ---- The conversation --------------------------------------------------------------------------

function showTitle() {
  const session = state.current;
  ui.title.textContent = session ? titleOf(session) : "New chat";
  document.title = session ? `${titleOf(session)} · parley` : "parley";
  ui.rename.hidden = !session;
  ui.supersededLabel.hidden = !session;
  ui.renameForm.hidden = true;
  ui.title.hidden = false;
}

function newChat() {
  state.generation += 1;
  state.current = null;
  state.olderCursor = null;
  cancelEdit();
  ui.messages.replaceChildren();
  ui.older.hidden = true;
  ui.showSuperseded.checked = false;
  if (location.hash) history.pushState(null, "", location.pathname);
  showTitle();
  updateEmpty();
  renderSessions();
  setSidebar(false);
  ui.message.focus();
}

async function openChat(id, { push = true } = {}) {
  if (state.turn && state.turn.sessionId !== id) detachTurn();
  const generation = ++state.generation;
  cancelEdit();
  clearAlert();
  setSidebar(false);
  let session;
  try {
    session = await api.getSession(id);
  } catch (error) {
    if (generation !== state.generation) return;
    if (error instanceof ApiError && error.status === 404) {
      state.sessions = state.sessions.filter((s) => s.id !== id);
      newChat();
      return setStatus("That chat no longer exists.");
    }
    return showAlert(error);
  }
  if (generation !== state.generation) return;
  state.current = session;
  if (push && location.hash !== `#${id}`) history.pushState(null, "", `#${id}`);
  showTitle();
  renderSessions();
  ui.messages.replaceChildren();
  state.olderCursor = null;
  await loadOlder({ first: true });
  if (generation !== state.generation) return;
  scrollToBottom();
  if (!state.turn) await resumeTurn(id);
}

/** Loads the next older page of history above what is shown, keeping the view where it was. */
function loadOlder({ first = false } = {}) {
  if (!state.current || (!first && !state.olderCursor)) return Promise.resolve();
  if (state.loadingOlder) return state.loadingOlder;
  const id = state.current.id;
  const generation = state.generation;
  state.loadingOlder = (async () => {
    try {
      const page = await api.listMessages(id, {
        before: first ? null : state.olderCursor,
        limit: PAGE,
        includeSuperseded: ui.showSuperseded.checked,
      });
      if (generation !== state.generation) return;
      const fromBottom = ui.log.scrollHeight - ui.log.scrollTop;
      const views = page.data.reverse().map((m) => messageView(m));
      ui.messages.prepend(...views);
      refreshActions();
      state.olderCursor = page.has_more ? page.next_cursor : null;
      ui.older.hidden = !state.olderCursor;
      if (!first) ui.log.scrollTop = ui.log.scrollHeight - fromBottom;
      updateEmpty();
    } catch (error) {
      if (generation === state.generation) showAlert(error);
    } finally {
      state.loadingOlder = null;
    }
  })();
  return state.loadingOlder.then(() => {
    // A page that does not fill the view cannot be scrolled up: load the next one.
    if (generation === state.generation && state.olderCursor && ui.log.scrollHeight <= ui.log.clientHeight + 40) {
      return loadOlder();
    }
  });
}

/** The buttons of each message: Edit and Fork on user messages, Fork on replies, Regenerate on the last one. */
function refreshActions() {
  const stick = nearBottom();
  const all = articles();
  const busy = Boolean(state.turn);
  const last = all.findLast((a) => !a.classList.contains("superseded") && a.dataset.seq);
  for (const article of all) {
    const actions = article.querySelector(".actions");
    actions.replaceChildren();
    const seq = Number(article.dataset.seq);
    if (!seq || busy || article.classList.contains("superseded")) continue;
    const role = article.classList.contains("user") ? "user" : article.classList.contains("assistant") ? "assistant" : "tool";
    const callsTools = Boolean(article.message?.tool_calls?.length);
    if (role === "assistant" && article === last && !callsTools) {
      actions.append(el("button", { type: "button", className: "quiet", onclick: () => regenerate(article.dataset.turn) }, "Regenerate"));
    }
    if (role === "user") {
      actions.append(el("button", { type: "button", className: "quiet", onclick: () => startEdit(article) }, "Edit"));
    }
    if (role === "user" || (role === "assistant" && !callsTools)) {
      actions.append(el("button", { type: "button", className: "quiet", onclick: () => fork(seq) }, "Fork"));
    }
  }
  if (stick) scrollToBottom();
}

/** Removes (or marks as replaced, when replaced messages are shown) the messages from `seq` on. */
function dropFrom(seq, except = []) {
  for (const article of articles()) {
    if (except.includes(article) || !article.dataset.seq || Number(article.dataset.seq) < seq) continue;
    if (ui.showSuperseded.checked) {
      article.classList.add("superseded");
      article.querySelector(".msg-head").append(el("span", { className: "badge replaced" }, "replaced"));
    } else {
      article.remove();
    }
  }
}

// ---- Edit, regenerate, fork --------------------------------------------------------------------

function startEdit(article) {
  if (state.turn) return;
  state.editing?.article.classList.remove("being-edited");
  state.editing = { seq: Number(article.dataset.seq), article };
  article.classList.add("being-edited");
  ui.message.value = article.message.content;
  ui.editing.hidden = false;
  ui.message.focus();
  autoGrow();
}

function cancelEdit() {
  if (state.editing) {
    state.editing.article.classList.remove("being-edited");
    ui.message.value = "";
  }
  state.editing = null;
  ui.editing.hidden = true;
}

async function regenerate(turnId) {
  if (state.turn || !state.current) return;
  const id = state.current.id;
  clearAlert();
  await runTurn(id, (signal) => api.regenerate(id, turnId, signal), { user: null });
}

async function fork(seq) {
  if (!state.current) return;
  const source = state.current;
  try {
    const metadata = { ...source.metadata, title: `${titleOf(source)} (fork)` };
    const session = await api.fork(source.id, { up_to_seq: seq, metadata });
    upsertSession(session);
    await openChat(session.id);
    setStatus("Forked into a new chat.");
  } catch (error) {
    showAlert(error);
  }
}

// ---- Sending and the running turn --------------------------------------------------------------

async function send() {
  const content = ui.message.value;
  if (!content.trim() || state.turn) return;
  clearAlert();
  let session = state.current;
  try {
    if (!session) {
      session = await api.createSession({ metadata: { title: titleFrom(content) } });
      state.generation += 1;
      state.current = session;
      history.pushState(null, "", `#${session.id}`);
      upsertSession(session);
      showTitle();
    } else if (!session.metadata?.title && session.message_count === 0) {
      session = await api.updateSession(session.id, { ...session.metadata, title: titleFrom(content) });
      upsertSession(session, { toTop: false });
    }
  } catch (error) {
    return showAlert(error);
  }
  const body = { content };
  if (state.editing) body.replace_from = state.editing.seq;
  cancelEdit();
  ui.message.value = "";
  autoGrow();
  await runTurn(session.id, (signal) => api.postMessage(session.id, body, signal), { user: content });
}

/**
 * Runs a turn's stream to its end: `start(signal)` opens it (a post, a regenerate, a follow).
 * A stream that ends without a terminal event (a dropped connection) is followed again from the
 * last event received, with Last-Event-ID.
 */
async function runTurn(sessionId, start, { user, resumed = null }) {
  const turn = {
    sessionId,
    generation: state.generation,
    turnId: resumed?.turnId ?? null,
    lastEventId: resumed?.lastEventId ?? 0,
    user,
    replyText: resumed?.text ?? "",
    replacesFrom: resumed?.replacesFrom ?? null,
    controller: new AbortController(),
    nodes: [],
    reply: null,
    replyMessageId: null,
    ended: false,
    stopRequested: false,
  };
  state.turn = turn;
  setBusy(true);
  if (user !== null) addNode(turn, messageView({ role: "user", content: user, created_at: new Date().toISOString() }));
  if (turn.replacesFrom) dropFrom(turn.replacesFrom, turn.nodes);
  newReply(turn);
  if (turn.replyText) renderReply(turn);
  scrollToBottom();
  let opener = start;
  try {
    for (let attempt = 0; !turn.ended; attempt += 1) {
      try {
        const response = await opener(turn.controller.signal);
        for await (const event of readEvents(response)) apply(turn, event);
      } catch (error) {
        if (turn.controller.signal.aborted) return;
        if (error instanceof ApiError && error.code === "turn_in_progress" && error.problem.turn_id && !turn.turnId) {
          // Another tab (or client) is replying in this chat: follow that turn instead.
          setStatus("A reply is already running in this chat: following it.");
          for (const node of turn.nodes) if (node !== turn.reply) node.remove();
          turn.nodes = [turn.reply];
          if (user !== null) ui.message.value = user;
          turn.user = null;
          turn.turnId = error.problem.turn_id;
        } else if (error instanceof ApiError || !turn.turnId || attempt >= 5) {
          return failTurn(turn, error);
        }
      }
      if (turn.ended || turn.controller.signal.aborted) break;
      if (!turn.turnId) return failTurn(turn, new Error("the stream ended before the turn started"));
      // Resume where the stream stopped.
      await new Promise((resolve) => setTimeout(resolve, Math.min(250 * (attempt + 1), 2000)));
      opener = (signal) => api.follow(sessionId, turn.turnId, turn.lastEventId, signal);
    }
  } finally {
    if (state.turn === turn) {
      state.turn = null;
      setBusy(false);
      refreshActions();
    }
    if (turn.ended) running.forget(sessionId);
    if (turn.ended) refreshSession(sessionId);
  }
}

/** Leaves a running turn to itself (another chat was opened); a return to its chat follows it again. */
function detachTurn() {
  const turn = state.turn;
  turn.controller.abort();
  state.turn = null;
  setBusy(false);
}

function addNode(turn, node, before = null) {
  ui.messages.insertBefore(node, before);
  turn.nodes.push(node);
  updateEmpty();
  return node;
}

function newReply(turn) {
  turn.reply = addNode(turn, messageView({ role: "assistant", content: "" }, { streaming: true }));
  turn.replyMessageId = null;
}

let renderQueued = null;

function renderReply(turn) {
  if (renderQueued === turn) return;
  renderQueued = turn;
  requestAnimationFrame(() => {
    renderQueued = null;
    if (!turn.reply?.isConnected || turn.ended) return;
    const stick = nearBottom();
    renderText(turn.reply.querySelector(".text"), turn.replyText);
    if (stick) scrollToBottom();
  });
}

function replaceNode(turn, old, fresh) {
  old.replaceWith(fresh);
  turn.nodes = turn.nodes.map((n) => (n === old ? fresh : n));
  if (turn.reply === old) turn.reply = fresh;
  return fresh;
}

/** Applies one event of the turn's stream to the page. */
function apply(turn, { event, id, data }) {
  if (id) turn.lastEventId = Number(id);
  const stick = nearBottom();
  switch (event) {
    case "turn.started":
      turn.turnId = data.turn_id;
      if (data.replaces_from !== undefined && data.replaces_from !== null) {
        turn.replacesFrom = data.replaces_from;
        dropFrom(data.replaces_from, turn.nodes);
      }
      if (turn.user === null && data.user_message) {
        turn.user = data.user_message.content;
        addNode(turn, messageView({ ...data.user_message, seq: 0 }), turn.reply);
      }
      if (turn.stopRequested) stop();
      break;
    case "message.delta":
      if (turn.replyMessageId && turn.replyMessageId !== data.message_id) {
        turn.replyText = "";
        newReply(turn);
      }
      turn.replyMessageId = data.message_id;
      turn.replyText += data.delta;
      renderReply(turn);
      break;
    case "tool.call":
      if (turn.replyMessageId === data.message.id) {
        // The text streamed so far belonged to the message that calls the tools.
        replaceNode(turn, turn.reply, messageView(data.message));
        newReply(turn);
      } else {
        addNode(turn, messageView(data.message), turn.reply);
      }
      turn.replyText = "";
      break;
    case "tool.result":
      addNode(turn, messageView(data.message), turn.reply);
      break;
    case "message.completed":
      replaceNode(turn, turn.reply, messageView(data.message));
      turn.replyText = data.message.content;
      break;
    case "turn.completed":
      finishTurn(turn, data.messages);
      setStatus("");
      break;
    case "turn.cancelled":
      finishTurn(turn, data.messages);
      setStatus("Stopped. The partial reply is kept, marked cancelled.");
      break;
    case "turn.failed":
      turn.ended = true;
      replaceNode(turn, turn.reply, messageView({ role: "assistant", content: turn.replyText }, { failed: true, error: data.error }));
      for (const node of turn.nodes) if (node.classList.contains("user")) replaceNode(turn, node, messageView({ role: "user", content: turn.user ?? "" }, { unsaved: true }));
      setStatus("The reply failed; nothing was saved.");
      break;
    default:
      break;
  }
  if (!turn.ended && turn.turnId) running.save(turn);
  if (stick) scrollToBottom();
}

/** Replaces the turn's provisional messages with the stored ones. */
function finishTurn(turn, messages) {
  turn.ended = true;
  const anchor = turn.nodes.find((n) => n.isConnected) ?? null;
  const views = messages.map((m) => messageView(m));
  if (anchor) anchor.before(...views);
  else ui.messages.append(...views);
  for (const node of turn.nodes) node.remove();
  turn.nodes = views;
  updateEmpty();
}

function failTurn(turn, error) {
  turn.ended = true;
  const problem = error instanceof ApiError ? error.problem : { title: "Connection lost", detail: String(error?.message || error) };
  if (error instanceof ApiError && turn.turnId === null) {
    // Refused before it ran (409, 413, 422…): nothing happened; give the text back.
    for (const node of turn.nodes) node.remove();
    if (turn.user !== null && !ui.message.value) ui.message.value = turn.user;
    updateEmpty();
    showAlert(error);
    return;
  }
  replaceNode(turn, turn.reply, messageView({ role: "assistant", content: turn.replyText }, { failed: true, error: problem }));
}

async function refreshSession(id) {
  try {
    upsertSession(await api.getSession(id));
  } catch {
    // The list catches up on the next load.
  }
}

/** After a reload: finds this chat's running turn and follows it from the last event seen. */
async function resumeTurn(sessionId) {
  const record = running.get(sessionId);
  if (!record?.turnId) return;
  let turn;
  try {
    turn = await api.getTurn(sessionId, record.turnId);
  } catch {
    running.forget(sessionId);
    return;
  }
  if (turn.status !== "running" || state.current?.id !== sessionId || state.turn) {
    running.forget(sessionId);
    return;
  }
  setStatus("Following the reply that was running…");
  await runTurn(sessionId, (signal) => api.follow(sessionId, record.turnId, record.lastEventId, signal), {
    user: record.user,
    resumed: record,
  });
}

async function stop() {
  const turn = state.turn;
  if (!turn) return;
  ui.stop.disabled = true;
  setStatus("Stopping…");
  if (!turn.turnId) {
    turn.stopRequested = true;
    return;
  }
  try {
    await api.cancel(turn.sessionId, turn.turnId);
  } catch (error) {
    if (!(error instanceof ApiError && error.code === "turn_finished")) showAlert(error);
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.stop.disabled = false;
  ui.log.setAttribute("aria-busy", String(busy));
  if (busy) setStatus("Replying… Closing this tab does not stop the reply; Stop does.");
  refreshActions();
}

// ---- Events ------------------------------------------------------------------------------------

function autoGrow() {
  ui.message.style.height = "auto";
  ui.message.style.height = `${Math.min(ui.message.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && state.editing) {
    cancelEdit();
  }
});
ui.message.addEventListener("input", autoGrow);
ui.stop.addEventListener("click", stop);
ui.cancelEdit.addEventListener("click", () => {
  cancelEdit();
  ui.message.focus();
});
ui.newChat.addEventListener("click", () => {
  if (state.turn) detachTurn();
  newChat();
});
ui.moreSessions.addEventListener("click", () => loadSessions({ more: true }).catch(showAlert));
ui.toggle.addEventListener("click", (event) => {
  event.stopPropagation();
  setSidebar(!ui.sidebar.classList.contains("open"));
});
// On a narrow screen the chats lie over the conversation: a click beside them or Escape closes them.
document.querySelector(".main").addEventListener("click", () => setSidebar(false));
ui.sidebar.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.sidebar.classList.contains("open")) {
    setSidebar(false);
    ui.toggle.focus();
  }
});
ui.older.addEventListener("click", () => loadOlder());
ui.log.addEventListener("scroll", () => {
  if (ui.log.scrollTop < 150 && state.olderCursor) loadOlder();
});
ui.showSuperseded.addEventListener("change", () => {
  if (state.current && !state.turn) openChat(state.current.id, { push: false });
});
ui.rename.addEventListener("click", () => {
  ui.renameInput.value = titleOf(state.current);
  ui.title.hidden = true;
  ui.rename.hidden = true;
  ui.renameForm.hidden = false;
  ui.renameInput.focus();
  ui.renameInput.select();
});
ui.renameCancel.addEventListener("click", showTitle);
ui.renameInput.addEventListener("keydown", (event) => {
  if (event.key === "Escape") showTitle();
});
ui.renameForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const title = ui.renameInput.value.trim();
  if (!title || !state.current) return showTitle();
  try {
    upsertSession(await api.updateSession(state.current.id, { ...state.current.metadata, title }), { toTop: false });
    setStatus("Renamed.");
  } catch (error) {
    showAlert(error);
  }
  showTitle();
  ui.rename.focus();
});
window.addEventListener("popstate", () => {
  const id = decodeURIComponent(location.hash.slice(1));
  if (id && id !== state.current?.id) openChat(id, { push: false });
  else if (!id && state.current) newChat();
});

// ---- Start -------------------------------------------------------------------------------------

async function main() {
  try {
    await loadSessions();
  } catch (error) {
    showAlert(error);
  }
  const id = decodeURIComponent(location.hash.slice(1));
  if (id) await openChat(id, { push: false });
  else newChat();
}

main();

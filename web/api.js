// The HTTP client of parley's native API (/v1). Every failure is an ApiError carrying the RFC 9457
// problem the server sent. With API keys on, the key lives in sessionStorage (this tab only, never
// in a URL or a log) and goes out as a Bearer header; a 401 asks for a key and tries again.

const KEY_ITEM = "parley.apiKey";

/** An error answer of the API, with its problem detail. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
  get code() {
    return this.problem.code;
  }
}

async function problemOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body === "object") return body;
  } catch {
    // Not JSON: fall through.
  }
  return { status: response.status, title: response.statusText };
}

const sessionPath = (id) => `/v1/sessions/${encodeURIComponent(id)}`;
const turnPath = (id, turnId) => `${sessionPath(id)}/turns/${encodeURIComponent(turnId)}`;

export class Api {
  /** `askKey(reason)` resolves once the user has given a key ("needed" or "refused"). */
  constructor({ askKey }) {
    this.askKey = askKey;
  }

  static get key() {
    return sessionStorage.getItem(KEY_ITEM);
  }

  static set key(value) {
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    else sessionStorage.removeItem(KEY_ITEM);
  }

  /** Sends a request; resolves to the Response when it is 2xx, throws ApiError otherwise. */
  async request(method, path, { body, stream = false, headers = {}, signal } = {}) {
    for (;;) {
      const sent = Api.key;
      const all = { ...headers };
      if (sent) all.Authorization = `Bearer ${sent}`;
      if (body !== undefined) all["Content-Type"] = "application/json";
      if (stream) all.Accept = "text/event-stream";
      const response = await fetch(path, {
        method,
        headers: all,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
      if (response.status === 401) {
        // Nothing ran: ask for a key (again), then repeat the request with it.
        if (Api.key === sent) Api.key = null;
        await this.askKey(sent ? "refused" : "needed");
        continue;
      }
      if (!response.ok) throw new ApiError(response.status, await problemOf(response));
      return response;
    }
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  listSessions(cursor, limit = 30) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (cursor) query.set("cursor", cursor);
    return this.json("GET", `/v1/sessions?${query}`);
  }

  getSession(id) {
    return this.json("GET", sessionPath(id));
  }

  createSession(body) {
    return this.json("POST", "/v1/sessions", { body });
  }

  updateSession(id, metadata) {
    return this.json("PATCH", sessionPath(id), { body: { metadata } });
  }

  deleteSession(id) {
    return this.json("DELETE", sessionPath(id));
  }

  /** A page of history, newest first; `before` is the previous page's `next_cursor`. */
  listMessages(id, { before, limit = 30, includeSuperseded = false } = {}) {
    const query = new URLSearchParams({ limit: String(limit), order: "desc" });
    if (before) query.set("before", before);
    if (includeSuperseded) query.set("include_superseded", "true");
    return this.json("GET", `${sessionPath(id)}/messages?${query}`);
  }

  /** Posts a turn and returns the open event stream (a Response). */
  postMessage(id, body, signal) {
    return this.request("POST", `${sessionPath(id)}/messages`, { body, stream: true, signal });
  }

  /** Runs the last turn again, streamed like a post. */
  regenerate(id, turnId, signal) {
    return this.request("POST", `${turnPath(id, turnId)}/regenerate`, { body: {}, stream: true, signal });
  }

  /** Follows a turn's events, after event `lastEventId` (0 or none: from the start). */
  follow(id, turnId, lastEventId, signal) {
    const headers = lastEventId ? { "Last-Event-ID": String(lastEventId) } : {};
    return this.request("GET", `${turnPath(id, turnId)}/events`, { stream: true, headers, signal });
  }

  getTurn(id, turnId) {
    return this.json("GET", turnPath(id, turnId));
  }

  cancel(id, turnId) {
    return this.json("POST", `${turnPath(id, turnId)}/cancel`);
  }

  /** A new chat holding this one's messages up to `upToSeq` (all when omitted). */
  fork(id, body) {
    return this.json("POST", `${sessionPath(id)}/fork`, { body });
  }
}

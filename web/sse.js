// Server-Sent Events over a fetch() response: EventSource cannot POST or send an Authorization
// header, so the page reads the stream itself. Yields {event, id, data} with data parsed as JSON;
// comments (keep-alives) are skipped. The generator ends when the response body does.

export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", id: "", data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = lineEnd(buffer)) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(buffer[end] === "\r" && buffer[end + 1] === "\n" ? end + 2 : end + 1);
        if (line === "") {
          if (event.data.length) yield { event: event.event, id: event.id, data: JSON.parse(event.data.join("\n")) };
          event = { event: "message", id: event.id, data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.event = value;
          else if (field === "id") event.id = value;
          else if (field === "data") event.data.push(value);
        }
      }
    }
  } finally {
    // Stops the download when the reader leaves early; a no-op after the end.
    reader.cancel().catch(() => {});
  }
}

function lineEnd(text) {
  const n = text.indexOf("\n");
  const r = text.indexOf("\r");
  if (r >= 0 && (n < 0 || r < n)) {
    // A lone "\r" at the end may be the first half of "\r\n": wait for more.
    return r === text.length - 1 ? -1 : r;
  }
  return n;
}

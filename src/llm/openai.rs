//! The `openai` provider: any OpenAI-compatible `/chat/completions` endpoint, streamed.

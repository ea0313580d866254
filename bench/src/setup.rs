//! Preparing data through parley's API: sessions, and turns that give sessions a history.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;

use crate::client::Client;

/// The request body of every benchmark turn (the same content each time).
pub fn turn_body(content: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "content": content }).to_string())
}

/// Runs `work(client, item)` for every item, `concurrency` at a time, each worker on its own
/// connection; fails on the first error.
pub async fn for_each<T, F, Fut>(
    addr: SocketAddr,
    items: Vec<T>,
    concurrency: usize,
    work: F,
) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(Client, T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Client>> + Send,
{
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let work = Arc::new(work);
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (queue, work) = (Arc::clone(&queue), Arc::clone(&work));
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some(item) = next else { return Ok::<_, anyhow::Error>(()) };
                    client = work(client, item).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.context("setup worker panicked")??;
    }
    Ok(())
}

/// Creates the sessions `ids`.
pub async fn create_sessions(addr: SocketAddr, ids: &[String], concurrency: usize) -> anyhow::Result<()> {
    for_each(addr, ids.to_vec(), concurrency, |mut client, id| async move {
        let body = Bytes::from(format!("{{\"id\":\"{id}\"}}"));
        client.call_ok(Method::POST, "/v1/sessions", Some(body)).await?;
        Ok(client)
    })
    .await
}

/// Posts `turns` turns, one after another, to each session (sessions in parallel).
pub async fn post_turns(
    addr: SocketAddr,
    ids: Vec<(String, u64)>,
    body: &Bytes,
    concurrency: usize,
) -> anyhow::Result<()> {
    let body = body.clone();
    for_each(addr, ids, concurrency, move |mut client, (id, turns)| {
        let body = body.clone();
        async move {
            let path = format!("/v1/sessions/{id}/messages");
            for _ in 0..turns {
                client.call_ok(Method::POST, &path, Some(body.clone())).await?;
            }
            Ok(client)
        }
    })
    .await
}

/// Gives every session at least `min_messages` messages: reads each session's count, then posts
/// the turns (two messages each) that are missing.
pub async fn top_up(addr: SocketAddr, ids: &[String], min_messages: u64, body: &Bytes) -> anyhow::Result<()> {
    let counts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&counts);
    for_each(addr, ids.to_vec(), 64, move |mut client, id| {
        let sink = Arc::clone(&sink);
        async move {
            let body = client.call_ok(Method::GET, &format!("/v1/sessions/{id}"), None).await?;
            let session: serde_json::Value = serde_json::from_slice(&body)?;
            let count = session["message_count"].as_u64().context("message_count")?;
            sink.lock().expect("counts").push((id, min_messages.saturating_sub(count).div_ceil(2)));
            Ok(client)
        }
    })
    .await?;
    let missing: Vec<(String, u64)> =
        counts.lock().expect("counts").drain(..).filter(|(_, n)| *n > 0).collect();
    post_turns(addr, missing, body, 64).await
}

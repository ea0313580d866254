//! The closed-loop load generator: N workers, each doing one unit of work after another (an HTTP
//! request, or a sequence of store commands) until the run's time or count runs out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use hyper::Method;

use crate::client::Client;
use crate::stats::Summary;

/// Something a worker does repeatedly.
#[async_trait]
pub trait Worker: Send + 'static {
    /// One unit of work; true if it succeeded.
    async fn once(&mut self, i: u64) -> bool;
}

/// How long a run lasts: whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Wall time of the run.
    pub duration: Duration,
    /// Most units per worker.
    pub max_per_worker: u64,
}

/// Runs every worker concurrently under `plan`; returns the summary and the workers.
pub async fn closed_loop<W: Worker>(workers: Vec<W>, plan: Plan) -> (Summary, Vec<W>) {
    let start = Instant::now();
    let deadline = start + plan.duration;
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                let mut errors = 0;
                let mut i = 0;
                while i < plan.max_per_worker && Instant::now() < deadline {
                    let t0 = Instant::now();
                    if w.once(i).await {
                        latencies.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    } else {
                        errors += 1;
                    }
                    i += 1;
                }
                (w, latencies, errors, Instant::now())
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut end = start;
    let mut back = Vec::new();
    for task in tasks {
        let (w, latencies, e, done) = task.await.expect("load worker panicked");
        all.extend(latencies);
        errors += e;
        end = end.max(done);
        back.push(w);
    }
    (Summary::of(all, errors, end - start), back)
}

/// A request: method, path and optional JSON body.
pub type Req = (Method, String, Option<Bytes>);

/// An HTTP worker on its own keep-alive connection.
pub struct HttpWorker {
    client: Client,
    make: Box<dyn FnMut(u64) -> Req + Send>,
}

impl HttpWorker {
    /// A worker sending `make(i)` as its i-th request.
    pub fn new(addr: SocketAddr, make: impl FnMut(u64) -> Req + Send + 'static) -> Self {
        HttpWorker { client: Client::new(addr), make: Box::new(make) }
    }
}

#[async_trait]
impl Worker for HttpWorker {
    async fn once(&mut self, i: u64) -> bool {
        let (method, path, body) = (self.make)(i);
        matches!(self.client.call(method, &path, body).await, Ok((status, _)) if status.is_success())
    }
}

/// The paths `path(session)` of the sessions worker `w` of `clients` owns: w, w + clients, w + 2
/// clients…
fn owned(sessions: &[String], w: usize, clients: usize, path: impl Fn(&str) -> String) -> Vec<String> {
    sessions.iter().skip(w).step_by(clients).map(|s| path(s)).collect()
}

/// Workers that post turns: worker w owns sessions w, w + clients, w + 2 clients… so no two
/// workers ever post to the same session at once (parley answers 409 to a second concurrent turn).
pub fn turn_workers(addr: SocketAddr, clients: usize, sessions: &[String], body: &Bytes) -> Vec<HttpWorker> {
    posting_workers(addr, clients, sessions, body, "")
}

/// The same posting streamed turns (`?stream=true`): a turn is done when its stream has ended.
pub fn streamed_turn_workers(
    addr: SocketAddr,
    clients: usize,
    sessions: &[String],
    body: &Bytes,
) -> Vec<HttpWorker> {
    posting_workers(addr, clients, sessions, body, "?stream=true")
}

fn posting_workers(
    addr: SocketAddr,
    clients: usize,
    sessions: &[String],
    body: &Bytes,
    query: &str,
) -> Vec<HttpWorker> {
    (0..clients)
        .map(|w| {
            let own = owned(sessions, w, clients, |s| format!("/v1/sessions/{s}/messages{query}"));
            let body = body.clone();
            HttpWorker::new(addr, move |i| {
                (Method::POST, own[i as usize % own.len()].clone(), Some(body.clone()))
            })
        })
        .collect()
}

/// Workers that read history pages of `limit` messages, spread over the sessions.
pub fn read_workers(addr: SocketAddr, clients: usize, sessions: &[String], limit: usize) -> Vec<HttpWorker> {
    (0..clients)
        .map(|w| {
            let own = owned(sessions, w, clients, |s| format!("/v1/sessions/{s}/messages?limit={limit}"));
            HttpWorker::new(addr, move |i| (Method::GET, own[i as usize % own.len()].clone(), None))
        })
        .collect()
}

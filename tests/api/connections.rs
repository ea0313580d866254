//! Connection hygiene: a slowloris is cut off at the head timeout, idle keep-alive connections
//! close at the idle timeout, thousands of idle sockets are reaped while turns go on, the
//! connection cap answers 503 at once, a long quiet SSE stream is never idle, and HTTP/2 without
//! TLS still works.
//!
//! Timings are generous: the server's timeouts are 1 to 5 s, and a test waits many times that
//! before it calls a connection left open.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::spawn_app;
use crate::raw_http::{self, closed_by_server, read_response};

/// How long a test waits for the server to close a connection it should close.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// A keep-alive connection that has had one answered request.
async fn used_connection(base: &str) -> TcpStream {
    let mut stream = raw_http::connect(base).await;
    stream.write_all(&raw_http::get(base, "/healthz", "")).await.unwrap();
    assert_eq!(read_response(&mut stream).await.unwrap().status, 200);
    stream
}

#[tokio::test]
async fn a_slowloris_is_cut_off_after_the_header_read_timeout() {
    let app = spawn_app(&["--header-read-timeout", "2s", "--idle-timeout", "60s"]).await;
    let stream = raw_http::connect(&app.base).await;
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    // A header byte every 300 ms: never a whole head, never a pause as long as the timeout.
    let trickle = tokio::spawn(async move {
        let _ = writer.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ").await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    let closed = closed_by_server(&mut reader, CLOSE_WITHIN).await;
    trickle.abort();
    assert!(closed, "the slowloris was still connected after {CLOSE_WITHIN:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_900),
        "cut before the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(app.get_json("/healthz").await.0, 200, "the service still answers");
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let app = spawn_app(&["--header-read-timeout", "1s", "--idle-timeout", "60s"]).await;
    let mut stream = raw_http::connect(&app.base).await;
    assert!(closed_by_server(&mut stream, CLOSE_WITHIN).await, "a connection that sends nothing stays open");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_app(&["--header-read-timeout", "60s", "--idle-timeout", "2s"]).await;
    let mut stream = used_connection(&app.base).await;
    let idle_from = Instant::now();
    assert!(closed_by_server(&mut stream, CLOSE_WITHIN).await, "the idle connection stayed open");
    assert!(
        idle_from.elapsed() >= Duration::from_millis(1_900),
        "closed too soon: {:?}",
        idle_from.elapsed()
    );
}

#[tokio::test]
async fn the_wait_between_requests_is_timed_by_the_idle_timeout_not_the_head_timeout() {
    let app = spawn_app(&["--header-read-timeout", "1s", "--idle-timeout", "8s"]).await;
    let mut stream = used_connection(&app.base).await;
    // Longer than the head timeout, well within the idle timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stream.write_all(&raw_http::get(&app.base, "/healthz", "")).await.unwrap();
    let again = read_response(&mut stream).await.expect("the kept-alive connection still serves");
    assert_eq!(again.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sockets_are_reaped_while_another_client_keeps_getting_turns() {
    const SOCKETS: usize = 2_000;
    // Each socket is two descriptors in this process (client and server side).
    let needed = (2 * SOCKETS + 1_024) as u64;
    let limit = parley::runtime::raise_open_files_limit(needed).expect("the open-files limit");
    assert!(
        limit >= needed,
        "this test needs `ulimit -n` of at least {needed}; the hard limit allows {limit}"
    );
    let app = spawn_app(&["--header-read-timeout", "2s", "--idle-timeout", "2s"]).await;
    app.create_session("busy").await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let turns = {
        let (client, url) = (app.client.clone(), app.url("/v1/sessions/busy/messages"));
        tokio::spawn(async move {
            let (mut done, mut slowest) = (0u32, Duration::ZERO);
            while stop_rx.try_recv().is_err() {
                let started = Instant::now();
                let response =
                    client.post(&url).json(&json!({"content": "still here?"})).send().await.unwrap();
                assert_eq!(response.status(), 200, "a turn failed while sockets piled up");
                slowest = slowest.max(started.elapsed());
                done += 1;
            }
            (done, slowest)
        })
    };
    // A third send nothing, a third half a head, a third a whole request and then nothing.
    let sockets: Vec<TcpStream> = futures::stream::iter(0..SOCKETS)
        .map(|i| {
            let base = app.base.clone();
            async move {
                match i % 3 {
                    0 => raw_http::connect(&base).await,
                    1 => {
                        let mut s = raw_http::connect(&base).await;
                        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-half: ").await.unwrap();
                        s
                    }
                    _ => used_connection(&base).await,
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let open_at = Instant::now();
    let closed = futures::future::join_all(
        sockets
            .into_iter()
            .map(|mut s| async move { closed_by_server(&mut s, Duration::from_secs(60)).await }),
    )
    .await;
    let _ = stop_tx.send(());
    let (done, slowest) = turns.await.unwrap();
    let left = closed.iter().filter(|c| !**c).count();
    assert_eq!(left, 0, "{left} of {SOCKETS} idle sockets were still open 60 s later");
    assert!(open_at.elapsed() < Duration::from_secs(60));
    assert!(done >= 5, "only {done} turns completed meanwhile");
    assert!(slowest < Duration::from_secs(10), "a turn took {slowest:?}");
}

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_gets_503_at_once() {
    let app = spawn_app(&["--max-connections", "4"]).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(used_connection(&app.base).await);
    }
    let started = Instant::now();
    let mut extra = raw_http::connect(&app.base).await;
    extra.write_all(&raw_http::get(&app.base, "/healthz", "")).await.unwrap();
    let refused = read_response(&mut extra).await.expect("an answer");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["code"], "too_many_connections", "{:?}", refused.json());
    assert!(closed_by_server(&mut extra, Duration::from_secs(10)).await, "the refused connection is closed");
    assert!(started.elapsed() < Duration::from_secs(5), "the refusal took {:?}", started.elapsed());
    // A held connection still serves, and closing one makes room for a new one.
    held[0].write_all(&raw_http::get(&app.base, "/healthz", "")).await.unwrap();
    assert_eq!(read_response(&mut held[0]).await.unwrap().status, 200);
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = raw_http::exchange(&app.base, &raw_http::get(&app.base, "/healthz", "")).await;
        if response.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a connection closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_sse_stream_longer_and_quieter_than_the_idle_timeout_is_not_cut() {
    // Five words 1.5 s apart: every gap is longer than the idle timeout, the whole turn 7.5 s.
    let app =
        spawn_app(&["--idle-timeout", "1s", "--header-read-timeout", "1s", "--echo-delay-ms", "1500"]).await;
    app.create_session("slow").await;
    let started = Instant::now();
    let events = app.stream_turn("slow", "a").await;
    assert!(started.elapsed() > Duration::from_secs(3), "the stream was meant to outlast the timeouts");
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.last(), Some(&"turn.completed"), "{names:?}");
    assert_eq!(app.history("slow").await.len(), 2);
}

#[tokio::test]
async fn http2_without_tls_is_still_served() {
    let app = spawn_app(&[]).await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

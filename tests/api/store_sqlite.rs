//! The store contract and SQLite-specific checks against the sqlite backend: each case on a fresh
//! database file.

use parley::store::DynFused;
use parley::store::contract::Setup;

use crate::helpers::sqlite_store;

async fn store(setup: Setup) -> DynFused {
    sqlite_store(setup.max_messages, setup.ttl).await
}

parley::store_contract_tests!(store, distributed = false, ttl = true);

/// Failure modes of the file: each gives a clear start-up error or `Unavailable` (503), never a
/// panic, and a write that fails leaves nothing half written.
mod failures {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use parley::domain::{Message, Metadata, NewSession, Role, new_id};
    use parley::store::sqlite::{SqliteOptions, SqliteStore};
    use parley::store::{AppendBatch, ConversationStore, StoreError};
    use sqlx::Connection;

    use crate::helpers::fresh_sqlite_path;

    fn options(path: &Path) -> SqliteOptions {
        SqliteOptions {
            path: path.to_owned(),
            readers: 2,
            max_messages: None,
            ttl: None,
            op_timeout: Duration::from_secs(1),
        }
    }

    async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(options(path)).await
    }

    /// A store on `path` holding session `s` with two messages; closed again.
    async fn filled(path: &Path) {
        let store = open(path).await.expect("open");
        let new = NewSession { id: "s".into(), system_prompt: None, metadata: Metadata::new() };
        store.create_session("t", new).await.unwrap();
        append(&store, "hello").await.unwrap();
        store.close().await;
    }

    async fn append(store: &SqliteStore, text: &str) -> Result<Vec<Message>, StoreError> {
        let turn = new_id();
        let messages =
            vec![Message::new("s", turn, Role::User, text), Message::new("s", turn, Role::Assistant, text)];
        store.append("t", "s", AppendBatch { messages, ..AppendBatch::default() }).await
    }

    fn unusable(result: Result<SqliteStore, StoreError>) -> String {
        match result {
            Ok(_) => panic!("the store opened"),
            Err(e @ StoreError::Unavailable(_)) => e.to_string(),
            Err(e) => panic!("expected Unavailable, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_another_parley_holds_is_refused_with_the_fix() {
        let path = fresh_sqlite_path();
        let first = open(&path).await.expect("open");
        let err = unusable(open(&path).await);
        assert!(err.contains("in use by another parley") && err.contains("PARLEY_SQLITE_PATH"), "{err}");
        drop(first);
        open(&path).await.expect("free once the first store is gone");
    }

    #[tokio::test]
    async fn a_write_lock_held_by_another_program_answers_unavailable_in_time_and_writes_nothing() {
        let path = fresh_sqlite_path();
        filled(&path).await;
        let store = open(&path).await.expect("open");
        // Another program (here a raw connection: SQLite's locks are per connection) holds the
        // database's write lock.
        let mut other =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
        sqlx::query("begin immediate").execute(&mut other).await.unwrap();
        let started = std::time::Instant::now();
        let err = append(&store, "blocked").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "within the op timeout: {:?}",
            started.elapsed()
        );
        assert_eq!(store.last_n("t", "s", 10).await.unwrap().len(), 2, "reads go on, nothing was written");
        sqlx::query("rollback").execute(&mut other).await.unwrap();
        let stored = append(&store, "after").await.expect("writes again once the lock is gone");
        assert_eq!(stored[0].seq, 3, "no seq was used by the failed write");
    }

    #[tokio::test]
    async fn a_full_disk_answers_unavailable_and_loses_nothing() {
        let path = fresh_sqlite_path();
        filled(&path).await;
        let store = open(&path).await.expect("open");
        // No page more: the disk is "full" for this connection (the one writer).
        let pages: i64 = sqlx::query_scalar("pragma page_count").fetch_one(store.writer()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("pragma max_page_count = {pages}")))
            .execute(store.writer())
            .await
            .unwrap();
        let big = "x".repeat(64 * 1024);
        let err = append(&store, &big).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("full"), "{err}");
        let kept = store.last_n("t", "s", 10).await.unwrap();
        assert_eq!(kept.len(), 2, "the failed batch left nothing");
        assert_eq!(store.get_session("t", "s").await.unwrap().unwrap().message_count, 2);
        sqlx::query("pragma max_page_count = 1073741823").execute(store.writer()).await.unwrap();
        let stored = append(&store, &big).await.expect("room again");
        assert_eq!(stored[0].seq, 3);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_or_is_corrupt_refuses_to_start() {
        let path = fresh_sqlite_path();
        std::fs::write(&path, "not a database at all\n".repeat(500)).unwrap();
        let err = unusable(open(&path).await);
        assert!(err.contains(&path.display().to_string()) && err.contains("not a database"), "{err}");

        let path = fresh_sqlite_path();
        filled(&path).await;
        {
            let store = open(&path).await.unwrap();
            let new = NewSession { id: "big".into(), system_prompt: None, metadata: Metadata::new() };
            store.create_session("t", new).await.unwrap();
            for _ in 0..20 {
                append(&store, &"y".repeat(4000)).await.unwrap();
            }
            store.close().await;
        }
        // Scribble over every page but the first (the header and the schema stay readable).
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
        for b in bytes[4096..].iter_mut().step_by(7) {
            *b = 0xA5;
        }
        std::fs::write(&path, bytes).unwrap();
        let err = unusable(open(&path).await);
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("corrupt") || err.contains("malformed"), "{err}");
    }

    /// Makes a file read-only for this process, even as root, until dropped.
    struct ReadOnly(PathBuf);

    impl ReadOnly {
        fn make(path: &Path) -> Self {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
            // Root ignores permissions; the immutable attribute binds it too.
            if unsafe { libc::geteuid() } == 0 {
                let status = std::process::Command::new("chattr").arg("+i").arg(path).status();
                assert!(
                    status.is_ok_and(|s| s.success()),
                    "running as root, this test needs `chattr +i` (e2fsprogs) on {}",
                    path.display()
                );
            }
            ReadOnly(path.to_owned())
        }
    }

    impl Drop for ReadOnly {
        fn drop(&mut self) {
            if unsafe { libc::geteuid() } == 0 {
                let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
            }
        }
    }

    #[tokio::test]
    async fn a_read_only_file_refuses_to_start() {
        let path = fresh_sqlite_path();
        filled(&path).await;
        let guard = ReadOnly::make(&path);
        let err = unusable(open(&path).await);
        assert!(err.contains(&path.display().to_string()) && err.contains("readonly"), "{err}");
        drop(guard);
        let store = Arc::new(open(&path).await.expect("writable again"));
        assert_eq!(store.last_n("t", "s", 10).await.unwrap().len(), 2);
    }
}

/// Over HTTP, a full disk answers 503 `store_unavailable` and stores no part of the turn; once
/// there is room again, the same request works and the history holds that one turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_store_unavailable_and_stores_no_part_of_the_turn() {
    use crate::helpers::{Spawn, spawn_app_with};

    let store = sqlite_store(None, None).await;
    let app = spawn_app_with(Spawn {
        store: Some(parley::agent::TurnStore::fused(store.clone())),
        ..Spawn::default()
    })
    .await;
    app.create_session("s").await;
    let pages: i64 = sqlx::query_scalar("pragma page_count").fetch_one(store.writer()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("pragma max_page_count = {pages}")))
        .execute(store.writer())
        .await
        .unwrap();
    let big = "z".repeat(30 * 1024);
    let response = app.post_message_raw("s", serde_json::json!({ "content": big })).await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "store_unavailable", "{body}");
    assert!(app.history("s").await.is_empty(), "no part of the turn was stored");
    sqlx::query("pragma max_page_count = 1073741823").execute(store.writer()).await.unwrap();
    app.post_message("s", &big).await;
    assert_eq!(app.history("s").await.len(), 2, "one question, one answer");
}

/// A turn's messages are index searches of both message tables (migration 0002), never scans of
/// the session.
#[tokio::test]
async fn a_turns_messages_are_searched_by_the_turn_indexes() {
    let store = sqlite_store(None, None).await;
    let explain = format!("explain query plan {}", parley::store::sqlite::sql::TURN_MESSAGES);
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(explain))
        .bind("t")
        .bind("s")
        .bind(uuid::Uuid::now_v7())
        .bind(0_i64)
        .fetch_all(store.writer())
        .await
        .unwrap();
    let plan: Vec<String> = rows.into_iter().map(|(_, _, _, detail)| detail).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("SEARCH messages USING INDEX messages_turn_idx"), "{plan}");
    assert!(plan.contains("SEARCH superseded_messages USING INDEX superseded_messages_turn_idx"), "{plan}");
    assert!(!plan.contains("SCAN"), "{plan}");
}

//! The change feed between instances over one PostgreSQL store (needs
//! `TOLLGATE_TEST_POSTGRES`; skipped with a note without it).

use std::time::Duration;

use sqlx::Executor;
use tollgate::{Engine, PolicySet};
use tollgate_store::{Change, PolicyVersion, Store, Wake};

/// A fresh database on the test server: its URL, name and an admin connection.
async fn fresh_database() -> Option<(String, String, sqlx::postgres::PgPool)> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(url) = std::env::var("TOLLGATE_TEST_POSTGRES") else {
        eprintln!("note: TOLLGATE_TEST_POSTGRES is not set; skipping the change-feed test");
        return None;
    };
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("tollgate_feed_{}_{n}", std::process::id());
    let admin = sqlx::postgres::PgPool::connect(&url)
        .await
        .expect("TOLLGATE_TEST_POSTGRES must be reachable");
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    }
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    Some((format!("{base}/{name}"), name, admin))
}

fn version(n: u64, source: &str) -> PolicyVersion {
    PolicyVersion {
        version: n,
        source: source.into(),
        created_at: 0,
        actor: "test".into(),
        reason: String::new(),
    }
}

fn change() -> Change<'static> {
    Change {
        actor: "test",
        action: "policy.update",
        target: "policy",
        from: None,
        to: None,
        reason: "",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_between_subscribing_and_serving_is_notified() {
    let Some((url, name, admin)) = fresh_database().await else {
        return;
    };
    let (writer, follower) = (
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    );
    // the order a server starts in: subscribe, then load, then serve
    let mut feed = follower.change_feed().await.unwrap();
    let engine = Engine::builder().build(PolicySet::compile("{}").unwrap());
    follower.sync(&engine).await.unwrap();
    let loaded = engine.policy().version();

    // another instance commits a version between the load and the first wait
    let source = "policies: [{name: p, rules: [{id: no-x, type: restrict_models, deny: [x]}]}]";
    writer
        .insert_policy(&version(loaded + 1, source), change())
        .await
        .unwrap();

    // the notification waited in the subscription: the feed wakes for it, not for the
    // one-second fallback (which would answer Wake::Timer)
    let wake = tokio::time::timeout(Duration::from_secs(30), feed.wait())
        .await
        .expect("the feed answers within its fallback period");
    assert_eq!(wake, Wake::Notified);
    assert!(
        follower.sync(&engine).await.unwrap(),
        "a new version is loaded"
    );
    assert_eq!(engine.policy().version(), loaded + 1);

    // nothing more: the next wake is the fallback timer
    assert_eq!(feed.wait().await, Wake::Timer);
    assert!(!follower.sync(&engine).await.unwrap());

    writer.close().await;
    follower.close().await;
    drop(feed);
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_listens_again_after_its_connection_is_ended() {
    let Some((url, name, admin)) = fresh_database().await else {
        return;
    };
    let (writer, follower) = (
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    );
    let mut feed = follower.change_feed().await.unwrap();
    let engine = Engine::builder().build(PolicySet::compile("{}").unwrap());
    follower.sync(&engine).await.unwrap();
    let loaded = engine.policy().version();

    // the server ends the listening connection (a restart, a failover, a reaper)
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(&name)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(ended, [true], "one listening connection, ended");

    // the feed says so (the caller then catches up), rather than going quiet
    let mut wake = Wake::Timer;
    for _ in 0..5 {
        wake = feed.wait().await;
        if wake != Wake::Timer {
            break;
        }
    }
    assert_eq!(wake, Wake::Resubscribed);

    // and it is subscribed again: the next change is notified
    let source = "policies: [{name: p, rules: [{id: no-x, type: restrict_models, deny: [x]}]}]";
    writer
        .insert_policy(&version(loaded + 1, source), change())
        .await
        .unwrap();
    assert_eq!(feed.wait().await, Wake::Notified);
    assert!(follower.sync(&engine).await.unwrap());

    writer.close().await;
    follower.close().await;
    drop(feed);
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
}

#[tokio::test]
async fn an_sqlite_store_has_nothing_to_follow() {
    let dir = std::env::temp_dir().join(format!("tollgate-feed-{}", std::process::id()));
    let store = Store::open_dir(&dir).await.unwrap();
    let mut feed = store.change_feed().await.unwrap();
    assert_eq!(feed.wait().await, Wake::Nothing);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

//! The change feed between instances over one PostgreSQL store (needs
//! `TOLLGATE_TEST_POSTGRES`; skipped with a note without it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Executor;
use tollgate::{Engine, PolicySet};
use tollgate_store::{Change, ChangeFeed, PolicyVersion, Store, Wake};

/// Two instances over a fresh database: `writer` makes changes, `follower` has
/// subscribed and then loaded its engine, in the order a server starts in.
struct Instances {
    writer: Store,
    follower: Store,
    feed: ChangeFeed,
    engine: Engine,
    name: String,
    admin: sqlx::postgres::PgPool,
}

impl Instances {
    async fn start() -> Option<Instances> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let Ok(url) = std::env::var("TOLLGATE_TEST_POSTGRES") else {
            eprintln!("note: TOLLGATE_TEST_POSTGRES is not set; skipping the change-feed test");
            return None;
        };
        let name = format!(
            "tollgate_feed_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
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
        let url = format!("{base}/{name}");
        let (writer, follower) = (
            Store::open(&url).await.unwrap(),
            Store::open(&url).await.unwrap(),
        );
        let feed = follower.change_feed().await.unwrap();
        let engine = Engine::builder().build(PolicySet::compile("{}").unwrap());
        follower.sync(&engine).await.unwrap();
        Some(Instances {
            writer,
            follower,
            feed,
            engine,
            name,
            admin,
        })
    }

    /// The writer stores the next policy version.
    async fn change_policy(&self) {
        let version = PolicyVersion {
            version: self.engine.policy().version() + 1,
            source: "policies: [{name: p, rules: [{id: no-x, type: restrict_models, deny: [x]}]}]"
                .into(),
            created_at: 0,
            actor: "test".into(),
            reason: String::new(),
        };
        let change = Change {
            actor: "test",
            action: "policy.update",
            target: "policy",
            from: None,
            to: None,
            reason: "",
        };
        self.writer.insert_policy(&version, change).await.unwrap();
    }

    async fn stop(self) {
        self.writer.close().await;
        self.follower.close().await;
        drop(self.feed);
        let _ = self
            .admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_between_subscribing_and_serving_is_notified() {
    let Some(mut at) = Instances::start().await else {
        return;
    };
    let loaded = at.engine.policy().version();

    // another instance commits a version between the load and the first wait
    at.change_policy().await;

    // the notification waited in the subscription: the feed wakes for it, not for the
    // one-second fallback (which would answer Wake::Timer)
    let wake = tokio::time::timeout(Duration::from_secs(30), at.feed.wait())
        .await
        .expect("the feed answers within its fallback period");
    assert_eq!(wake, Wake::Notified);
    assert!(
        at.follower.sync(&at.engine).await.unwrap(),
        "a new version is loaded"
    );
    assert_eq!(at.engine.policy().version(), loaded + 1);

    // nothing more: the next wake is the fallback timer
    assert_eq!(at.feed.wait().await, Wake::Timer);
    assert!(!at.follower.sync(&at.engine).await.unwrap());
    at.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_listens_again_after_its_connection_is_ended() {
    let Some(mut at) = Instances::start().await else {
        return;
    };

    // the server ends the listening connection (a restart, a failover, a reaper)
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(&at.name)
    .fetch_all(&at.admin)
    .await
    .unwrap();
    assert_eq!(ended, [true], "one listening connection, ended");

    // the feed says so (the caller then catches up), rather than going quiet
    let mut wake = Wake::Timer;
    for _ in 0..5 {
        wake = at.feed.wait().await;
        if wake != Wake::Timer {
            break;
        }
    }
    assert_eq!(wake, Wake::Resubscribed);

    // and it is subscribed again: the next change is notified
    at.change_policy().await;
    assert_eq!(at.feed.wait().await, Wake::Notified);
    assert!(at.follower.sync(&at.engine).await.unwrap());
    at.stop().await;
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

//! Two `tollgate serve` processes sharing PostgreSQL and Redis: limits are exact across
//! them, and a lost Redis fails closed, then recovers. Needs `TOLLGATE_TEST_POSTGRES`
//! (and the `redis-server` binary, for a private Redis that the test can kill).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN, Server, client, fresh_dir, status_of, unique};
use serde_json::{Value, json};
use sqlx::Executor;

struct PrivateRedis(Child);

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis(child)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn two_instances_share_exact_limits_and_fail_closed_without_redis() {
    let Ok(pg) = std::env::var("TOLLGATE_TEST_POSTGRES") else {
        eprintln!("note: TOLLGATE_TEST_POSTGRES is not set; skipping the scale-out test");
        return;
    };
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("note: no redis-server binary; skipping the scale-out test");
        return;
    }
    let name = format!("tollgate_so_{}_{}", std::process::id(), unique());
    let admin_pool = sqlx::postgres::PgPool::connect(&pg).await.unwrap();
    admin_pool
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    let db = format!("{}/{name}", pg.rsplit_once('/').unwrap().0);
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let redis_url = format!("redis://127.0.0.1:{port}");

    let start = || {
        Server::start_with(
            &fresh_dir("so"),
            None,
            &[],
            &["--database", &db, "--redis", &redis_url],
        )
    };
    let (a, b) = (start(), start());
    let c = client();
    let policy = "policies: [{name: p, rules: [{id: rpm, type: rate, limit: 50, per: 1h, by: [team]}, {id: spend, type: budget, limit_usd: 1, period: total, by: [user]}]}]";
    let r = c
        .put(a.url("/v1/admin/policy"))
        .header("X-Admin-Key", ADMIN)
        .body(policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // wait until B runs version 2
    let t = Instant::now();
    loop {
        let d: Value = c
            .post(b.url("/v1/check"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["policy_version"] == 2 {
            break;
        }
        // a hang guard with room for a loaded CI machine; a notification takes milliseconds
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "B did not pick up the policy within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 64 concurrent clients over both instances against a limit of 50
    let urls = [a.url("/v1/check"), b.url("/v1/check")];
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (c, url) = (c.clone(), urls[i % 2].clone());
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..3 {
                let r = c
                    .post(&url)
                    .json(&json!({"subject": {"team": "t"}}))
                    .send()
                    .await
                    .unwrap();
                allowed += usize::from(r.status().as_u16() == 200);
            }
            allowed
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 50, "a rate limit of 50 across two instances");

    // concurrent estimates against one budget: reservations never exceed the limit
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (c, url) = (c.clone(), urls[i % 2].clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(&url)
                .json(&json!({"subject": {"user": "u"}, "estimate": {"cost_usd": "0.03"}}))
                .send()
                .await
                .unwrap();
            usize::from(r.status().as_u16() == 200)
        }));
    }
    let mut reserved = 0;
    for t in tasks {
        reserved += t.await.unwrap();
    }
    assert_eq!(reserved, 33, "33 × 0.03 fit in 1 USD");

    // recorded spend, kept by the store with what it counted toward
    let d: Value = c
        .post(a.url("/v1/check"))
        .json(&json!({"subject": {"user": "w"}, "estimate": {"cost_usd": "0.6"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = c
        .post(b.url("/v1/record"))
        .json(&json!({"decision_id": d["decision_id"], "cost_usd": "0.6"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Redis lost: decisions fail closed, /readyz says so; Redis back: they recover
    drop(redis);
    let r = c
        .post(a.url("/v1/check"))
        .json(&json!({"subject": {"team": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let d: Value = r.json().await.unwrap();
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("ledger backend error"),
        "{d}"
    );
    assert_eq!(status_of(c.get(a.url("/readyz"))).await, 503);
    redis = PrivateRedis::start(port);
    let t = Instant::now();
    loop {
        let r = c
            .post(b.url("/v1/check"))
            .json(&json!({"subject": {"team": "y"}}))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no recovery after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of(c.get(b.url("/readyz"))).await, 200);
    // the empty Redis is rebuilt from the store: the budget continues where it was
    let t = Instant::now();
    loop {
        let u: Value = c
            .get(a.url("/v1/usage?dimension=user&id=w"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if u["items"][0]["spent_usd"] == "0.600000" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "Redis was not rebuilt: {u}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c
        .post(b.url("/v1/check"))
        .json(&json!({"subject": {"user": "w"}, "estimate": {"cost_usd": "0.5"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    drop((a, b, redis));
    let _ = admin_pool
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
}

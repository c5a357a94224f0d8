//! Kill -9 and restart: the policy version, every acknowledged spend, the audit log,
//! runs, overrides and live leases are back, and budgets continue where they were.

mod common;

use common::{ADMIN, Server, client, fresh_dir, json_of, status_of};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const POLICY: &str = r#"
settings:
  batch: {type: integer, default: 8}
policies:
  - name: base
    rules:
      - {id: monthly, type: budget, limit_usd: 1, period: month, by: [user]}
      - {id: gpu, type: quota, resource: gpu, max: 1, by: [user]}
"#;

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    json_of(c.post(url).json(&body).send().await.unwrap()).await
}

#[tokio::test]
async fn state_survives_sigkill() {
    let server = Server::start(Some(POLICY), &[]);
    let config = server.dir.join("policy.yaml");
    let c = client();
    let admin = |r: reqwest::RequestBuilder| {
        r.header("X-Admin-Key", ADMIN)
            .header("X-Reason", "before the crash")
    };

    let edited = format!("{POLICY}      - {{id: rpm, type: rate, limit: 100, per: 1m}}\n");
    assert_eq!(
        status_of(admin(c.put(server.url("/v1/admin/policy"))).body(edited)).await,
        200
    );
    let r = admin(c.put(server.url("/v1/admin/settings/batch?scope=user:u1")))
        .json(&json!({"value": 32}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let (status, _) = post(
        &c,
        server.url("/v1/runs"),
        json!({"id": "r1", "budget_usd": "1"}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, lease) = post(
        &c,
        server.url("/v1/leases"),
        json!({"subject": {"user": "u1"}, "resource": "gpu"}),
    )
    .await;
    assert_eq!(status, 201);
    let (_, d) = post(
        &c,
        server.url("/v1/check"),
        json!({"subject": {"user": "u1"}, "estimate": {"cost_usd": "0.6"}}),
    )
    .await;
    let spent = d["decision_id"].as_str().unwrap().to_string();
    assert_eq!(
        post(
            &c,
            server.url("/v1/record"),
            json!({"decision_id": spent, "cost_usd": "0.5"})
        )
        .await
        .0,
        200
    );
    let (_, d) = post(
        &c,
        server.url("/v1/check"),
        json!({"subject": {"user": "u2", "run": "r1"}, "estimate": {"cost_usd": "0.4"}}),
    )
    .await;
    let in_run = d["decision_id"].as_str().unwrap().to_string();
    assert_eq!(
        post(
            &c,
            server.url("/v1/record"),
            json!({"decision_id": in_run, "cost_usd": "0.4"})
        )
        .await
        .0,
        200
    );
    let (_, audit_before) = {
        let r = admin(c.get(server.url("/v1/admin/audit")))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };

    let dir = server.kill();
    let server = Server::start_in(&dir, Some(&config), &[]);

    // same policy version: the unchanged --config file does not overwrite the admin edit
    let (_, p) = {
        let r = admin(c.get(server.url("/v1/admin/policy")))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(p["version"], 2);
    let audit_after: Value = admin(c.get(server.url("/v1/admin/audit")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit_after, audit_before);

    // acknowledged spend is back, and the budget continues from it
    let usage: Value = c
        .get(server.url("/v1/usage?dimension=user&id=u1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["items"][0]["spent_usd"], "0.500000");
    let (status, d) = post(
        &c,
        server.url("/v1/check"),
        json!({"subject": {"user": "u1"}, "estimate": {"cost_usd": "0.6"}}),
    )
    .await;
    assert_eq!((status, d["rule"].as_str()), (429, Some("monthly")));
    // recording the same decision again still counts once
    let (_, r) = post(
        &c,
        server.url("/v1/record"),
        json!({"decision_id": spent, "cost_usd": "0.5"}),
    )
    .await;
    assert_eq!(r["duplicate"], true);

    // the run, its snapshot and its spend
    let run: Value = c
        .get(server.url("/v1/runs/r1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["policy_version"], 2);
    let (status, d) = post(
        &c,
        server.url("/v1/check"),
        json!({"subject": {"user": "u3", "run": "r1"}, "estimate": {"cost_usd": "0.7"}}),
    )
    .await;
    assert_eq!((status, d["policy"].as_str()), (429, Some("run:r1")));

    // the override
    let s: Value = c
        .get(server.url("/v1/settings/effective?user=u1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        s["settings"]["batch"],
        json!({"value": 32, "source": "override:user:u1"})
    );

    // the live lease still holds its slot, and can be released
    let (status, _) = post(
        &c,
        server.url("/v1/leases"),
        json!({"subject": {"user": "u1"}, "resource": "gpu"}),
    )
    .await;
    assert_eq!(status, 429);
    let id = lease["lease_id"].as_str().unwrap();
    assert_eq!(
        status_of(c.delete(server.url(&format!("/v1/leases/{id}")))).await,
        204
    );
    let (status, _) = post(
        &c,
        server.url("/v1/leases"),
        json!({"subject": {"user": "u1"}, "resource": "gpu"}),
    )
    .await;
    assert_eq!(status, 201);

    // a changed --config file becomes a new version on the next start
    let dir = server.kill();
    std::fs::write(&config, "policies: []\n").unwrap();
    let server = Server::start_in(&dir, Some(&config), &[]);
    let p: Value = admin(c.get(server.url("/v1/admin/policy")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["version"], 3);
}

#[tokio::test]
async fn an_invalid_config_file_refuses_to_start() {
    let dir = std::env::temp_dir().join(format!("tollgate-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.yaml");
    std::fs::write(&config, "policies:\n  - {name: a, inherit: [ghost]}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:2:") && err.contains("unknown parent policy `ghost`"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connection_limits_that_are_not_durations_refuse_to_start() {
    let dir = std::env::temp_dir().join(format!("tollgate-bad-limits-{}", std::process::id()));
    for (flag, message) in [
        (
            "--header-timeout-secs=0",
            "--header-timeout-secs 0: expected a number of seconds, more than 0",
        ),
        (
            "--drain-secs=-1",
            "--drain-secs -1: expected a number of seconds, 0 or more",
        ),
        (
            "--drain-secs=NaN",
            "--drain-secs NaN: expected a number of seconds, 0 or more",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--listen", "127.0.0.1:0", flag, "--data-dir"])
            .arg(dir.join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{flag}: {err}");
        assert!(
            !dir.join("data").exists(),
            "{flag}: nothing is created before the flags are checked"
        );
    }
}

/// The server's `host:port`.
fn address(server: &Server) -> String {
    server.url("").trim_start_matches("http://").to_string()
}

const CHECK_BODY: &str = r#"{"subject": {"user": "u1"}, "model": "gpt-4o"}"#;

/// A check that is in flight: its headers are sent with `Expect: 100-continue` and the
/// server has answered `100 Continue`, which hyper does once the handler reads the body,
/// so the server has taken the request; its body is not sent yet.
async fn check_in_flight(server: &Server) -> TcpStream {
    let mut stream = TcpStream::connect(address(server)).await.unwrap();
    let head = format!(
        "POST /v1/check HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        CHECK_BODY.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("an interim answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "closed before the interim answer");
        interim.push(byte[0]);
    }
    let interim = String::from_utf8_lossy(&interim);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream
}

fn sigterm(server: &Server) {
    let pid = server.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_then_stops() {
    let mut server = Server::start(None, &[]);
    let mut stream = check_in_flight(&server).await;
    sigterm(&server);

    // once the server has taken the signal it accepts no new connection
    let started = Instant::now();
    while TcpStream::connect(address(&server)).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still accepting connections 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // it waits for the request in flight, however long its body takes
    let waiting = Instant::now();
    while waiting.elapsed() < Duration::from_secs(1) {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server stopped with a request in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // the body: the request is answered, then the connection closes
    stream.write_all(CHECK_BODY.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the connection closes after its response")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""allowed":true"#), "{response}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn shutdown_stops_waiting_for_a_request_after_the_drain_limit() {
    let mut server = Server::start_with(&fresh_dir("drain"), None, &[], &["--drain-secs", "0.5"]);
    // a check whose body never comes
    let stuck = check_in_flight(&server).await;
    sigterm(&server);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM with a drain limit of 0.5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    drop(stuck);
}

#[tokio::test]
async fn a_client_slow_to_send_its_headers_is_disconnected() {
    let server = Server::start_with(
        &fresh_dir("slow"),
        None,
        &[],
        &["--header-timeout-secs", "0.5"],
    );
    let mut slow = TcpStream::connect(address(&server)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollg")
        .await
        .unwrap();
    // the rest of the headers never comes: the server closes the connection (a reset or
    // an end of stream, with or without a 408 first) instead of holding it forever
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "the connection is still open 10 s later");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // and everyone else is served as before
    assert_eq!(status_of(client().get(server.url("/healthz"))).await, 200);
}

#[tokio::test]
async fn a_sigterm_as_soon_as_the_address_is_printed_stops_cleanly() {
    // the signal handlers are in place before the address is printed: the process drains
    // and exits 0 rather than dying of the signal
    for _ in 0..5 {
        let mut server = Server::start(None, &[]);
        sigterm(&server);
        let status = server.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}

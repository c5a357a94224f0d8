//! Starts the real `tollgate serve` on an ephemeral port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const ADMIN: &str = "admin-secret";

pub struct Server {
    pub child: Child,
    pub base: String,
    pub dir: PathBuf,
}

impl Server {
    /// Starts a server on a fresh data directory.
    pub fn start(config: Option<&str>, env: &[(&str, &str)]) -> Server {
        let dir = fresh_dir("it");
        std::fs::create_dir_all(&dir).unwrap();
        let config = config.map(|c| {
            let p = dir.join("policy.yaml");
            std::fs::write(&p, c).unwrap();
            p
        });
        Server::start_in(&dir, config.as_deref(), env)
    }

    /// Starts a server on an existing data directory (a restart).
    pub fn start_in(dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Server {
        Server::start_with(dir, config, env, &[])
    }

    /// Starts a server with extra `serve` arguments (e.g. `--database`).
    pub fn start_with(
        dir: &Path,
        config: Option<&Path>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .args(args);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.env("TOLLGATE_ADMIN_KEYS", format!("alice={ADMIN}"))
            .env_remove("TOLLGATE_API_KEYS")
            .env("TOLLGATE_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        Server {
            child,
            base: format!("http://{addr}"),
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let dir = self.dir.clone();
        std::mem::forget(self);
        dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A data directory no other server of this test run uses (not created yet).
pub fn fresh_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "tollgate-{tag}-{}-{}",
        std::process::id(),
        unique()
    ))
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Sends a request; its status.
pub async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

/// A response's status and JSON body (null when there is none).
pub async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

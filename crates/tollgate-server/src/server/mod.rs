//! `tollgate serve`: the HTTP decision API, the control plane and product admission,
//! over the embedded SQLite store.
//!
//! One [`Engine`] (policy behind an atomic pointer, in-memory ledger) answers every
//! decision; the [`Store`] holds what must survive a restart: policy versions, audit,
//! overrides, runs, leases and recorded spend. Writes that change durable state go to
//! the store first, then to the engine, so an acknowledged change is never lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use tollgate::ledger::MemoryLedger;
use tollgate::{Clock, Engine, PolicySet, SystemClock};
use tollgate_redis::RedisLedger;
use tollgate_store::{Change, PolicyVersion, Store};

mod admin;
mod auth;
mod data;
mod error;
mod openapi;
mod products;
mod serve;

use auth::Keys;

/// Options of `tollgate serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeOptions {
    /// A policy file that seeds the store when it is empty; on later starts it becomes a
    /// new version only if its content changed since it was last applied.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value_t = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where the embedded SQLite database lives.
    #[arg(long, default_value = "./tollgate-data")]
    pub data_dir: PathBuf,
    /// The store: `sqlite://PATH` (default: `DATA_DIR/tollgate.db`) or `postgres://…`
    /// (shared by many instances; each picks up the others' changes within a second).
    #[arg(long)]
    pub database: Option<String>,
    /// A Redis ledger (`redis://…`): rate, reservation, spend and lease counters shared by
    /// every instance, so limits are exact across them (one Lua script per decision).
    #[arg(long)]
    pub redis: Option<String>,
    /// Also serve the OpenAI-compatible gateway (not available yet).
    #[arg(long)]
    pub gateway: bool,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, in seconds, counted from
    /// the connection's start or its previous response; the connection closes past it
    /// (so a keep-alive connection idle that long closes too).
    #[arg(long, default_value_t = 30.0)]
    pub header_timeout_secs: f64,
    /// After SIGTERM or Ctrl-C, how long the requests in flight may take to be answered,
    /// in seconds; the server then stops without them.
    #[arg(long, default_value_t = 30.0)]
    pub drain_secs: f64,
}

/// Where the counters live.
pub enum Counters {
    /// In this process (the embedded default).
    Memory(Arc<MemoryLedger>),
    /// In Redis, shared by every instance.
    Redis(Arc<RedisLedger>),
}

impl AppState {
    /// Runs engine work that may wait on Redis without stalling the async workers.
    pub fn blocking<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.counters {
            Counters::Memory(_) => f(),
            Counters::Redis(_) => tokio::task::block_in_place(f),
        }
    }
}

/// Everything a handler needs.
pub struct AppState {
    pub engine: Engine,
    pub counters: Counters,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub api_keys: Keys,
    pub admin_keys: Keys,
    pub metrics: PrometheusHandle,
    /// Serialises control-plane writes (version numbers, read-modify-write of documents).
    pub admin_lock: Mutex<()>,
}

pub type State = axum::extract::State<Arc<AppState>>;

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(options: ServeOptions) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// How often the metrics recorder drains what it holds (see [`metrics_upkeep`]).
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

fn metrics_recorder() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tollgate_decision_seconds".into()),
            &[
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.05,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// Drains the recorder every [`METRICS_UPKEEP`]: a histogram keeps every sample it is
/// given until a scrape or an upkeep folds them into its buckets, so without this a
/// server nobody scrapes grew by each decision's latency sample (8 bytes a check, about
/// 2 GB an hour at 70,000 checks a second).
async fn metrics_upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(METRICS_UPKEEP);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

/// A flag's number of seconds as a duration: finite, not negative, and above zero unless
/// `zero_ok`.
fn seconds(flag: &str, value: f64, zero_ok: bool) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| zero_ok || !d.is_zero())
        .ok_or_else(|| {
            let least = if zero_ok { "0 or more" } else { "more than 0" };
            format!("{flag} {value}: expected a number of seconds, {least}")
        })
}

async fn serve(options: ServeOptions) -> Result<(), String> {
    if options.gateway {
        return Err(
            "--gateway: the OpenAI-compatible gateway is not available in this version".into(),
        );
    }
    let limits = serve::Limits {
        header_read: seconds("--header-timeout-secs", options.header_timeout_secs, false)?,
        drain: seconds("--drain-secs", options.drain_secs, true)?,
    };
    let store = match &options.database {
        None => Store::open_dir(&options.data_dir).await,
        Some(url)
            if ["sqlite:", "postgres:", "postgresql:"]
                .iter()
                .any(|p| url.starts_with(p)) =>
        {
            Store::open(url).await
        }
        Some(url) => {
            return Err(format!(
                "--database `{url}`: expected a sqlite:// or postgres:// URL"
            ));
        }
    }
    .map_err(|e| e.to_string())?;

    let api_keys = Keys::parse(&std::env::var("TOLLGATE_API_KEYS").unwrap_or_default())
        .map_err(|e| format!("TOLLGATE_API_KEYS: {e}"))?;
    let admin_keys = Keys::parse(&std::env::var("TOLLGATE_ADMIN_KEYS").unwrap_or_default())
        .map_err(|e| format!("TOLLGATE_ADMIN_KEYS: {e}"))?;
    if admin_keys.is_empty() {
        tracing::warn!("no TOLLGATE_ADMIN_KEYS: the control plane refuses every call");
    }

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let counters = match &options.redis {
        Some(url) => Counters::Redis(Arc::new(
            RedisLedger::connect(url, "tollgate", 16).map_err(|e| format!("--redis {url}: {e}"))?,
        )),
        None => Counters::Memory(Arc::new(MemoryLedger::new())),
    };
    let engine_ledger: Arc<dyn tollgate::Ledger> = match &counters {
        Counters::Memory(l) => l.clone(),
        Counters::Redis(r) => r.clone(),
    };
    let empty = PolicySet::compile("{}").map_err(|e| e.to_string())?;
    let engine = Engine::builder()
        .clock(clock.clone())
        .ledger(engine_ledger)
        .build(empty);
    // Subscribed before the load, so a change another instance makes meanwhile is seen.
    let changes = store.change_feed().await.map_err(|e| e.to_string())?;
    let restored = store
        .restore_engine(&engine)
        .await
        .map_err(|e| e.to_string())?;
    match &counters {
        Counters::Memory(memory) => {
            let now = clock.now_ms();
            store
                .replay_counters(memory.as_ref(), now, engine.exact_spend_since(now))
                .await
                .map_err(|e| e.to_string())?
        }
        Counters::Redis(redis) => rebuild_redis_if_lost(&store, &engine, redis, clock.now_ms())
            .await
            .map_err(|e| format!("rebuilding Redis from the store: {e}"))?,
    }
    seed(
        &store,
        &engine,
        restored,
        options.config.as_ref(),
        clock.now_ms(),
    )
    .await?;
    metrics::gauge!("tollgate_policy_version").set(engine.policy().version() as f64);

    let state = Arc::new(AppState {
        engine,
        counters,
        store: store.clone(),
        clock,
        api_keys,
        admin_keys,
        metrics: metrics_recorder()?,
        admin_lock: Mutex::new(()),
    });
    // Tasks that run beside the server until it stops.
    let mut background = vec![
        {
            let state = Arc::clone(&state);
            tokio::spawn(async move { changes.follow(&state.engine).await })
        },
        tokio::spawn(metrics_upkeep(state.metrics.clone())),
    ];
    if let Counters::Redis(redis) = &state.counters {
        let (state, redis) = (Arc::clone(&state), Arc::clone(redis));
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let now = state.clock.now_ms();
                if let Err(e) =
                    rebuild_redis_if_lost(&state.store, &state.engine, &redis, now).await
                {
                    tracing::warn!(error = %e, "cannot rebuild Redis from the store yet");
                }
            }
        }));
    }
    let app = router(state, options.max_body_bytes);
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to learn the port.
    println!("listening on {addr}");
    tracing::info!(%addr, "tollgate serving");
    serve::serve(listener, app, limits, shutdown).await;
    // The requests in flight are answered (or the drain limit passed); every
    // acknowledged write was committed before it was acknowledged.
    for task in background {
        task.abort();
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// When Redis has lost this deployment's data (its `alive` marker is gone: a restart
/// without persistence, a flush), one instance replays live leases and recorded spend
/// from the store into it. Rate buckets start full; in-flight reservations are gone.
async fn rebuild_redis_if_lost(
    store: &Store,
    engine: &Engine,
    redis: &RedisLedger,
    now: i64,
) -> Result<(), String> {
    let lost = !tokio::task::block_in_place(|| redis.is_alive()).map_err(|e| e.to_string())?;
    if lost
        && tokio::task::block_in_place(|| redis.try_lock_rebuild()).map_err(|e| e.to_string())?
    {
        tracing::warn!("Redis holds no tollgate data: rebuilding leases and spend from the store");
        store
            .replay_counters(redis, now, engine.exact_spend_since(now))
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::block_in_place(|| redis.mark_alive()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Applies `--config`: the first version of an empty store, or a new version when the
/// file changed since it was last applied (so admin edits survive restarts).
async fn seed(
    store: &Store,
    engine: &Engine,
    restored: Option<u64>,
    config: Option<&PathBuf>,
    now: i64,
) -> Result<(), String> {
    let (source, origin) = match config {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("--config {}: {e}", path.display()))?,
            path.display().to_string(),
        ),
        None if restored.is_none() => (
            "policies: []\n".to_string(),
            "the empty default".to_string(),
        ),
        None => return Ok(()),
    };
    let hash = format!("{:x}", Sha256::digest(source.as_bytes()));
    if restored.is_some()
        && store
            .meta("config_sha256")
            .await
            .map_err(|e| e.to_string())?
            .as_deref()
            == Some(hash.as_str())
    {
        return Ok(());
    }
    let set = engine.compile(&source).map_err(|e| {
        let lines: Vec<String> = e
            .errors()
            .map(|d| format!("{origin}:{}:{}: error: {d}", d.line, d.column))
            .collect();
        format!("the policy file is invalid:\n{}", lines.join("\n"))
    })?;
    let version = restored.unwrap_or(0) + 1;
    let reason = format!("applied {origin}");
    store
        .insert_policy(
            &PolicyVersion {
                version,
                source,
                created_at: now,
                actor: "config".into(),
                reason: reason.clone(),
            },
            Change {
                actor: "config",
                action: "policy.replace",
                target: "policy",
                from: restored.map(|v| v.to_string()),
                to: Some(version.to_string()),
                reason: &reason,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    if config.is_some() {
        store
            .set_meta("config_sha256", &hash)
            .await
            .map_err(|e| e.to_string())?;
    }
    engine.install_version(set, version);
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C (SIGINT). The handlers are installed here, before the
/// server announces its address, not when the future is first polled: a signal that
/// came in between would otherwise stop the process at once, without draining.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    #[cfg(unix)]
    let (mut term, mut interrupt) = {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        (
            listen(SignalKind::terminate())?,
            listen(SignalKind::interrupt())?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/check", post(data::check))
        .route("/v1/record", post(data::record))
        .route("/v1/leases", post(data::acquire))
        .route("/v1/leases/{id}", delete(data::release))
        .route("/v1/runs", post(data::create_run))
        .route("/v1/runs/{id}", get(data::get_run))
        .route("/v1/settings/effective", get(data::effective_settings))
        .route("/v1/usage", get(data::usage))
        .route(
            "/v1/admin/policy",
            get(admin::get_policy).put(admin::put_policy),
        )
        .route("/v1/admin/policy/versions", get(admin::list_versions))
        .route(
            "/v1/admin/policy/versions/{version}",
            get(admin::get_version),
        )
        .route("/v1/admin/policy/rollback/{version}", post(admin::rollback))
        .route(
            "/v1/admin/settings/{key}",
            put(admin::put_setting).delete(admin::delete_setting),
        )
        .route("/v1/admin/audit", get(admin::audit))
        .route("/v1/products/{id}/policy", put(products::put_policy))
        .route("/v1/products/{id}/admit", post(products::admit))
        .route("/v1/products/{id}/provision", post(products::provision))
        .route(
            "/v1/products/{id}/provision/{lease_id}",
            delete(products::deprovision),
        )
        .route("/healthz", get(data::healthz))
        .route("/readyz", get(data::readyz))
        .route("/metrics", get(data::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(data::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

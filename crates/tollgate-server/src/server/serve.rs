//! The connection loop: HTTP/1.1 connections served by axum's router, with a limit on
//! how long a client may take to send its request headers, and a bounded drain on
//! shutdown.
//!
//! `axum::serve` sets neither: without a timer hyper never times out a request's
//! headers, so a client that sends them a byte at a time (or never finishes them) holds
//! its connection forever, and a graceful shutdown waits for such connections as long as
//! they last.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long connections may take, at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// For a request's headers, counted from the connection's start or its previous
    /// response: the connection closes past it, so an idle keep-alive connection closes
    /// after as long.
    pub header_read: Duration,
    /// For the requests in flight after a shutdown signal: connections still open past
    /// it are dropped, and the server stops.
    pub drain: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes; then accepts nothing more and
/// waits, at most `limits.drain`, for the requests in flight to be answered.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain) => {
            tracing::warn!(
                drain_secs = limits.drain.as_secs_f64(),
                "connections still open after the drain limit; stopping without them"
            );
        }
    }
}

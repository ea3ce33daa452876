//! The probe server: `/readyz`, `/livez` and `/metrics` over HTTP/1 (hyper, on the engine's
//! runtime).
//!
//! One server per address and process, shared by the subscribed clients that name that
//! address: the first subscribe binds it (a port in use fails that subscribe), and the last
//! unsubscribe closes it, so that a probe after it is refused. Each subscription holds a
//! [`Registration`]; dropping it unregisters the client, and the server stops with the last one.
//!
//! - `/readyz`: 200 when the clients have at least one partition assigned between them, else
//!   503.
//! - `/livez`: 200 unless a partition's oldest unfinished message has waited longer than
//!   `stall_threshold`, or a thread or task of a subscription died: then 503, with a JSON body
//!   naming them. A partition with nothing unfinished (idle) is never stalled.
//! - `/metrics`: the Prometheus text exposition of [`crate::metrics`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::sync::Notify;

use crate::engine::Engine;
use crate::kafka::KafkaError;
use crate::process::PerProcess;

/// The subscribed clients of one server, by registration id.
type Clients = Arc<Mutex<Vec<(u64, Arc<Engine>)>>>;

/// A running server.
struct Server {
    /// The clients it reports on.
    clients: Clients,
    /// Tells its accept loop to stop.
    stop: Arc<Notify>,
    /// Told by the accept loop once it closed the listener.
    stopped: mpsc::Receiver<()>,
}

/// The servers of this process, by address.
static SERVERS: PerProcess<Mutex<HashMap<SocketAddr, Server>>> = PerProcess::new();

/// Ids of registrations.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How long an unregistration waits for the last server to close its port.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// A subscribed client's place on a probe server; dropping it takes the client off (and stops
/// the server when it was the last).
#[derive(Debug)]
pub struct Registration {
    addr: SocketAddr,
    id: u64,
}

fn servers() -> &'static Mutex<HashMap<SocketAddr, Server>> {
    SERVERS.get_or_default()
}

/// Puts `engine` on the probe server at `addr`, starting the server (on `runtime`) if none
/// runs there. Fails when the address cannot be bound (a port in use).
pub fn register(
    addr: SocketAddr,
    engine: Arc<Engine>,
    runtime: &tokio::runtime::Handle,
) -> Result<Registration, KafkaError> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut servers = servers().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = servers.get(&addr) {
        server
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, engine));
        return Ok(Registration { addr, id });
    }
    let refused = |source: std::io::Error| KafkaError::Probe { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(refused)?;
    listener.set_nonblocking(true).map_err(refused)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(refused)?
    };
    let clients: Clients = Arc::new(Mutex::new(vec![(id, engine)]));
    let stop = Arc::new(Notify::new());
    let (done, stopped) = mpsc::channel();
    runtime.spawn(serve(listener, clients.clone(), stop.clone(), done));
    tracing::info!("probe server listening on http://{addr} (/readyz, /livez, /metrics)");
    servers.insert(
        addr,
        Server {
            clients,
            stop,
            stopped,
        },
    );
    Ok(Registration { addr, id })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut servers = servers().lock().unwrap_or_else(PoisonError::into_inner);
        let Some(server) = servers.get(&self.addr) else {
            return;
        };
        let empty = {
            let mut clients = server
                .clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            clients.retain(|(id, _)| *id != self.id);
            clients.is_empty()
        };
        if !empty {
            return;
        }
        if let Some(server) = servers.remove(&self.addr) {
            server.stop.notify_one();
            // Still holding the lock: a subscribe meanwhile waits until the port is free.
            if server.stopped.recv_timeout(STOP_WAIT).is_err() {
                tracing::warn!(
                    "the probe server on {} did not stop within {STOP_WAIT:?}",
                    self.addr
                );
            } else {
                tracing::info!("probe server on {} stopped", self.addr);
            }
        }
    }
}

/// The accept loop: serves each connection (one request, then closed) until told to stop, then
/// closes the listener and its open connections and says so on `done`.
async fn serve(
    listener: tokio::net::TcpListener,
    clients: Clients,
    stop: Arc<Notify>,
    done: mpsc::Sender<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stop.notified() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let clients = clients.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let response = respond(request.uri().path(), &clients);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .keep_alive(false)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                        if let Err(e) = connection.await {
                            tracing::debug!("probe connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("probe server: could not accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
    let _ = done.send(());
}

/// The response to a request for `path`.
fn respond(path: &str, clients: &Clients) -> Response<Full<Bytes>> {
    let engines: Vec<Arc<Engine>> = clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(_, engine)| engine.clone())
        .collect();
    match path {
        "/readyz" => readiness(&engines),
        "/livez" => liveness(&engines),
        "/metrics" => {
            let figures: Vec<_> = engines.iter().map(|e| e.figures()).collect();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(&figures),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the probe server answers /readyz, /livez and /metrics\n".into(),
        ),
    }
}

/// `/readyz`.
fn readiness(engines: &[Arc<Engine>]) -> Response<Full<Bytes>> {
    let assigned: usize = engines.iter().map(|e| e.assigned_partitions()).sum();
    let status = if assigned > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": assigned > 0, "assigned_partitions": assigned });
    reply(status, "application/json", format!("{body}\n"))
}

/// `/livez`.
fn liveness(engines: &[Arc<Engine>]) -> Response<Full<Bytes>> {
    let mut stalled = Vec::new();
    let mut failed = Vec::new();
    for engine in engines {
        let figures = engine.figures();
        for p in figures.partitions.iter().filter(|p| p.stalled) {
            stalled.push(serde_json::json!({
                "group": figures.group,
                "topic": &*p.topic,
                "partition": p.partition,
                "waiting_seconds": p.oldest_unfinished.unwrap_or_default().as_secs_f64(),
                "stall_threshold_seconds": engine.config.stall_threshold.as_secs_f64(),
            }));
        }
        if let Some(failure) = engine.failure.get() {
            failed.push(serde_json::json!({ "group": figures.group, "error": failure }));
        }
    }
    let live = stalled.is_empty() && failed.is_empty();
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "live": live, "stalled": stalled, "failed": failed });
    reply(status, "application/json", format!("{body}\n"))
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

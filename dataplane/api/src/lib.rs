//! The gRPC API (`boxd.api.v1`, `proto/boxd/api/v1/api.proto`): the operations of the SSH
//! lobby for programs, a second thin front end over `boxd-operations`. Every call carries a
//! token (`authorization: Bearer <JWT>`), checked against the View (`auth.rs`); each call
//! parses its message, runs one operation and answers with a message or a status code
//! (`convert.rs`). `WatchVms` streams the account's VMs as the replica applies changes
//! (`watch.rs`); `Exec` runs a command in a VM through the relay to its guest agent
//! (`exec.rs`).
//!
//! It is served by every proxy's HTTPS shards for SNI `api.<zone>` with ALPN `h2`: the shard
//! terminates TLS as for any connection and hands the stream to [`Api::serve`], which runs
//! hyper's HTTP/2 server on the shard's own executor; each call runs tonic's routes on the
//! control plane's tokio runtime (operations wait on its timers and the replica). Server
//! reflection and the standard health service are on. See DESIGN.md.

mod auth;
mod convert;
mod exec;
mod service;
mod watch;

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxd_dataplane::https::{ApiIo, ApiServer};
use boxd_operations::Operations;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use tonic::service::Routes;

pub use auth::Auth;

/// The generated messages and service.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("boxd.api.v1");

    /// The file descriptor set of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/boxd_api_descriptor.bin"));
}

/// Most concurrent streams one client connection may have open.
const MAX_STREAMS: u32 = 128;

/// The API server of one node: one per process, shared by every shard.
pub struct Api {
    routes: Routes,
    ops: Arc<Operations>,
    rt: tokio::runtime::Handle,
}

impl Api {
    /// The API over `ops`; calls run on `rt` (the control plane's runtime); `agent_key` (the
    /// cluster's) reaches guest agents for `Exec`.
    pub fn new(
        ops: Arc<Operations>,
        rt: tokio::runtime::Handle,
        agent_key: russh::keys::PrivateKey,
    ) -> Result<Arc<Self>, String> {
        let svc = service::Service::new(Arc::clone(&ops), Arc::new(agent_key));
        let auth = Auth::new(Arc::clone(&ops));
        // Both versions of reflection: grpcurl and newer clients ask v1, grpcio's own
        // reflection client and older tools v1alpha.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| format!("gRPC reflection: {e}"))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| format!("gRPC reflection: {e}"))?;
        let (health, health_svc) = tonic_health::server::health_reporter();
        // Nothing else sets it: the API is served as long as the shard runs.
        drop(health.set_serving::<pb::boxd_server::BoxdServer<service::Service>>());
        let routes = Routes::new(pb::boxd_server::BoxdServer::with_interceptor(svc, auth))
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(health_svc)
            .prepare();
        Ok(Arc::new(Self { routes, ops, rt }))
    }
}

impl ApiServer for Api {
    fn serve(
        &self,
        io: Box<dyn ApiIo>,
        client: IpAddr,
        idle: Duration,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        let routes = self.routes.clone();
        let ops = Arc::clone(&self.ops);
        let rt = self.rt.clone();
        Box::pin(async move {
            let calls = Rc::new(Calls {
                open: Cell::new(0),
                idle_since: Cell::new(Instant::now()),
            });
            let counted = Rc::clone(&calls);
            let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let call = Call::start(&counted);
                let answer = answer(routes.clone(), Arc::clone(&ops), rt.clone(), req);
                async move {
                    let resp = answer.await?;
                    // The call lasts as long as its response body (a stream's).
                    Ok::<_, Infallible>(resp.map(|b| b.map_frame(move |f| call.keep(f))))
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(Local)
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            let mut conn = std::pin::pin!(conn);
            let ended = futures_lite::future::or(async { Some(conn.as_mut().await) }, async {
                calls.idle(idle).await;
                None
            })
            .await;
            let result = match ended {
                Some(r) => r,
                None => {
                    tracing::debug!(%client, "API connection idle: closing");
                    conn.as_mut().graceful_shutdown();
                    let bounded = glommio::timer::timeout(idle, async { Ok(conn.as_mut().await) });
                    bounded.await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%client, error = %e, "API connection ended");
            }
        })
    }
}

/// The calls in progress on one connection, for its idle bound.
struct Calls {
    open: Cell<usize>,
    idle_since: Cell<Instant>,
}

impl Calls {
    /// Resolves once no call has been in progress for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let wait = if self.open.get() == 0 {
                let since = self.idle_since.get().elapsed();
                if since >= limit {
                    return;
                }
                limit - since
            } else {
                limit
            };
            glommio::timer::sleep(wait).await;
        }
    }
}

/// One call in progress: counted from its request until its response body is dropped.
struct Call(Rc<Calls>);

impl Call {
    fn start(calls: &Rc<Calls>) -> Self {
        calls.open.set(calls.open.get() + 1);
        Self(Rc::clone(calls))
    }

    /// Passes a frame of the response through (the closure that calls this owns the call).
    fn keep<T>(&self, frame: T) -> T {
        frame
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.idle_since.set(Instant::now());
    }
}

/// gRPC calls go to tonic's routes, run on the control plane's runtime (the operations wait
/// on its timers and replica; tonic's reflection spawns tokio tasks); a plain GET of the key
/// set is answered here, so it is reachable over HTTP/2 as over HTTP/1.1. HTTP/2 framing and
/// TLS stay on the shard.
async fn answer(
    mut routes: Routes,
    ops: Arc<Operations>,
    rt: tokio::runtime::Handle,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let (status, kind, body) = if req.uri().path() == "/.well-known/jwks.json" {
            let keys = boxd_model::tokens::jwks(ops.view().current().token_keys());
            (200, "application/json", keys.to_string())
        } else {
            (
                404,
                "text/plain",
                "This is the boxd gRPC API (boxd.api.v1).\n".to_owned(),
            )
        };
        let body = http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut resp = http::Response::new(tonic::body::Body::new(body));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(kind),
        );
        return Ok(resp);
    }
    let call = rt.spawn(async move { tower::Service::call(&mut routes, req).await });
    match call.await {
        Ok(answer) => answer,
        Err(e) => {
            let stopping = format!("the node is stopping ({e}); try again");
            Ok(tonic::Status::unavailable(stopping).into_http())
        }
    }
}

/// Runs hyper's per-stream tasks on the shard's executor.
#[derive(Clone, Copy)]
struct Local;

impl<F> hyper::rt::Executor<F> for Local
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        glommio::spawn_local(fut).detach();
    }
}

//! The HTTP client the relying party talks to its provider with: HTTP/1.1 over TLS (rustls
//! on ring, the system's roots plus `ca_file`), one connection per request, no redirects
//! followed (openidconnect wants none), a deadline on the whole exchange and a cap on the
//! answer. Plain `http://` only for a loopback issuer (RFC 8252 8.3's exception). Written here
//! instead of taking reqwest: that would bring a second TLS stack (aws-lc) into the binary.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Largest answer read (a discovery document or key set is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Why a request to the provider failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

fn err(what: impl std::fmt::Display) -> HttpError {
    HttpError(what.to_string())
}

/// A client for one provider.
#[derive(Clone)]
pub struct HttpClient {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl HttpClient {
    /// A client trusting the system's roots and those in `ca_file` (PEM; empty path: none).
    pub fn new(ca_file: &Path, timeout: Duration) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if !ca_file.as_os_str().is_empty() {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
                .and_then(|i| i.collect())
                .map_err(|e| format!("identity.ca_file {}: {e}", ca_file.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "identity.ca_file {} has no certificate (PEM)",
                    ca_file.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("identity.ca_file {}: {e}", ca_file.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            timeout,
        })
    }

    /// Sends `req` and reads the whole answer.
    pub async fn send(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(req))
            .await
            .map_err(|_| err(format!("no answer within {:?}", self.timeout)))?
    }

    async fn exchange(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let uri = req.uri().clone();
        let host = uri.host().ok_or_else(|| err("URL without a host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if is_loopback(&host) => false,
            _ => return Err(err(format!("{uri}: only https URLs (http on loopback)"))),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| err(format!("cannot connect to {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (parts, body) = req.into_parts();
        let mut req = http::Request::from_parts(parts, Full::new(bytes::Bytes::from(body)));
        // HTTP/1.1 wants Host and an origin-form target.
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = target.parse().map_err(err)?;
        if tls {
            let name = ServerName::try_from(host.clone()).map_err(err)?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| err(format!("TLS with {host}: {e}")))?;
            round_trip(TokioIo::new(stream), req).await
        } else {
            round_trip(TokioIo::new(tcp), req).await
        }
    }
}

async fn round_trip<T>(
    io: TokioIo<T>,
    req: http::Request<Full<bytes::Bytes>>,
) -> Result<HttpResponse, HttpError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(err)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send.send_request(req).await.map_err(err)?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| err(format!("reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    Ok(http::Response::from_parts(parts, body))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl<'c> AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

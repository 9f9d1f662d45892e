//! The gateway's own client connection to the target, per session: plain or TLS (verifying
//! the real server: system roots plus the target's CA; an optional client certificate), HTTP/2
//! when ALPN (or `h2c`) says so, else HTTP/1.1. Reopened when the target closes it, or over TLS
//! when a request names another host (the server name must be the request's host).
//!
//! The connection's own future (hyper's dispatcher: writing requests, reading answers) runs in
//! the session's task, polled through [`Driver`] beside the client's connection, rather than in
//! a task of its own: a request and its answer then cross no task boundary.

use std::{
    collections::HashMap,
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, Waker},
};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{body::Tap, settings::HttpTarget};
use crate::{net::OrigDstAddr, proxy::session::UPSTREAM_CONNECT_TIMEOUT};

/// Where the system's trusted roots are (Debian's `ca-certificates`).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the target: {0}")]
    Connect(io::Error),
    #[error("the target did not accept within {}s", UPSTREAM_CONNECT_TIMEOUT.as_secs())]
    Timeout,
    #[error("TLS to the target: {0}")]
    Tls(String),
    #[error("the target's host {0:?} is not a TLS server name")]
    ServerName(String),
    #[error("HTTP to the target: {0}")]
    Http(#[from] hyper::Error),
    #[error("the target switched protocols to a stream the gateway cannot record: {0}")]
    Unrecordable(&'static str),
}

enum Sender {
    H1(http1::SendRequest<Tap>),
    H2(http2::SendRequest<Tap>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// A connection's own future: hyper's dispatcher for one connection to the target.
type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The futures of a session's connections to its target, polled by the session's own task
/// ([`Driver::poll_drive`], beside the client's connection) until each connection ends.
#[derive(Default)]
pub struct Driver {
    state: Mutex<DriverState>,
}

#[derive(Default)]
struct DriverState {
    conns: Vec<ConnFuture>,
    /// The session task's waker, told when a connection is added.
    waker: Option<Waker>,
}

impl Driver {
    fn add(&self, conn: ConnFuture) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.conns.push(conn);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Drives every open connection; never ready (the session ends it by dropping the driver,
    /// which closes them).
    pub fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Polled outside the lock: a connection's future polls the request body, which must
        // not find the driver held.
        let mut conns = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if !state
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            std::mem::take(&mut state.conns)
        };
        conns.retain_mut(|c| c.as_mut().poll(cx).is_pending());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.conns.is_empty() {
            state.conns = conns;
        } else {
            // Added while these were polled (adding woke the task): keep both.
            state.conns.append(&mut conns);
        }
        Poll::Pending
    }

    /// Runs until the session's task drops it: drives the connections.
    pub async fn run(&self) {
        std::future::poll_fn(|cx| self.poll_drive(cx)).await;
    }
}

/// TLS toward a target: offering HTTP/2 and HTTP/1.1, or HTTP/1.1 alone.
#[derive(Clone)]
pub struct TlsConfigs {
    pub(super) any: Arc<ClientConfig>,
    pub(super) h1: Arc<ClientConfig>,
}

/// One session's connection toward its target.
pub struct Upstream {
    destination: OrigDstAddr,
    /// TLS toward the target, when the scheme is `https`.
    tls: Option<TlsConfigs>,
    /// Whether ALPN offers the target HTTP/2: only when the client speaks it. An HTTP/1.1
    /// client's requests go to the target as HTTP/1.1, as nginx's proxy sends them; HTTP/2 for
    /// one request at a time costs more on both ends (frames, HPACK, window updates).
    offer_h2: bool,
    h2c: bool,
    /// The open connection and the host it was opened for.
    current: tokio::sync::Mutex<Option<(String, Sender)>>,
    /// The connections' futures, polled by the session's task.
    pub driver: Driver,
}

impl Upstream {
    pub fn new(destination: OrigDstAddr, tls: Option<TlsConfigs>, h2c: bool) -> Self {
        Self {
            destination,
            tls,
            offer_h2: true,
            h2c,
            current: tokio::sync::Mutex::new(None),
            driver: Driver::default(),
        }
    }

    /// Sends `req` (origin-form URI, Host set) to the target as the request for `host`: over
    /// HTTP/2 the URI takes the scheme and `authority` and Host goes.
    pub async fn send(
        &self,
        host: &str,
        authority: &str,
        mut req: Request<Tap>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut current = self.current.lock().await;
        let reusable = current
            .as_ref()
            .is_some_and(|(h, s)| !s.is_closed() && (self.tls.is_none() || h == host));
        // A kept connection the target has closed since shows it only when asked to be ready:
        // nothing was sent on it, so a new one is opened once.
        let mut fresh = !reusable;
        loop {
            if fresh {
                *current = None;
                let sender = self.connect(host).await?;
                *current = Some((host.to_string(), sender));
            }
            let Some((_, sender)) = current.as_mut() else {
                return Err(UpstreamError::Tls("no connection".into()));
            };
            let ready = match sender {
                Sender::H1(s) => s.ready().await,
                Sender::H2(s) => s.ready().await,
            };
            match ready {
                Ok(()) => break,
                Err(e) if fresh => return Err(e.into()),
                Err(_) => fresh = true,
            }
        }
        let Some((_, sender)) = current.as_mut() else {
            return Err(UpstreamError::Tls("no connection".into()));
        };
        match sender {
            Sender::H1(s) => {
                *req.version_mut() = hyper::Version::HTTP_11;
                let fut = s.send_request(req);
                drop(current);
                Ok(fut.await?)
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                drop(current);
                *req.version_mut() = hyper::Version::HTTP_2;
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", hyper::http::uri::PathAndQuery::as_str)
                    .to_string();
                *req.uri_mut() = format!("{scheme}://{authority}{pq}")
                    .parse()
                    .map_err(|_| UpstreamError::ServerName(authority.to_string()))?;
                req.headers_mut().remove(hyper::header::HOST);
                Ok(s.send_request(req).await?)
            }
        }
    }

    /// Offers HTTP/2 to the target (over TLS) only if `h2`: the client's own version.
    pub fn offer_h2(&mut self, h2: bool) {
        self.offer_h2 = h2;
    }

    async fn connect(&self, host: &str) -> Result<Sender, UpstreamError> {
        let tcp = tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect(self.destination.0),
        )
        .await
        .map_err(|_| UpstreamError::Timeout)?
        .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let Some(configs) = &self.tls else {
            return self.handshake(tcp, self.h2c).await;
        };
        let config = if self.offer_h2 {
            &configs.any
        } else {
            &configs.h1
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| UpstreamError::ServerName(host.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        let tls = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.handshake(tls, h2).await
    }

    /// Opens HTTP/2 or HTTP/1.1 on `io`; the connection's future goes to the driver.
    async fn handshake<S>(&self, io: S, h2: bool) -> Result<Sender, UpstreamError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            self.driver.add(Box::pin(async move {
                if let Err(e) = conn.await {
                    crate::conn_log::debug!(error = %e, "HTTP/2 connection to the target ended");
                }
            }));
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await?;
            self.driver.add(Box::pin(async move {
                if let Err(e) = conn.await {
                    crate::conn_log::debug!(error = %e, "HTTP/1.1 connection to the target ended");
                }
            }));
            Ok(Sender::H1(sender))
        }
    }
}

impl Upstream {
    /// Sends an upgrade request (`Connection: Upgrade`) for `host` on a new HTTP/1.1
    /// connection of its own (over TLS, ALPN offers only http/1.1), which becomes the upgraded
    /// stream when the target switches protocols.
    pub async fn send_upgrade(
        &self,
        host: &str,
        mut req: Request<Tap>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let tcp = tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect(self.destination.0),
        )
        .await
        .map_err(|_| UpstreamError::Timeout)?
        .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        *req.version_mut() = hyper::Version::HTTP_11;
        let Some(configs) = &self.tls else {
            return send_upgrade_on(tcp, req).await;
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| UpstreamError::ServerName(host.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&configs.h1));
        let tls = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        send_upgrade_on(tls, req).await
    }
}

async fn send_upgrade_on<S>(io: S, req: Request<Tap>) -> Result<Response<Incoming>, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            crate::conn_log::debug!(error = %e, "upgraded connection to the target ended");
        }
    });
    sender.ready().await?;
    Ok(sender.send_request(req).await?)
}

/// Client TLS configurations per target, built once (the system roots are read once). Each is
/// kept with the settings it was built from and served only for the same settings: after a
/// reload (`SIGHUP`) a session opened before it still asks with its target's old settings,
/// and a new one with the new, under the same name.
#[derive(Default)]
pub struct ClientConfigs {
    by_target: Mutex<HashMap<String, (HttpTarget, TlsConfigs)>>,
}

impl ClientConfigs {
    /// Forgets every cached configuration (a reload's targets are built again when used).
    pub fn clear(&self) {
        self.by_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The configurations for `target`: system roots, its CA, its client certificate; ALPN h2
    /// and http/1.1, or http/1.1 alone.
    pub fn get(&self, target: &str, settings: &HttpTarget) -> Result<TlsConfigs, String> {
        if let Some((built_for, c)) = self
            .by_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
        {
            if built_for == settings {
                return Ok(c.clone());
            }
        }
        let any = client_config(settings)?;
        let mut h1 = any.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let configs = TlsConfigs {
            any: Arc::new(any),
            h1: Arc::new(h1),
        };
        self.by_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(target.to_string(), (settings.clone(), configs.clone()));
        Ok(configs)
    }
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn client_config(settings: &HttpTarget) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    // The system roots where they exist (a bad one among them is skipped, as browsers do).
    if let Ok(certs) = pem_certs(Path::new(SYSTEM_ROOTS)) {
        roots.add_parsable_certificates(certs);
    }
    if let Some(ca) = &settings.ca {
        for cert in pem_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "no trusted roots: neither {SYSTEM_ROOTS} nor the target's ca"
        ));
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    let mut config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

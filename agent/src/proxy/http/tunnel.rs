//! Upgraded streams of a Kubernetes target: `exec`, `attach` and `portforward` (WebSocket, or
//! SPDY/3.1 for older clients), after the policy allowed the upgrade request like any other.
//!
//! The upgrade goes to the target on a connection of its own (HTTP/1.1: upgrades do not exist
//! in HTTP/2), with the held credential set. When the target switches protocols, the client is
//! told so with the target's answer, and the two upgraded streams are relayed byte for byte
//! until either side closes. WebSocket frames of the exec/attach channel protocol are read on
//! the side ([`crate::kube::channel`]): stdin is recorded as terminal input, stdout and stderr
//! as terminal output, so `sessions replay` and the asciicast export work as for SSH. Other
//! streams (port-forward, SPDY) are relayed and counted, not read.

use std::sync::Arc;

use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderValue},
    upgrade::OnUpgrade,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    time::Instant,
};

use super::{body::Tap, upstream::UpstreamError, ProxyBody, Session};
use crate::{
    kube::channel::{Channel, FrameTap, CHANNEL_PROTOCOLS},
    record::{EventKind, SessionId, SessionStore},
};

/// The upgrade a Kubernetes client asks for, if it is one the gateway relays.
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = headers.get(header::UPGRADE)?;
    let known = upgrade
        .to_str()
        .is_ok_and(|u| u.eq_ignore_ascii_case("websocket") || u.eq_ignore_ascii_case("SPDY/3.1"));
    (connection_upgrade && known).then(|| upgrade.clone())
}

/// Whether an allowed upgrade would open an exec or attach stream the gateway cannot record:
/// SPDY/3.1 (kubectl before 1.29-1.30) frames its channels in zlib-compressed SPDY, which is
/// not read. Such a stream is judged like any request and, when the policy lets it through,
/// refused (fail closed: an exec that is not recorded is not run); port-forward streams are
/// relayed and counted either way.
pub fn unrecordable(upgrade: &HeaderValue, action: &crate::kube::KubeAction<'_>) -> bool {
    upgrade.as_bytes().eq_ignore_ascii_case(b"SPDY/3.1")
        && action.resource == "pods"
        && matches!(action.subresource, Some("exec" | "attach"))
}

/// The upgrade request's record: its event, when it started, the secrets kept out of the record.
pub struct Exchange {
    pub request: u64,
    pub started: Instant,
    pub secrets: Arc<[String]>,
}

/// What became of an upgrade request sent to the target.
pub enum Opened {
    /// Switched: the client's answer (101); the relay runs in the session's tunnels.
    Switched(Response<ProxyBody>),
    /// The target answered without switching: handled as any answer.
    Answered(Response<Incoming>),
}

impl Session<'_, '_> {
    /// Sends the allowed upgrade request `up` to the target and, when it switches protocols,
    /// starts relaying between `client` (the client's side of the upgrade) and the target.
    pub(super) async fn open_tunnel(
        &self,
        host: &str,
        upgrade: HeaderValue,
        mut up: Request<Tap>,
        client: OnUpgrade,
        exchange: Exchange,
    ) -> Result<Opened, UpstreamError> {
        let Exchange {
            request,
            started,
            secrets,
        } = exchange;
        up.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        up.headers_mut().insert(header::UPGRADE, upgrade);
        let mut resp = self.upstream.send_upgrade(host, up).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Opened::Answered(resp));
        }
        let target = hyper::upgrade::on(&mut resp);
        let websocket = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        let channels = websocket
            && resp
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| CHANNEL_PROTOCOLS.contains(&p.trim()));
        let mut answer = Response::new(ProxyBody::full(String::new()));
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        // The target's handshake headers (accept key, subprotocol, stream version) go back
        // as they are: the client checks them.
        *answer.headers_mut() = resp.headers().clone();
        let store = Arc::clone(&self.conn.gw.store);
        let session = self.conn.session;
        let totals = Arc::clone(&self.totals);
        let task = tokio::spawn(async move {
            let (client, target) = match tokio::try_join!(client, target) {
                Ok(both) => both,
                Err(e) => {
                    finish(
                        &*store,
                        session,
                        request,
                        started,
                        Some(format!("upgrade: {e}")),
                    );
                    return;
                }
            };
            let recorder = Recorder {
                store: &*store,
                session,
                secrets: &secrets,
            };
            let (up, down) = relay(
                TokioIo::new(client),
                TokioIo::new(target),
                channels.then_some(&recorder),
            )
            .await;
            totals
                .up
                .fetch_add(up, std::sync::atomic::Ordering::Relaxed);
            totals
                .down
                .fetch_add(down, std::sync::atomic::Ordering::Relaxed);
            let summary = format!(
                "101 Switching Protocols, stream: {up} B up, {down} B down{}",
                if channels { "" } else { " (not read)" }
            );
            record(
                &*store,
                session,
                EventKind::Response {
                    request,
                    duration_us: micros(started),
                    summary: Some(summary),
                    error: None,
                    masked_rows: None,
                    mask_rules: Vec::new(),
                },
            );
        });
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
        Ok(Opened::Switched(answer))
    }
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn record(store: &dyn SessionStore, session: SessionId, kind: EventKind) {
    if let Err(e) = store.append(session, kind) {
        tracing::warn!(error = %e, "cannot record a Kubernetes stream event");
    }
}

fn finish(
    store: &dyn SessionStore,
    session: SessionId,
    request: u64,
    started: Instant,
    error: Option<String>,
) {
    record(
        store,
        session,
        EventKind::Response {
            request,
            duration_us: micros(started),
            summary: None,
            error,
            masked_rows: None,
            mask_rules: Vec::new(),
        },
    );
}

/// Writes the channel data of a stream as terminal events, held secrets blanked out.
struct Recorder<'a> {
    store: &'a dyn SessionStore,
    session: SessionId,
    secrets: &'a [String],
}

impl Recorder<'_> {
    fn terminal(&self, channel: Channel, data: &[u8]) {
        let mut text = String::from_utf8_lossy(data).into_owned();
        for s in self.secrets.iter().filter(|s| !s.is_empty()) {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "[held secret]");
            }
        }
        let kind = match channel {
            Channel::Stdin => EventKind::TerminalInput { data: text },
            Channel::Stdout | Channel::Stderr => EventKind::TerminalOutput { data: text },
            _ => return,
        };
        record(self.store, self.session, kind);
    }
}

/// The largest read relayed (and recorded) at once.
const CHUNK: usize = 16 * 1024;

/// Relays both ways until each side has closed; bytes client→target and target→client.
async fn relay<C, T>(client: C, target: T, recorder: Option<&Recorder<'_>>) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut target_r, mut target_w) = tokio::io::split(target);
    let up = pump(&mut client_r, &mut target_w, recorder);
    let down = pump(&mut target_r, &mut client_w, recorder);
    tokio::join!(up, down)
}

async fn pump<R, W>(from: &mut R, to: &mut W, recorder: Option<&Recorder<'_>>) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut tap = FrameTap::default();
    let mut pieces: Vec<(Channel, Vec<u8>)> = Vec::new();
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Recorded before it reaches the other side.
        if let Some(rec) = recorder {
            tap.feed(&buf[..n], &mut |c, d| match pieces.last_mut() {
                Some((last, data)) if *last == c => data.extend_from_slice(d),
                _ => pieces.push((c, d.to_vec())),
            });
            for (c, d) in pieces.drain(..) {
                rec.terminal(c, &d);
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = to.shutdown().await;
    total
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        identity::ProcessIdentity,
        net::{ClientAddr, OrigDstAddr},
        protocol::Protocol,
        record::{sled::SledStore, NewSession},
    };

    fn frame(channel: u8, data: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let payload: Vec<u8> = [&[channel][..], data].concat();
        let mut v = vec![0x82, u8::try_from(payload.len()).unwrap()];
        match mask {
            Some(k) => {
                v[1] |= 0x80;
                v.extend_from_slice(&k);
                v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => v.extend_from_slice(&payload),
        }
        v
    }

    /// Bytes pass both ways untouched; stdin, stdout and stderr are recorded as terminal
    /// events with the held secret blanked; the status channel is not.
    #[tokio::test]
    async fn relay_passes_bytes_untouched_and_records_the_channels() {
        let store = SledStore::temporary().unwrap();
        let session = store
            .open(NewSession {
                started_at_us: 1,
                client: ClientAddr("127.0.0.1:40000".parse().unwrap()),
                destination: OrigDstAddr("10.0.0.5:6443".parse().unwrap()),
                target: Some("prod-cluster".into()),
                protocol: Protocol::Kubernetes,
                identity: ProcessIdentity::default(),
            })
            .unwrap();
        let secrets: Arc<[String]> = vec!["s3cret-token".to_string()].into();
        let (client_gw, mut client) = duplex(64 * 1024);
        let (target_gw, mut target) = duplex(64 * 1024);
        let up = frame(0, b"ls\n", Some([9, 8, 7, 6]));
        let down = [
            frame(1, b"file-a\n", None),
            frame(2, b"token is s3cret-token\n", None),
            frame(3, b"{\"status\":\"Success\"}", None),
        ]
        .concat();
        let recorder = Recorder {
            store: &store,
            session,
            secrets: &secrets,
        };
        let peers = async {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            target.write_all(&down).await.unwrap();
            target.shutdown().await.unwrap();
            let mut at_target = Vec::new();
            target.read_to_end(&mut at_target).await.unwrap();
            let mut at_client = Vec::new();
            client.read_to_end(&mut at_client).await.unwrap();
            (at_target, at_client)
        };
        let ((sent_up, sent_down), (at_target, at_client)) =
            tokio::join!(relay(client_gw, target_gw, Some(&recorder)), peers);
        assert_eq!(at_target, up);
        assert_eq!(at_client, down);
        assert_eq!((sent_up, sent_down), (up.len() as u64, down.len() as u64));
        // The two directions are relayed concurrently: compare without their interleaving.
        let mut terminal: Vec<(&str, String)> = store
            .events(session)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::TerminalInput { data } => Some(("i", data)),
                EventKind::TerminalOutput { data } => Some(("o", data)),
                _ => None,
            })
            .collect();
        terminal.sort();
        assert_eq!(
            terminal,
            vec![
                ("i", "ls\n".to_string()),
                ("o", "file-a\n".to_string()),
                ("o", "token is [held secret]\n".to_string()),
            ]
        );
    }
}

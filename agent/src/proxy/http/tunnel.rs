//! Upgraded streams of a Kubernetes target: `exec`, `attach` and `portforward` (WebSocket, or
//! SPDY/3.1 for older clients), after the policy allowed the upgrade request like any other.
//!
//! The upgrade goes to the target on a connection of its own (HTTP/1.1: upgrades do not exist
//! in HTTP/2), with the held credential set. When the target switches protocols, the client is
//! told so with the target's answer, and the two upgraded streams are relayed byte for byte
//! until either side closes. WebSocket frames of the exec/attach channel protocol are read on
//! the side ([`crate::kube::channel`]): stdin is recorded as terminal input, stdout and stderr
//! as terminal output, so `sessions replay` and the asciicast export work as for SSH. Other
//! streams (port-forward) are relayed and counted, not read.
//!
//! An exec or attach is only relayed in a form the tap reads (fail closed): the client's
//! offered subprotocols are cut down to the binary channel protocols before the upgrade is
//! forwarded (none left: refused 403), no WebSocket extension is ever forwarded (compression
//! would hide the frames), a target answer that does not match is not relayed, and a frame the
//! tap cannot read ends the stream instead of passing unread.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

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

/// Whether `action` opens a terminal stream (exec or attach), whose data must be recorded.
pub fn is_terminal(action: &crate::kube::KubeAction<'_>) -> bool {
    action.resource == "pods" && matches!(action.subresource, Some("exec" | "attach"))
}

/// The subprotocols a WebSocket client offers, in its order (every header line, comma lists).
fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Why an allowed upgrade of a terminal stream (exec, attach) would open a stream the gateway
/// cannot record, if it would. Such a request is judged like any other and, when the policy
/// lets it through, refused (fail closed: an exec that is not recorded is not run):
/// - SPDY/3.1 (kubectl before 1.29-1.30) frames its channels in zlib-compressed SPDY;
/// - a WebSocket client that offers subprotocols but none the tap reads (only the
///   `base64.channel.k8s.io` ones: channel digits and base64 text).
///
/// A client that offers no subprotocol gets `channel.k8s.io` from the apiserver (read).
pub fn unrecordable(upgrade: &HeaderValue, headers: &HeaderMap) -> Option<&'static str> {
    if upgrade.as_bytes().eq_ignore_ascii_case(b"SPDY/3.1") {
        return Some(
            "an exec or attach over SPDY cannot be recorded, so it is not run; \
             use a kubectl that speaks WebSocket (1.30 or later)",
        );
    }
    let offered = offered_protocols(headers);
    let readable = offered.iter().any(|p| CHANNEL_PROTOCOLS.contains(p));
    (!offered.is_empty() && !readable).then_some(
        "an exec or attach is only run over a WebSocket subprotocol the gateway records \
         (v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io); \
         the base64.channel.k8s.io subprotocols are not",
    )
}

/// The upgrade request as forwarded: no WebSocket extension (permessage-deflate would hide the
/// frames from the tap), and for a terminal stream only the subprotocols the tap reads, in the
/// client's order, on one header line (the apiserver reads only the first).
fn restrict_handshake(headers: &mut HeaderMap, terminal: bool) {
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    if !terminal {
        return;
    }
    let readable: Vec<&str> = offered_protocols(headers)
        .into_iter()
        .filter(|p| CHANNEL_PROTOCOLS.contains(p))
        .collect();
    let line = (!readable.is_empty())
        .then(|| HeaderValue::from_str(&readable.join(", ")).ok())
        .flatten();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if let Some(line) = line {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, line);
    }
}

/// Why the target's 101 answer to a restricted handshake cannot be relayed, if it cannot: it
/// names an extension, or (terminal stream) a subprotocol the tap does not read.
fn unreadable_answer(answer: &HeaderMap, terminal: bool) -> Option<&'static str> {
    if answer.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Some("it names a WebSocket extension the gateway did not offer");
    }
    let chosen: Vec<&str> = answer
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .map(|v| v.to_str().map_or("\u{fffd}", str::trim))
        .collect();
    match chosen.as_slice() {
        _ if !terminal => None,
        [] => None,
        [one] if CHANNEL_PROTOCOLS.contains(one) => None,
        _ => Some("its subprotocol is not one the gateway records"),
    }
}

/// The upgrade request's record: its event, when it started, the secrets kept out of the
/// record, and whether it opens a terminal stream ([`is_terminal`]: read and recorded).
pub struct Exchange {
    pub request: u64,
    pub started: Instant,
    pub secrets: Arc<[String]>,
    pub terminal: bool,
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
            terminal,
        } = exchange;
        restrict_handshake(up.headers_mut(), terminal);
        up.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        up.headers_mut().insert(header::UPGRADE, upgrade);
        let mut resp = self.upstream.send_upgrade(host, up).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Opened::Answered(resp));
        }
        let websocket = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        // A terminal stream was only asked for over WebSocket (SPDY is refused before).
        if terminal && !websocket {
            return Err(UpstreamError::Unrecordable("it is not a WebSocket"));
        }
        if let Some(why) = unreadable_answer(resp.headers(), terminal) {
            return Err(UpstreamError::Unrecordable(why));
        }
        let target = hyper::upgrade::on(&mut resp);
        let channels = terminal;
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
            let (up, down, broken) = relay(
                TokioIo::new(client),
                TokioIo::new(target),
                channels.then_some(&recorder),
            )
            .await;
            totals.up.fetch_add(up, Ordering::Relaxed);
            totals.down.fetch_add(down, Ordering::Relaxed);
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
                    error: broken.map(|why| format!("stream ended by the gateway: {why}")),
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
        crate::conn_log::warn!(error = %e, "cannot record a Kubernetes stream event");
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

/// Relays both ways until each side has closed, or until the tap cannot read a direction
/// (then both end at once, the unread bytes not passed on); bytes client→target and
/// target→client, and why the stream was ended, if the gateway ended it.
async fn relay<C, T>(
    client: C,
    target: T,
    recorder: Option<&Recorder<'_>>,
) -> (u64, u64, Option<&'static str>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut target_r, mut target_w) = tokio::io::split(target);
    let (sent_up, sent_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = pump(&mut client_r, &mut target_w, recorder, &sent_up);
    let down = pump(&mut target_r, &mut client_w, recorder, &sent_down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut broken = None;
    while !(up_done && down_done) {
        let ended = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r }
            r = &mut down, if !down_done => { down_done = true; r }
        };
        if let Err(why) = ended {
            broken = Some(why);
            break;
        }
    }
    (
        sent_up.load(Ordering::Relaxed),
        sent_down.load(Ordering::Relaxed),
        broken,
    )
}

/// Copies `from` to `to`, counting into `total`; with a recorder, each read's channel data is
/// recorded before it is passed on, and a read the tap cannot follow is not passed on.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    recorder: Option<&Recorder<'_>>,
    total: &AtomicU64,
) -> Result<(), &'static str>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut tap = FrameTap::default();
    let mut pieces: Vec<(Channel, Vec<u8>)> = Vec::new();
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
            if let Some(why) = tap.lost() {
                return Err(why);
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    Ok(())
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

    /// A Kubernetes session in `store`, as the gateway opens one for an exec.
    fn exec_session(store: &SledStore) -> crate::record::SessionId {
        store
            .open(NewSession {
                started_at_us: 1,
                client: ClientAddr("127.0.0.1:40000".parse().unwrap()),
                destination: OrigDstAddr("10.0.0.5:6443".parse().unwrap()),
                target: Some("prod-cluster".into()),
                protocol: Protocol::Kubernetes,
                identity: ProcessIdentity::default(),
            })
            .unwrap()
    }

    /// Bytes pass both ways untouched; stdin, stdout and stderr are recorded as terminal
    /// events with the held secret blanked; the status channel is not.
    #[tokio::test]
    async fn relay_passes_bytes_untouched_and_records_the_channels() {
        let store = SledStore::temporary().unwrap();
        let session = exec_session(&store);
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
        let ((sent_up, sent_down, broken), (at_target, at_client)) =
            tokio::join!(relay(client_gw, target_gw, Some(&recorder)), peers);
        assert_eq!(broken, None);
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

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        h
    }

    #[test]
    fn only_readable_subprotocols_and_no_extension_are_forwarded() {
        let ws = HeaderValue::from_static("websocket");
        let base64_only = headers(&[
            ("sec-websocket-protocol", "v4.base64.channel.k8s.io"),
            ("sec-websocket-protocol", "base64.channel.k8s.io"),
        ]);
        assert!(unrecordable(&ws, &base64_only).is_some());
        assert!(unrecordable(&HeaderValue::from_static("SPDY/3.1"), &HeaderMap::new()).is_some());
        assert_eq!(
            unrecordable(&ws, &HeaderMap::new()),
            None,
            "none: channel.k8s.io"
        );

        let mut mixed = headers(&[
            (
                "sec-websocket-protocol",
                "v4.base64.channel.k8s.io, v5.channel.k8s.io",
            ),
            (
                "sec-websocket-protocol",
                "base64.channel.k8s.io,v4.channel.k8s.io",
            ),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
        ]);
        assert_eq!(unrecordable(&ws, &mixed), None);
        restrict_handshake(&mut mixed, true);
        assert_eq!(
            mixed
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .collect::<Vec<_>>(),
            vec!["v5.channel.k8s.io, v4.channel.k8s.io"]
        );
        assert!(!mixed.contains_key(header::SEC_WEBSOCKET_EXTENSIONS));

        // Port-forward keeps its subprotocols; no stream gets an extension.
        let mut forward = headers(&[
            (
                "sec-websocket-protocol",
                "v4.channel.k8s.io, portforward.k8s.io",
            ),
            ("sec-websocket-extensions", "permessage-deflate"),
        ]);
        restrict_handshake(&mut forward, false);
        assert_eq!(
            forward[header::SEC_WEBSOCKET_PROTOCOL],
            "v4.channel.k8s.io, portforward.k8s.io"
        );
        assert!(!forward.contains_key(header::SEC_WEBSOCKET_EXTENSIONS));
    }

    #[test]
    fn a_target_answer_the_tap_cannot_read_is_not_relayed() {
        let ok = headers(&[("sec-websocket-protocol", "v5.channel.k8s.io")]);
        assert_eq!(unreadable_answer(&ok, true), None);
        assert_eq!(unreadable_answer(&HeaderMap::new(), true), None);
        for bad in [
            headers(&[("sec-websocket-protocol", "v4.base64.channel.k8s.io")]),
            headers(&[(
                "sec-websocket-protocol",
                "v5.channel.k8s.io, v4.channel.k8s.io",
            )]),
            headers(&[
                ("sec-websocket-protocol", "v5.channel.k8s.io"),
                ("sec-websocket-protocol", "v4.channel.k8s.io"),
            ]),
            headers(&[
                ("sec-websocket-protocol", "v5.channel.k8s.io"),
                ("sec-websocket-extensions", "permessage-deflate"),
            ]),
        ] {
            assert!(unreadable_answer(&bad, true).is_some(), "{bad:?}");
        }
        let deflate = headers(&[("sec-websocket-extensions", "permessage-deflate")]);
        assert!(unreadable_answer(&deflate, false).is_some());
        let forward = headers(&[("sec-websocket-protocol", "portforward.k8s.io")]);
        assert_eq!(unreadable_answer(&forward, false), None);
    }

    /// A compressed frame (RSV1) ends the stream both ways: it and what follows never reach
    /// the target, and the relay says why.
    #[tokio::test]
    async fn a_frame_the_tap_cannot_read_ends_the_relay() {
        let store = SledStore::temporary().unwrap();
        let session = exec_session(&store);
        let recorder = Recorder {
            store: &store,
            session,
            secrets: &[],
        };
        let (client_gw, mut client) = duplex(64 * 1024);
        let (target_gw, mut target) = duplex(64 * 1024);
        let first = frame(0, b"id\n", Some([1, 2, 3, 4]));
        let mut compressed = frame(0, b"\xf2\xc9\x57\xe0\x02\x00", Some([1, 2, 3, 4]));
        compressed[0] |= 0x40;
        let peers = async {
            client.write_all(&first).await.unwrap();
            // The first frame is through before the compressed one is sent.
            let mut got = vec![0u8; first.len()];
            target.read_exact(&mut got).await.unwrap();
            client.write_all(&compressed).await.unwrap();
            client
                .write_all(&frame(0, b"after\n", Some([1, 2, 3, 4])))
                .await
                .unwrap();
            // The target side stays open: only the gateway can end this.
            let mut rest = Vec::new();
            target.read_to_end(&mut rest).await.unwrap();
            let mut at_client = Vec::new();
            client.read_to_end(&mut at_client).await.unwrap();
            (got, rest, at_client)
        };
        let ((sent_up, _, broken), (got, rest, at_client)) =
            tokio::join!(relay(client_gw, target_gw, Some(&recorder)), peers);
        assert_eq!(got, first);
        assert_eq!(rest, Vec::<u8>::new(), "nothing after the compressed frame");
        assert_eq!(at_client, Vec::<u8>::new());
        assert_eq!(sent_up, first.len() as u64);
        assert!(
            broken.is_some_and(|why| why.contains("reserved bits")),
            "{broken:?}"
        );
    }
}

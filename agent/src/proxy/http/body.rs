//! Bodies pass through frame by frame, never buffered whole: [`Tap`] counts what crosses and
//! keeps a bounded prefix of the bodies of state-changing requests for the record; the
//! response's tap writes the exchange's `response` event when its body ends (or is dropped).

use std::{
    fmt::Write as _,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::record::{EventKind, SessionId, SessionStore};

/// How much of each body of a state-changing request (and of its response) is recorded.
pub const RECORDED_BODY: usize = 2048;

/// Bytes both ways over the whole session.
#[derive(Debug, Default)]
pub struct Totals {
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Responses whose bodies are still on their way to the client.
    pub streaming: AtomicU64,
}

/// One exchange's counts and recorded prefixes, shared by its request and response taps.
#[derive(Debug, Default)]
pub struct Meter {
    up: AtomicU64,
    down: AtomicU64,
    /// Prefixes of the request and response bodies, when they are recorded.
    kept: Option<Mutex<(Vec<u8>, Vec<u8>)>>,
}

impl Meter {
    pub fn new(keep_bodies: bool) -> Arc<Self> {
        Arc::new(Self {
            kept: keep_bodies.then(Mutex::default),
            ..Self::default()
        })
    }

    fn add(&self, up: bool, data: &[u8]) {
        let n = data.len() as u64;
        if up {
            self.up.fetch_add(n, Ordering::Relaxed);
        } else {
            self.down.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(kept) = &self.kept {
            let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
            let buf = if up { &mut kept.0 } else { &mut kept.1 };
            let room = RECORDED_BODY.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..room.min(data.len())]);
        }
    }

    /// `200 OK, 12 B up, 345 B down` and the recorded bodies, if any, with every held secret
    /// in `secrets` blanked out (a target may echo the header it got).
    pub fn summary(&self, status: hyper::StatusCode, secrets: &[String]) -> String {
        let up = self.up.load(Ordering::Relaxed);
        let down = self.down.load(Ordering::Relaxed);
        // `200 OK, 12 B up, 345 B down`, without `format!` (one of them per request).
        let mut numbers = itoa::Buffer::new();
        let mut s = String::with_capacity(64);
        s.push_str(status.as_str());
        s.push(' ');
        s.push_str(status.canonical_reason().unwrap_or(""));
        s.push_str(", ");
        s.push_str(numbers.format(up));
        s.push_str(" B up, ");
        s.push_str(numbers.format(down));
        s.push_str(" B down");
        if let Some(kept) = &self.kept {
            let kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
            for (label, body, total) in [("request", &kept.0, up), ("response", &kept.1, down)] {
                if body.is_empty() {
                    continue;
                }
                let _ = write!(s, "; {label} body");
                if total > body.len() as u64 {
                    let _ = write!(s, " (first {} of {total} B)", body.len());
                }
                let _ = write!(s, ": {}", redact(&String::from_utf8_lossy(body), secrets));
            }
        }
        s
    }
}

/// `text` with each non-empty secret replaced.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), "[held credential]");
        }
    }
    text
}

/// Writes the exchange's `response` event once, when the response body is done.
pub struct Finish {
    pub store: Arc<dyn SessionStore>,
    pub session: SessionId,
    /// The request event's id.
    pub request: u64,
    pub started: Instant,
    pub status: hyper::StatusCode,
    pub meter: Arc<Meter>,
    /// The held secrets of the session, never recorded.
    pub secrets: Arc<[String]>,
}

impl Finish {
    pub fn record(self, error: Option<String>) {
        let event = EventKind::Response {
            request: self.request,
            duration_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            summary: Some(self.meter.summary(self.status, &self.secrets)),
            error,
            masked_rows: None,
            mask_rules: Vec::new(),
        };
        // Written into the request event while that still waits to be written.
        if let Err(e) = self.store.complete(self.session, event) {
            crate::conn_log::warn!(error = %e, "cannot record an HTTP response");
        }
    }
}

/// A body streamed through, counted (and partly kept) as it goes.
pub struct Tap {
    inner: Incoming,
    up: bool,
    meter: Arc<Meter>,
    totals: Arc<Totals>,
    finish: Option<Finish>,
}

impl Tap {
    /// The client's request body on its way to the target.
    pub fn request(inner: Incoming, meter: Arc<Meter>, totals: Arc<Totals>) -> Self {
        Self {
            inner,
            up: true,
            meter,
            totals,
            finish: None,
        }
    }

    /// The target's response body on its way to the client; `finish` records the exchange.
    pub fn response(inner: Incoming, totals: Arc<Totals>, finish: Finish) -> Self {
        totals.streaming.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            up: false,
            meter: Arc::clone(&finish.meter),
            totals,
            finish: Some(finish),
        }
    }

    fn done(&mut self, error: Option<String>) {
        if let Some(f) = self.finish.take() {
            f.record(error);
            self.totals.streaming.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.meter.add(this.up, data);
                    let total = if this.up {
                        &this.totals.up
                    } else {
                        &this.totals.down
                    };
                    total.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.done(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                this.done(Some(e));
            }
            Poll::Ready(None) => this.done(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.finish.is_some() {
            // An empty body is dropped unpolled; anything else was cut short.
            let error = (!self.inner.is_end_stream())
                .then(|| "the response was not delivered to the end".to_string());
            self.done(error);
        }
    }
}

/// What the client gets: the target's body streamed, or the gateway's own answer.
pub enum ProxyBody {
    Stream(Tap),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Stream(tap) => Pin::new(tap).poll_frame(cx),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(tap) => tap.is_end_stream(),
            ProxyBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(tap) => tap.size_hint(),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_keeps_bounded_bodies_only_when_asked() {
        let m = Meter::new(true);
        m.add(true, b"{\"name\":\"x\"}");
        m.add(false, &vec![b'a'; RECORDED_BODY + 10]);
        let s = m.summary(hyper::StatusCode::CREATED, &[]);
        assert!(s.starts_with("201 Created, 12 B up, 2058 B down"), "{s}");
        assert!(s.contains("request body: {\"name\":\"x\"}"), "{s}");
        assert!(
            s.contains(&format!("response body (first {RECORDED_BODY} of 2058 B)")),
            "{s}"
        );
        let m = Meter::new(false);
        m.add(true, b"secret-ish payload");
        assert_eq!(
            m.summary(hyper::StatusCode::OK, &[]),
            "200 OK, 18 B up, 0 B down"
        );
        let m = Meter::new(true);
        m.add(false, b"authorization: Bearer s3cr3t\n");
        let s = m.summary(hyper::StatusCode::OK, &["s3cr3t".into(), String::new()]);
        assert!(
            s.ends_with("authorization: Bearer [held credential]\n"),
            "{s}"
        );
    }
}

//! Log events in their connection's context, without a span per connection until one is
//! needed.
//!
//! Every connection's events are in an `info` span, `conn` (pid, comm, dst, target, session),
//! so a log line or journal entry says whose connection it is about. Made when the connection
//! is accepted, that span cost 6-8 us of CPU per connection (tracing-subscriber formats its
//! fields at once, docs/BENCHMARKS.md) for events that are rare; and `Instrument` would enter
//! it on every poll of the connection's task, a registry push and pop and two filter lookups,
//! about 0.35 us per PostgreSQL statement. Here a connection carries its fields
//! ([`ConnFields`]), the task's poll only notes whose they are ([`InConn`], a thread-local),
//! and the gateway's log macros (this module's `debug!`, `info!`, `warn!` and `error!`, used in
//! place of tracing's) make the span from them at the connection's first event that is on, and
//! enter it around that event alone.
//!
//! Events from other crates (hyper, russh, rustls) during a connection's poll are logged
//! without the connection's fields, as are events outside any connection.

use std::{
    cell::{Cell, OnceCell},
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tracing::{span::Id, Span};

use crate::net::OrigDstAddr;

thread_local! {
    /// The fields of the connection whose task this thread is polling, for the length of the
    /// poll ([`InConn::poll`]); null outside one.
    static CURRENT: Cell<*const ConnFields> = const { Cell::new(std::ptr::null()) };
}

/// What a connection's `conn` span says, and the span once an event has needed it.
#[derive(Debug)]
pub struct ConnFields {
    pub pid: u32,
    pub comm: String,
    pub dst: OrigDstAddr,
    pub target: String,
    /// The session's id, once it is open ([`record_session`]).
    session: Cell<Option<u64>>,
    span: OnceCell<Span>,
}

impl ConnFields {
    pub fn new(pid: u32, comm: String, dst: OrigDstAddr, target: String) -> Self {
        Self {
            pid,
            comm,
            dst,
            target,
            session: Cell::new(None),
            span: OnceCell::new(),
        }
    }

    /// The connection's span, made at the first call.
    fn span(&self) -> &Span {
        self.span.get_or_init(|| {
            // A root span, as if made when the connection was accepted, whatever is entered at
            // its first event.
            let span = tracing::info_span!(
                parent: None,
                "conn",
                pid = self.pid,
                comm = %self.comm,
                dst = %self.dst,
                target = %self.target,
                session = tracing::field::Empty,
            );
            if let Some(id) = self.session.get() {
                span.record("session", id);
            }
            span
        })
    }
}

pin_project_lite::pin_project! {
    /// `inner`, polled with `fields` as its connection's log context.
    pub struct InConn<F> {
        #[pin]
        inner: F,
        fields: ConnFields,
    }
}

/// `inner` with `fields` as its connection's log context: events logged by this module's
/// macros while it is polled are in its span.
pub fn in_conn<F: Future>(inner: F, fields: ConnFields) -> InConn<F> {
    InConn { inner, fields }
}

impl<F: Future> Future for InConn<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _current = Current::set(std::ptr::from_ref(&*this.fields));
        this.inner.poll(cx)
    }
}

/// Restores the thread's previous connection when dropped (on a panic too).
struct Current(*const ConnFields);

impl Current {
    fn set(fields: *const ConnFields) -> Self {
        Self(CURRENT.replace(fields))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.set(self.0);
    }
}

/// Runs `f` on the fields of the connection being polled, if any.
fn with_current<R>(f: impl FnOnce(&ConnFields) -> R) -> Option<R> {
    let fields = CURRENT.get();
    // SAFETY: `CURRENT` is non-null only within `InConn::poll`, which set it to the fields of
    // the `InConn` it borrows and restores it before returning; `f` runs within that poll.
    unsafe { fields.as_ref() }.map(f)
}

/// Notes the session id of the connection being polled, for its span.
pub fn record_session(id: u64) {
    with_current(|fields| {
        fields.session.set(Some(id));
        if let Some(span) = fields.span.get() {
            span.record("session", id);
        }
    });
}

/// The current connection's span, entered until dropped (nothing if no connection is being
/// polled, or its span is off).
pub struct Entered(Option<Id>);

/// Enters the current connection's span (made now if this is its first event), for one event.
pub fn enter() -> Entered {
    let id = with_current(|fields| fields.span().id()).flatten();
    if let Some(id) = &id {
        tracing::dispatcher::get_default(|d| d.enter(id));
    }
    Entered(id)
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(id) = &self.0 {
            tracing::dispatcher::get_default(|d| d.exit(id));
        }
    }
}

/// An event at `$level` in the current connection's span.
///
/// The span is made only if the current subscriber takes an event at this level from the
/// calling module: `level_enabled!` alone is the highest level any subscriber takes (every
/// thread's, and every target's), so a `debug!` filtered out by `bulkhead=info` would still
/// make the span. `enabled!` asks the current dispatcher, through a callsite whose interest
/// is cached, so an event that is off costs what tracing's own macros cost.
macro_rules! conn_event {
    ($level:expr, $($arg:tt)+) => {
        if tracing::level_enabled!($level) && tracing::enabled!($level) {
            let _entered = $crate::conn_log::enter();
            tracing::event!($level, $($arg)+);
        }
    };
}

/// tracing's `debug!`, in the current connection's span.
macro_rules! conn_debug {
    ($($arg:tt)+) => { $crate::conn_log::conn_event!(tracing::Level::DEBUG, $($arg)+) };
}

/// tracing's `info!`, in the current connection's span.
macro_rules! conn_info {
    ($($arg:tt)+) => { $crate::conn_log::conn_event!(tracing::Level::INFO, $($arg)+) };
}

/// tracing's `warn!`, in the current connection's span.
macro_rules! conn_warn {
    ($($arg:tt)+) => { $crate::conn_log::conn_event!(tracing::Level::WARN, $($arg)+) };
}

/// tracing's `error!`, in the current connection's span.
macro_rules! conn_error {
    ($($arg:tt)+) => { $crate::conn_log::conn_event!(tracing::Level::ERROR, $($arg)+) };
}

// Under tracing's names, so a file switches by its `use` line (`warn` itself cannot be
// re-exported bare: it is also a built-in attribute).
pub(crate) use {
    conn_debug as debug, conn_error as error, conn_event, conn_info as info, conn_warn as warn,
};

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use tracing::{
        field::{Field, Visit},
        span::Attributes,
        Subscriber,
    };
    use tracing_subscriber::{
        layer::{Context as LayerContext, SubscriberExt as _},
        registry::LookupSpan,
        Layer,
    };

    use super::*;

    /// Each event's message and the names of the spans it was in; each span made, with its
    /// fields as recorded so far.
    #[derive(Clone, Default)]
    struct Seen {
        events: Log,
        spans: Log,
    }

    /// Names (an event's message, a span's name), each with its list.
    type Log = Arc<Mutex<Vec<(String, Vec<String>)>>>;

    #[derive(Default)]
    struct Fields {
        message: String,
        all: Vec<String>,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.message = format!("{value:?}");
            } else {
                self.all.push(format!("{}={value:?}", field.name()));
            }
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Seen {
        fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: LayerContext<'_, S>) {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            let name = attrs.metadata().name().to_string();
            self.spans.lock().unwrap().push((name, fields.all));
        }

        fn on_record(&self, _: &Id, values: &tracing::span::Record<'_>, _: LayerContext<'_, S>) {
            let mut fields = Fields::default();
            values.record(&mut fields);
            if let Some(last) = self.spans.lock().unwrap().last_mut() {
                last.1.extend(fields.all);
            }
        }

        fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            let spans = ctx
                .event_scope(event)
                .map(|scope| scope.map(|s| s.name().to_string()).collect())
                .unwrap_or_default();
            self.events.lock().unwrap().push((fields.message, spans));
        }
    }

    fn fields() -> ConnFields {
        let dst: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        ConnFields::new(4242, "psql".into(), OrigDstAddr(dst), "db".into())
    }

    fn poll_once<F: Future>(task: F) -> Poll<F::Output> {
        let mut task = std::pin::pin!(task);
        task.as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn events_are_in_the_polled_connection_span_and_only_there() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            let outside = tracing::info_span!("other");
            let _outside = outside.enter();
            let polled = poll_once(in_conn(
                async {
                    record_session(7);
                    warn!("inside");
                    warn!("again");
                    // The task's poll itself enters nothing.
                    assert_eq!(
                        Span::current().metadata().map(tracing::Metadata::name),
                        Some("other")
                    );
                },
                fields(),
            ));
            assert!(polled.is_ready());
            warn!("after");
        });
        let events: HashMap<String, Vec<String>> =
            seen.events.lock().unwrap().iter().cloned().collect();
        assert_eq!(
            events["inside"],
            ["conn"],
            "a root span, not under what was entered"
        );
        assert_eq!(events["again"], ["conn"]);
        assert_eq!(events["after"], ["other"]);
        let spans = seen.spans.lock().unwrap();
        let conn: Vec<_> = spans.iter().filter(|(name, _)| name == "conn").collect();
        assert_eq!(conn.len(), 1, "one span for the connection's events");
        assert_eq!(
            conn[0].1,
            [
                "pid=4242",
                "comm=psql",
                "dst=10.0.0.5:5432",
                "target=db",
                "session=7"
            ]
        );
    }

    /// A connection that logs nothing makes no span; one whose session opens after its first
    /// event has the session in its span from then on.
    #[test]
    fn a_span_is_made_only_for_a_connection_that_logs() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(seen.clone())
            .with(tracing_subscriber::filter::LevelFilter::INFO);
        tracing::subscriber::with_default(subscriber, || {
            let quiet = poll_once(in_conn(
                async {
                    record_session(1);
                    debug!("off at info");
                },
                fields(),
            ));
            assert!(quiet.is_ready());
            assert!(seen.spans.lock().unwrap().is_empty());
            let early = poll_once(in_conn(
                async {
                    info!("before the session");
                    record_session(2);
                },
                fields(),
            ));
            assert!(early.is_ready());
        });
        let spans = seen.spans.lock().unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].1.last().map(String::as_str), Some("session=2"));
    }
}

//! Log events in their connection's context, without entering a span on every poll.
//!
//! Every connection has an `info` span, `conn` (pid, comm, dst, target, session), so a log
//! line or journal entry says whose connection it is about. `Instrument` would enter that span
//! on every poll of the connection's task: a registry push and pop and two filter lookups,
//! about 0.35 us of user CPU per PostgreSQL statement (two polls each; measured by turning the
//! span off, docs/BENCHMARKS.md), for events that are rare. Here the task's poll only notes
//! which span is its own ([`InConn`], a thread-local), and the gateway's log macros (this
//! module's `debug!`, `info!`, `warn!` and `error!`, used in place of tracing's) enter it around
//! the event alone, and only when the event's level is on.
//!
//! Events from other crates (hyper, russh, rustls) during a connection's poll are logged
//! without the connection's fields, as are events outside any connection.

use std::{
    cell::Cell,
    future::Future,
    num::NonZeroU64,
    pin::Pin,
    task::{Context, Poll},
};

use tracing::{span::Id, Span};

thread_local! {
    /// The span of the connection whose task this thread is polling.
    static CURRENT: Cell<Option<NonZeroU64>> = const { Cell::new(None) };
}

pin_project_lite::pin_project! {
    /// `inner`, polled with `span` as its connection's log context.
    pub struct InConn<F> {
        #[pin]
        inner: F,
        // Kept alive (and so its id valid) while `inner` runs.
        span: Span,
        id: Option<NonZeroU64>,
    }
}

/// `inner` with `span` as its connection's log context: events logged by this module's macros
/// while it is polled are in `span`.
pub fn in_conn<F: Future>(inner: F, span: Span) -> InConn<F> {
    let id = span.id().map(|id| id.into_non_zero_u64());
    InConn { inner, span, id }
}

impl<F: Future> Future for InConn<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _current = Current::set(*this.id);
        this.inner.poll(cx)
    }
}

/// Restores the thread's previous connection when dropped (on a panic too).
struct Current(Option<NonZeroU64>);

impl Current {
    fn set(id: Option<NonZeroU64>) -> Self {
        Self(CURRENT.replace(id))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.set(self.0);
    }
}

/// The current connection's span, entered until dropped (nothing if no connection is being
/// polled, or its span is off).
pub struct Entered(Option<Id>);

/// Enters the current connection's span, for one event.
pub fn enter() -> Entered {
    let id = CURRENT.get().map(Id::from_non_zero_u64);
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
macro_rules! conn_event {
    ($level:expr, $($arg:tt)+) => {
        if tracing::level_enabled!($level) {
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
        sync::{Arc, Mutex},
    };

    use tracing::{
        field::{Field, Visit},
        Subscriber,
    };
    use tracing_subscriber::{
        layer::{Context as LayerContext, SubscriberExt as _},
        registry::LookupSpan,
        Layer,
    };

    use super::*;

    /// Each event's message and the names of the spans it was in.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(String, Vec<String>)>>>);

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Seen {
        fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
            let mut message = Message(String::new());
            event.record(&mut message);
            let spans = ctx
                .event_scope(event)
                .map(|scope| scope.map(|s| s.name().to_string()).collect())
                .unwrap_or_default();
            self.0.lock().unwrap().push((message.0, spans));
        }
    }

    #[test]
    fn events_are_in_the_polled_connection_span_and_only_there() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn");
            let outside = tracing::info_span!("other");
            let _outside = outside.enter();
            let mut task = std::pin::pin!(in_conn(
                async {
                    warn!("inside");
                    // The task's poll itself enters nothing.
                    assert_eq!(Span::current().metadata().map(|m| m.name()), Some("other"));
                },
                span,
            ));
            let waker = std::task::Waker::noop();
            assert!(task
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready());
            warn!("after");
        });
        let seen: HashMap<String, Vec<String>> = seen.0.lock().unwrap().iter().cloned().collect();
        assert_eq!(seen["inside"], ["conn"]);
        assert_eq!(seen["after"], ["other"]);
    }
}

//! hyper's header-read deadline kept by the session's own timer.
//!
//! hyper's HTTP/1.1 server takes a fresh sleep from its [`Timer`] for every request head it
//! waits for and drops it once the head is read. With tokio's timer that is a boxed timer
//! entry registered in the runtime's wheel and removed again on every request. Here the sleep
//! hyper gets is only a deadline in the session's [`HeadClock`]; one tokio sleep per session,
//! polled in its own lane ([`super::lanes`]), stands behind all of them. It is armed at the
//! earliest deadline it knows of and, when it fires, either expires the deadline hyper waits on
//! or re-arms at the later one that replaced it. Deadlines only move forward (each is "now +
//! the timeout" when hyper starts reading a head), so a new deadline usually finds the timer
//! armed earlier and costs nothing but a store. A head that has not arrived by its deadline
//! makes hyper close the connection, exactly as with tokio's timer.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use hyper::rt::{Sleep, Timer};

/// The deadline hyper waits on, shared by its sleeps and the session's timer lane.
#[derive(Default)]
pub struct HeadClock {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Which of hyper's sleeps is current: each new one supersedes the one before.
    generation: u64,
    /// The current sleep's deadline, while hyper holds it.
    deadline: Option<Instant>,
    /// The current deadline has passed.
    expired: bool,
    /// hyper's task, waiting on the current sleep.
    waiter: Option<Waker>,
    /// The deadline the timer lane's tokio sleep is armed at, if it is.
    armed_at: Option<Instant>,
    /// The timer lane's waker, to have it arm for a deadline earlier than it knows of.
    lane: Option<Waker>,
}

impl HeadClock {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The timer to give hyper.
    pub fn timer(self: &Arc<Self>) -> HeadTimer {
        HeadTimer(Arc::clone(self))
    }

    /// The timer lane: polls `sleep` (the session's one tokio sleep) and keeps it armed at the
    /// deadline hyper waits on. Never ready: an expired deadline is hyper's to act on.
    pub fn poll_lane(&self, sleep: Pin<&mut tokio::time::Sleep>, cx: &mut Context<'_>) {
        let mut sleep = sleep;
        let mut state = self.state();
        if !state.lane.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.lane = Some(cx.waker().clone());
        }
        loop {
            if let Some(armed_at) = state.armed_at {
                if sleep.as_mut().poll(cx).is_pending() {
                    return;
                }
                state.armed_at = None;
                // Fired: a deadline no later than the one it was armed at has passed.
                if state.deadline.is_some_and(|d| d <= armed_at) && !state.expired {
                    state.expired = true;
                    if let Some(w) = state.waiter.take() {
                        w.wake();
                    }
                }
            }
            match state.deadline {
                Some(d) if !state.expired => {
                    state.armed_at = Some(d);
                    sleep.as_mut().reset(tokio::time::Instant::from_std(d));
                    // Polled at the top of the loop: registers it (or finds it passed).
                }
                _ => return,
            }
        }
    }
}

/// hyper's [`Timer`] for a session's HTTP/1.1 connection.
pub struct HeadTimer(Arc<HeadClock>);

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// The runtime's clock, the one the lane's sleep runs on.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let mut state = self.0.state();
        state.generation += 1;
        state.deadline = Some(deadline);
        state.expired = false;
        state.waiter = None;
        // Armed no later than this deadline: it will come round to it. Otherwise (not armed,
        // or armed later) the lane arms for it.
        if !state.armed_at.is_some_and(|a| a <= deadline) {
            state.armed_at = None;
            if let Some(lane) = &state.lane {
                lane.wake_by_ref();
            }
        }
        Box::pin(HeadSleep {
            clock: Arc::clone(&self.0),
            generation: state.generation,
        })
    }
}

/// One of hyper's sleeps: ready once its deadline has passed.
struct HeadSleep {
    clock: Arc<HeadClock>,
    generation: u64,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.clock.state();
        if state.generation != self.generation {
            // Superseded: hyper keeps only its newest sleep, so nobody waits on this one.
            return Poll::Pending;
        }
        if state.expired {
            return Poll::Ready(());
        }
        if !state
            .waiter
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        let mut state = self.clock.state();
        if state.generation == self.generation {
            state.deadline = None;
            state.expired = false;
            state.waiter = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls the lane once with its own waker; the lane's wake-ups counted in `lane`.
    fn poll_lane(clock: &HeadClock, sleep: Pin<&mut tokio::time::Sleep>, lane: &Arc<Count>) {
        let waker = Waker::from(Arc::clone(lane));
        clock.poll_lane(sleep, &mut Context::from_waker(&waker));
    }

    fn poll_sleep(s: &mut Pin<Box<dyn Sleep>>, hyper: &Arc<Count>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(hyper));
        s.as_mut().poll(&mut Context::from_waker(&waker))
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_read_by_its_deadline_expires_and_a_read_one_never_does() {
        let clock = Arc::new(HeadClock::default());
        let timer = clock.timer();
        let lane = Arc::new(Count::default());
        let hyper = Arc::new(Count::default());
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        poll_lane(&clock, sleep.as_mut(), &lane);
        // Not armed yet: the first deadline wakes the lane, which arms for it.
        let mut first = timer.sleep(Duration::from_secs(10));
        assert_eq!(lane.0.load(Ordering::SeqCst), 1);
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert!(poll_sleep(&mut first, &hyper).is_pending());
        // The head arrives after 4 s: hyper drops its sleep. The next head's deadline is later
        // than the one armed: no wake-up of the lane.
        tokio::time::advance(Duration::from_secs(4)).await;
        drop(first);
        let mut second = timer.sleep(Duration::from_secs(10));
        assert_eq!(lane.0.load(Ordering::SeqCst), 1);
        assert!(poll_sleep(&mut second, &hyper).is_pending());
        // At 10 s the lane fires for the first deadline and re-arms for the second (14 s):
        // hyper is not woken.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(lane.0.load(Ordering::SeqCst), 2, "the timer woke the lane");
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert_eq!(hyper.0.load(Ordering::SeqCst), 0);
        assert!(poll_sleep(&mut second, &hyper).is_pending());
        // Just before 14 s nothing; at 14 s the second head's deadline expires.
        tokio::time::advance(Duration::from_millis(3990)).await;
        assert_eq!(lane.0.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(lane.0.load(Ordering::SeqCst), 3);
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert_eq!(hyper.0.load(Ordering::SeqCst), 1, "hyper woken");
        assert!(poll_sleep(&mut second, &hyper).is_ready());
        // A superseded sleep never fires, and dropping it leaves the newer one alone.
        let mut third = timer.sleep(Duration::from_secs(10));
        let mut fourth = timer.sleep(Duration::from_secs(10));
        assert!(poll_sleep(&mut third, &hyper).is_pending());
        drop(third);
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert!(poll_sleep(&mut fourth, &hyper).is_pending());
        tokio::time::advance(Duration::from_secs(10)).await;
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert!(poll_sleep(&mut fourth, &hyper).is_ready());
        // No deadline held: the lane fires once and stays unarmed.
        drop(fourth);
        let before = lane.0.load(Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(60)).await;
        poll_lane(&clock, sleep.as_mut(), &lane);
        assert!(lane.0.load(Ordering::SeqCst) <= before + 1);
    }
}

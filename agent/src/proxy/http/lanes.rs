//! A connection's futures polled in its one task, each only when its own waker fired.
//!
//! An HTTP/1.1 session polls hyper's server connection (the client's side) and the gateway's
//! connection to the target ([`super::upstream::Driver`]) in the same task. They hand each
//! request and its answer to each other through hyper's channels, and each hand-over wakes the
//! other. With the task's own waker, every such wake-up while the task runs re-queues the task
//! in the runtime and polls everything again (the span entered, every future and timer polled).
//! Here each future gets a waker of its own ([`Lanes`]): a wake-up during the task's own poll
//! only marks that future, which is polled in the same poll; one from outside (a socket turning
//! readable, a timer) marks it and wakes the task. A future is polled only when marked.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering::SeqCst},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;

/// Passes over the marked futures in one poll before the task yields to the runtime: a future
/// that keeps waking itself (tokio's cooperative budget makes resources do that) must not keep
/// the thread.
const MAX_PASSES: usize = 16;

/// What the futures' wakers share with the task polling them.
struct Marks {
    /// A bit per future: woken since it was last polled.
    woken: AtomicU32,
    /// The task is inside [`Lanes::poll`]: a wake-up then needs no wake-up of the task.
    polling: AtomicBool,
    /// The task's own waker, for wake-ups from outside its poll.
    task: AtomicWaker,
}

/// One future's waker.
struct Lane {
    marks: Arc<Marks>,
    bit: u32,
}

impl Wake for Lane {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The mark first, then the check: `Lanes::poll` clears `polling` before its last look at
        // the marks, so either it sees this mark or this sees `polling` cleared (or both).
        self.marks.woken.fetch_or(self.bit, SeqCst);
        if !self.marks.polling.load(SeqCst) {
            self.marks.task.wake();
        }
    }
}

/// Up to 32 futures polled by one task, each with its own waker.
pub struct Lanes {
    marks: Arc<Marks>,
    wakers: Vec<Waker>,
}

impl Lanes {
    /// `n` lanes (at most 32), all marked: the first poll polls each.
    pub fn new(n: usize) -> Self {
        assert!(n <= 32, "at most 32 lanes");
        let all = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
        let marks = Arc::new(Marks {
            woken: AtomicU32::new(all),
            polling: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let wakers = (0..n)
            .map(|i| {
                Waker::from(Arc::new(Lane {
                    marks: Arc::clone(&marks),
                    bit: 1 << i,
                }))
            })
            .collect();
        Self { marks, wakers }
    }

    /// Polls, in lane order, each lane marked as woken with its own waker (`poll_lane(lane,
    /// cx)`), until one is ready or none is marked. A lane woken by another during this poll is
    /// polled in it too.
    pub fn poll<R>(
        &self,
        cx: &mut Context<'_>,
        mut poll_lane: impl FnMut(usize, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.marks.task.register(cx.waker());
        self.marks.polling.store(true, SeqCst);
        for _ in 0..MAX_PASSES {
            let mut polled = false;
            for (i, waker) in self.wakers.iter().enumerate() {
                let bit = 1u32 << i;
                if self.marks.woken.fetch_and(!bit, SeqCst) & bit == 0 {
                    continue;
                }
                polled = true;
                if let Poll::Ready(r) = poll_lane(i, &mut Context::from_waker(waker)) {
                    self.marks.polling.store(false, SeqCst);
                    return Poll::Ready(r);
                }
            }
            if !polled {
                self.marks.polling.store(false, SeqCst);
                if self.marks.woken.load(SeqCst) == 0 {
                    return Poll::Pending;
                }
                // Woken from outside between the pass and now: go on.
                self.marks.polling.store(true, SeqCst);
            }
        }
        // Still marked after as many passes: yield, and come back.
        self.marks.polling.store(false, SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future as _,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_woken_lanes_are_polled_and_a_wake_inside_the_poll_does_not_wake_the_task() {
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let lanes = Lanes::new(3);
        let mut polls = [0usize; 3];
        let mut saved: Vec<Option<Waker>> = vec![None, None, None];
        // The first poll polls every lane once.
        let r: Poll<()> = lanes.poll(&mut cx, |i, lcx| {
            polls[i] += 1;
            saved[i] = Some(lcx.waker().clone());
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polls, [1, 1, 1]);
        // Lane 0 woken from outside: the task is woken.
        saved[0].clone().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        // Polled, lane 0 wakes lane 2: both run in this poll, lane 1 does not, and the task is
        // not woken again.
        let third = saved[2].clone().unwrap();
        let r: Poll<()> = lanes.poll(&mut cx, |i, _| {
            polls[i] += 1;
            if i == 0 {
                third.wake_by_ref();
            }
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polls, [2, 1, 2]);
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "no wake-up of the task");
        // Nothing marked: nothing polled.
        let r: Poll<()> = lanes.poll(&mut cx, |i, _| {
            polls[i] += 1;
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polls, [2, 1, 2]);
    }

    #[test]
    fn a_lane_that_keeps_waking_itself_yields_to_the_runtime() {
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let lanes = Lanes::new(1);
        let mut polls = 0;
        let r: Poll<()> = lanes.poll(&mut cx, |_, lcx| {
            polls += 1;
            lcx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(polls, MAX_PASSES);
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the task is woken to come back"
        );
        // And it does come back to the same lane.
        let r = lanes.poll(&mut cx, |_, _| Poll::Ready(7));
        assert_eq!(r, Poll::Ready(7));
    }

    #[test]
    fn a_ready_lane_ends_the_poll() {
        let waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&waker);
        let lanes = Lanes::new(2);
        let mut sleep = Box::pin(std::future::ready(5));
        let r = lanes.poll(&mut cx, |i, lcx| {
            if i == 1 {
                sleep.as_mut().poll(lcx)
            } else {
                Poll::Pending
            }
        });
        assert_eq!(r, Poll::Ready(5));
    }
}

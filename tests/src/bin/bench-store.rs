//! Session store benchmark: `sessions list` (newest 50) on a store of 100k sessions against the
//! same query on a store of 1k sessions, measured in the same run; plus reopen time. Both legs
//! of each line do the same work; `--until` matches only the oldest sessions, where a newest-
//! first scan cannot stop early.
//! Run with `cargo xtask bench` or `cargo run --release -p bulkhead-tests --bin bench-store`.
//! `BENCH_STORE_ONLY=append` prints only what recording costs per event ([`append_cost`]).

use std::time::{Duration, Instant};

use bulkhead::{
    identity::ProcessIdentity,
    net::{ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{
        EventKind, ListFilter, NewSession, Outcome, RecordedVerdict, SessionEnd, SessionStore as _,
        SledStore,
    },
};

const BIG: u32 = 100_000;
const SMALL: u32 = 1_000;
const RUNS: usize = 21;
/// Microseconds between sessions' starts: a store spread over time, as a daemon's is.
const SPACING_US: u64 = 10_000;

/// The `i`th session of a filled store, started at `at_us`.
fn new_session(i: u32, at_us: u64) -> NewSession {
    NewSession {
        started_at_us: at_us,
        client: ClientAddr("127.0.0.1:40000".parse().unwrap()),
        destination: OrigDstAddr("10.0.0.5:5432".parse().unwrap()),
        target: Some(if i.is_multiple_of(2) { "db" } else { "api" }.into()),
        protocol: Protocol::Tcp,
        identity: ProcessIdentity {
            pid: i,
            uid: i % 7,
            comm: "psql".into(),
            exe: Some("/usr/bin/psql".into()),
            cmdline: vec!["psql".into(), "-h".into(), "db".into()],
            ..ProcessIdentity::default()
        },
    }
}

fn fill(store: &SledStore, n: u32) {
    for i in 0..n {
        let id = store
            .open(new_session(i, u64::from(i) * SPACING_US))
            .unwrap();
        if i % 10 == 0 {
            store
                .append(
                    id,
                    EventKind::Request {
                        text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                        class: Some("read".into()),
                        verdict: RecordedVerdict::Allow,
                        rules: vec!["read-only".into()].into(),
                        observed: false,
                        duration_us: Some(40),
                        summary: Some("SELECT 1".into()),
                        error: None,
                    },
                )
                .unwrap();
        }
        store
            .close(
                id,
                SessionEnd {
                    ended_at_us: u64::from(i) * SPACING_US + 10,
                    bytes_to_target: 100,
                    bytes_from_target: 1000,
                    outcome: Outcome::Closed,
                },
            )
            .unwrap();
    }
    store.flush().unwrap();
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[RUNS / 2].as_secs_f64() * 1e3
}

fn main() {
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-store-{}", std::process::id()));
    if std::env::var("BENCH_STORE_ONLY").as_deref() == Ok("append") {
        append_cost(&dir.join("append"));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let (big, small) = (dir.join("big"), dir.join("small"));
    let start = Instant::now();
    fill(&SledStore::open(&big).unwrap(), BIG);
    println!(
        "filled {BIG} sessions in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    fill(&SledStore::open(&small).unwrap(), SMALL);

    let s = Instant::now();
    let big_store = SledStore::open(&big).unwrap();
    let reopen = s.elapsed();
    let small_store = SledStore::open(&small).unwrap();
    let stats = big_store.stats().unwrap();
    println!(
        "reopened {} sessions / {} events in {:.0} ms",
        stats.sessions,
        stats.events,
        reopen.as_secs_f64() * 1e3
    );

    let all = ListFilter::default();
    let by_target = ListFilter {
        target: Some("api".into()),
        ..ListFilter::default()
    };
    let by_uid = ListFilter {
        uid: Some(3),
        ..ListFilter::default()
    };
    // The oldest 500 sessions of each store.
    let only_old = ListFilter {
        until_us: Some(499 * SPACING_US),
        ..ListFilter::default()
    };
    println!();
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "list newest 50", "1k sessions", "100k", "ratio"
    );
    for (name, f) in [
        ("no filter", &all),
        ("--target api", &by_target),
        ("--uid 3", &by_uid),
        ("--until (only the oldest 500)", &only_old),
    ] {
        let a = median_ms(|| assert_eq!(small_store.list(f, 50).unwrap().len(), 50));
        let b = median_ms(|| assert_eq!(big_store.list(f, 50).unwrap().len(), 50));
        println!(
            "{name:<32} {a:>9.3} ms {b:>9.3} ms {:>7.2}x   (target < 50 ms)",
            b / a
        );
    }
    let a = median_ms(|| drop(small_store.stats().unwrap()));
    let b = median_ms(|| drop(big_store.stats().unwrap()));
    println!(
        "{:<32} {a:>9.3} ms {b:>9.3} ms {:>7.2}x",
        "status (store stats)",
        b / a
    );
    // The newest session with events in each store (every tenth has a request), found
    // outside the timed part.
    let with_events = |store: &SledStore| {
        store
            .list(&all, 20)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .find(|&id| store.events(id).unwrap().len() > 2)
            .expect("a session with a request")
    };
    let (small_newest, big_newest) = (with_events(&small_store), with_events(&big_store));
    let a = median_ms(|| assert_eq!(small_store.events(small_newest).unwrap().len(), 3));
    let b = median_ms(|| assert_eq!(big_store.events(big_newest).unwrap().len(), 3));
    println!(
        "{:<32} {a:>9.3} ms {b:>9.3} ms {:>7.2}x",
        "events of one session",
        b / a
    );
    drop((big_store, small_store));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Statement/result pairs appended per round of [`append_cost`].
const PAIRS: u64 = 100_000;

/// What recording costs per event, as the PostgreSQL gateway records pgbench's simple mode:
/// a request (its own statement text each) and a response per statement, over 8 sessions.
/// CPU of the appending thread and of the store's writer thread (which encodes, compresses and
/// inserts), per event; 5 rounds, each on a fresh store, medians.
#[expect(
    clippy::cast_precision_loss,
    reason = "nanosecond and event counts far below 2^52"
)]
fn append_cost(dir: &std::path::Path) {
    let (mut appending, mut writing) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let path = dir.join(round.to_string());
        let store = SledStore::open(&path).unwrap();
        let sessions: Vec<_> = (0..8u32)
            .map(|i| store.open(new_session(i, 0)).unwrap())
            .collect();
        let writer_before = thread_cpu_ns("store-writer");
        let before = own_cpu_ns();
        for i in 0..PAIRS {
            let s = sessions[usize::try_from(i % 8).expect("below 8")];
            let text = format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                (i * 7919) % 1_000_000
            );
            let request = store
                .append(
                    s,
                    EventKind::request(
                        &text,
                        Some("read".into()),
                        RecordedVerdict::Allow,
                        vec!["read-only".to_string()],
                    ),
                )
                .unwrap();
            store
                .append(
                    s,
                    EventKind::Response {
                        request,
                        duration_us: 180,
                        summary: Some("SELECT 1".into()),
                        error: None,
                        masked_rows: None,
                        mask_rules: Vec::new(),
                    },
                )
                .unwrap();
        }
        let appended = own_cpu_ns() - before;
        store.flush().unwrap();
        let written = thread_cpu_ns("store-writer") - writer_before;
        let events = (2 * PAIRS) as f64;
        appending.push(appended as f64 / events);
        writing.push(written as f64 / events);
        drop(store);
        let _ = std::fs::remove_dir_all(&path);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "recording {} statement/result pairs over 8 sessions (median of 5 rounds): appending thread {:.0} ns, store writer {:.0} ns CPU per event",
        PAIRS,
        median(appending),
        median(writing)
    );
}

/// CPU time of this thread, in nanoseconds.
fn own_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, std::ptr::addr_of_mut!(t)) };
    let whole = |v: i64| u64::try_from(v).unwrap_or(0);
    whole(t.tv_sec) * 1_000_000_000 + whole(t.tv_nsec)
}

/// CPU time of this process's thread named `name`, in nanoseconds (0 when there is none).
fn thread_cpu_ns(name: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

//! Policy decisions per second: parse + classify + evaluate, with and without the
//! classification cache. Prints figures, asserts nothing: `cargo bench -p bulkhead --bench policy`.
//!
//! The policy is the whole `policies/` directory (every example together), the target the
//! one with an approval rule, so each decision runs every rule's matchers.

use std::{
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant},
};

use bulkhead::{
    identity::{Ancestor, ProcessIdentity},
    policy::{load_dir, Action, PolicySet, Request, TargetRef},
    protocol::Protocol,
};

const PGBENCH: &[&str] = &[
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
    "END;",
];

const LONGER: &[&str] = &[
    "WITH recent AS (SELECT o.id, o.customer_id, o.total, o.created_at FROM sales.orders o \
     WHERE o.created_at > now() - interval '7 days' AND o.status IN ('paid', 'shipped')), \
     totals AS (SELECT customer_id, sum(total) AS spent, count(*) AS n FROM recent GROUP BY customer_id) \
     SELECT c.id, c.name, lower(c.email), t.spent, t.n, rank() OVER (ORDER BY t.spent DESC) \
     FROM public.customers c JOIN totals t ON t.customer_id = c.id \
     WHERE t.spent > 100 ORDER BY t.spent DESC LIMIT 50",
    "SELECT p.id, p.title, coalesce(array_agg(t.name ORDER BY t.name), '{}') AS tags \
     FROM blog.posts p LEFT JOIN blog.post_tags pt ON pt.post_id = p.id \
     LEFT JOIN blog.tags t ON t.id = pt.tag_id WHERE p.published AND p.author_id = $1 \
     GROUP BY p.id, p.title HAVING count(t.id) >= 1 ORDER BY p.id DESC LIMIT 20 OFFSET $2",
    "INSERT INTO audit.events (actor, action, target, payload, created_at) \
     SELECT $1, 'export', o.id::text, row_to_json(o)::jsonb, now() FROM sales.orders o \
     WHERE o.id = ANY($2) ON CONFLICT (actor, action, target) DO UPDATE SET payload = excluded.payload",
    "BEGIN; UPDATE inventory.stock SET qty = qty - $1 WHERE sku = $2 AND qty >= $1; \
     INSERT INTO inventory.moves (sku, delta, reason) VALUES ($2, -$1, 'sale'); COMMIT;",
];

fn identity() -> ProcessIdentity {
    ProcessIdentity {
        pid: 4242,
        tid: 4242,
        uid: 1000,
        gid: 1000,
        user: Some("alice".into()),
        comm: "pgbench".into(),
        exe: Some("/usr/bin/pgbench".into()),
        cmdline: vec!["pgbench".into()],
        cgroup_id: 1,
        cgroup: Some("/bulkhead.governed".into()),
        unit: None,
        ancestors: vec![Ancestor {
            pid: 4100,
            comm: "claude".into(),
            exe: Some("/opt/claude/bin/claude".into()),
            governed: true,
        }],
    }
}

/// Runs `statements` round-robin for about `budget`; returns (decisions, elapsed).
fn run(
    set: &PolicySet,
    id: &ProcessIdentity,
    statements: &[&str],
    budget: Duration,
) -> (u64, Duration) {
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < budget {
        for text in statements {
            let req = Request {
                target: TargetRef {
                    name: "orders-db",
                    protocol: Protocol::Postgres,
                },
                identity: id,
                action: Action::Sql {
                    text,
                    prepared: None,
                },
            };
            black_box(set.evaluate(black_box(&req)));
            n += 1;
        }
    }
    (n, start.elapsed())
}

fn report(label: &str, (n, elapsed): (u64, Duration)) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_sec = n as f64 / elapsed.as_secs_f64();
    let us = 1e6 / per_sec;
    println!(
        "{label:<38} {per_sec:>12.0} decisions/s  {us:>8.2} us/decision  ({n} in {elapsed:.2?})"
    );
    us
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = match load_dir(&dir) {
        Ok(s) => s,
        Err(e) => {
            for err in e {
                eprintln!("{err}");
            }
            std::process::exit(1);
        }
    };
    let uncached = set.clone().without_cache();
    let id = identity();
    let budget = Duration::from_secs(2);
    println!(
        "policy: {} rules from {} files; each figure is parse + classify + evaluate, {budget:?} per row",
        set.rules.len(),
        set.files.len()
    );
    // Warm up code paths and the cache.
    run(&set, &id, PGBENCH, Duration::from_millis(200));
    run(&set, &id, LONGER, Duration::from_millis(200));

    for text in PGBENCH {
        let short: String = text.chars().take(34).collect();
        report(
            &format!("  uncached: {short}"),
            run(&uncached, &id, &[*text], budget / 4),
        );
    }
    let pg_uncached = report(
        "pgbench statements, uncached",
        run(&uncached, &id, PGBENCH, budget),
    );
    let pg_cached = report(
        "pgbench statements, cached",
        run(&set, &id, PGBENCH, budget),
    );
    let long_uncached = report(
        "longer statements, uncached",
        run(&uncached, &id, LONGER, budget),
    );
    let long_cached = report("longer statements, cached", run(&set, &id, LONGER, budget));
    println!(
        "cache speed-up: pgbench {:.1}x, longer {:.1}x; target <= 10 us per typical statement uncached: {}",
        pg_uncached / pg_cached,
        long_uncached / long_cached,
        if pg_uncached <= 10.0 { "met" } else { "NOT met" }
    );
}

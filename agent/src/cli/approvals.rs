//! `bulkhead approvals list | approve | deny | watch | grants | revoke`.
//!
//! Unlike `sessions`, these have no offline fallback: a held request is a client waiting on one
//! of the daemon's sockets, so with the daemon stopped nothing is pending and nothing can be
//! decided; the commands say so. (Past decisions are in the record: `sessions show`.)

use std::{io::Write as _, time::Duration};

use clap::Subcommand;
use serde::de::DeserializeOwned;

use super::{follow, format_time, print_json, CliError, Flow, JsonFlag};
use crate::{
    approval::{ApprovalIdentity, Decision, GrantInfo, Notice, PendingApproval},
    config::Config,
    control::{self, ClientError, Request, Response},
    record::now_micros,
};

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests waiting for a decision, oldest first, with their age and expiry
    List(JsonFlag),
    /// Approve a waiting request; with --for, also approve requests like it for a while
    Approve {
        /// The request's approval id (`approvals list` shows them)
        id: u64,
        /// Why; recorded with the decision
        #[arg(long)]
        reason: Option<String>,
        /// Open a grant window this long (15m, 2h, at most 24h): further requests from the same
        /// uid and executable to the same target under the same rule are approved without
        /// asking until it ends
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_window)]
        window: Option<Duration>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Deny a waiting request; its client is told, with the reason
    Deny {
        /// The request's approval id (`approvals list` shows them)
        id: u64,
        /// Why; recorded and shown to the client
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// A waiting request in full: its whole text (control characters escaped), what the
    /// gateway found it does (classes, relations, functions), who asked and under which rule
    Show {
        /// The request's approval id (`approvals list` shows them)
        id: u64,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Follow requests as they start waiting, and their decisions
    Watch(JsonFlag),
    /// Open grant windows
    Grants(JsonFlag),
    /// End a grant window now
    Revoke {
        /// The grant's id (the id of the approval that opened it)
        id: u64,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// A grant window's length: a humantime duration of whole seconds, at least one.
fn parse_window(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 15m or 2h: {e}"))?;
    if d.as_secs() == 0 {
        return Err("a grant window must be at least 1s".into());
    }
    Ok(Duration::from_secs(d.as_secs()))
}

pub fn run(config: &Config, command: ApprovalsCommand) -> Result<(), CliError> {
    match command {
        ApprovalsCommand::List(json) => list(config, json.json),
        ApprovalsCommand::Approve {
            id,
            reason,
            window,
            json,
        } => {
            let req = Request::ApprovalsApprove {
                id,
                reason,
                for_secs: window.map(|w| w.as_secs()),
            };
            decide(config, &req, json.json)
        }
        ApprovalsCommand::Deny { id, reason, json } => {
            decide(config, &Request::ApprovalsDeny { id, reason }, json.json)
        }
        ApprovalsCommand::Show { id, json } => show(config, id, json.json),
        ApprovalsCommand::Watch(json) => watch(config, json.json),
        ApprovalsCommand::Grants(json) => grants(config, json.json),
        ApprovalsCommand::Revoke { id, json } => revoke(config, id, json.json),
    }
}

/// Why a stopped daemon means there is nothing to do.
fn not_running(path: &std::path::Path, stale: bool) -> CliError {
    CliError::Other(format!(
        "the daemon is not running ({}): approvals are held by the daemon, so none are \
         pending and none can be decided; start it with `bulkhead daemon` (past decisions are \
         in `bulkhead sessions show`)",
        control::socket_absence(path, stale)
    ))
}

fn ask<T: DeserializeOwned>(config: &Config, req: &Request) -> Result<T, CliError> {
    match control::call(&config.control_socket(), &config.daemon.admin_group, req) {
        Ok(v) => serde_json::from_value(v)
            .map_err(|e| CliError::Other(format!("unexpected answer from the daemon: {e}"))),
        Err(ClientError::NotRunning { path, stale }) => Err(not_running(&path, stale)),
        Err(e) => Err(e.into()),
    }
}

/// `1h05m`, `4m12s`, `42s`: short enough for a table column.
fn short(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The executable's file name, else the comm.
fn process(who: &ApprovalIdentity) -> &str {
    who.exe
        .as_deref()
        .and_then(|e| e.rsplit('/').next())
        .filter(|e| !e.is_empty())
        .unwrap_or(&who.comm)
}

/// One line of at most `max` characters, escaped for the terminal.
fn one_line(text: &str, max: usize) -> String {
    let text = crate::text::terminal_safe(text);
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn list(config: &Config, json: bool) -> Result<(), CliError> {
    let pending: Vec<PendingApproval> = ask(config, &Request::ApprovalsList)?;
    if json {
        return print_json(&pending);
    }
    if pending.is_empty() {
        println!("(no approvals pending)");
        return Ok(());
    }
    println!(
        "{:>10}  {:<20}  {:>7}  {:>7}  {:>8}  {:>5}  {:<12}  {:<15}  {:<14}  {:<18}  REQUEST",
        "ID", "REQUESTED", "AGE", "EXPIRES", "SESSION", "UID", "USER", "PROCESS", "TARGET", "RULE"
    );
    for p in &pending {
        println!(
            "{:>10}  {:<20}  {:>7}  {:>7}  {:>8}  {:>5}  {:<12}  {:<15}  {:<14}  {:<18}  {}",
            p.id,
            format_time(p.requested_at_us),
            short(p.age_ms),
            short(p.expires_in_ms),
            p.session,
            p.identity.uid,
            p.identity.user.as_deref().unwrap_or("-"),
            process(&p.identity),
            p.target,
            p.rule,
            one_line(&p.text, 60),
        );
    }
    println!("(`bulkhead approvals show ID` shows a request in full)");
    Ok(())
}

fn show(config: &Config, id: u64, json: bool) -> Result<(), CliError> {
    let pending: Vec<PendingApproval> = ask(config, &Request::ApprovalsList)?;
    let Some(p) = pending.into_iter().find(|p| p.id == id) else {
        return Err(CliError::Other(format!(
            "no request {id} is waiting (decided, expired, or never held): `bulkhead approvals \
             list` shows the waiting ones"
        )));
    };
    if json {
        return print_json(&p);
    }
    print!("{}", show_text(&p));
    Ok(())
}

/// The `approvals show` text of a waiting request.
fn show_text(p: &PendingApproval) -> String {
    use std::fmt::Write as _;
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            crate::text::terminal_safe(&v.join(", "))
        }
    };
    let mut out = format!(
        "approval {}  ({})\nrequested:  {} (waiting {}), expires {} (in {})\n",
        p.id,
        about(p),
        format_time(p.requested_at_us),
        short(p.age_ms),
        format_time(p.expires_at_us),
        short(p.expires_in_ms)
    );
    if !p.what.classes.is_empty() {
        let _ = writeln!(out, "classes:    {}", list(&p.what.classes));
        let _ = writeln!(out, "relations:  {}", list(&p.what.objects));
        let _ = writeln!(out, "functions:  {}", list(&p.what.functions));
    }
    if !p.what.params.is_empty() {
        let shown: Vec<String> = p
            .what
            .params
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Some(v) => format!("${} = '{}'", i + 1, crate::text::terminal_safe(v)),
                None => format!("${} = NULL", i + 1),
            })
            .collect();
        let _ = writeln!(out, "parameters: {}", shown.join(", "));
    }
    for reason in &p.what.unknown {
        let _ = writeln!(out, "unknown:    {}", crate::text::terminal_safe(reason));
    }
    let _ = writeln!(
        out,
        "request ({} bytes):\n{}",
        p.text.len(),
        crate::text::terminal_safe(&p.text)
    );
    out
}

/// "session 5, uid 1000 (alice) python3 → orders-db, rule deletes"
fn about(p: &PendingApproval) -> String {
    format!(
        "session {}, uid {}{} {} → {}, rule {}",
        p.session,
        p.identity.uid,
        p.identity
            .user
            .as_deref()
            .map(|u| format!(" ({u})"))
            .unwrap_or_default(),
        process(&p.identity),
        p.target,
        p.rule
    )
}

fn decide(config: &Config, req: &Request, json: bool) -> Result<(), CliError> {
    let d: Decision = ask(config, req)?;
    if json {
        return print_json(&d);
    }
    println!(
        "{} {} ({}){}",
        d.state,
        d.approval.id,
        about(&d.approval),
        d.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    println!("  request: {}", one_line(&d.approval.text, 200));
    if d.approval.text.chars().count() > 200 {
        println!(
            "  (cut here; the whole text is in the record: bulkhead sessions show {})",
            d.approval.session
        );
    }
    if let Some(g) = &d.grant {
        println!(
            "  grant {}: the same uid, executable, target and rule are approved without asking \
             until {} ({}); end it with `bulkhead approvals revoke {}`",
            g.id,
            format_time(g.until_us),
            short(g.remaining_ms),
            g.id
        );
    }
    if let Some(note) = &d.note {
        println!("  note: {note}");
    }
    Ok(())
}

fn grants(config: &Config, json: bool) -> Result<(), CliError> {
    let grants: Vec<GrantInfo> = ask(config, &Request::ApprovalsGrants)?;
    if json {
        return print_json(&grants);
    }
    if grants.is_empty() {
        println!("(no grant windows open)");
        return Ok(());
    }
    println!(
        "{:>10}  {:>7}  {:<20}  {:>5}  {:<15}  {:<14}  {:<18}  {:>4}  {:<16}  REASON",
        "ID", "LEFT", "UNTIL", "UID", "PROCESS", "TARGET", "RULE", "USES", "BY"
    );
    for g in &grants {
        println!(
            "{:>10}  {:>7}  {:<20}  {:>5}  {:<15}  {:<14}  {:<18}  {:>4}  {:<16}  {}",
            g.id,
            short(g.remaining_ms),
            format_time(g.until_us),
            g.identity.uid,
            process(&g.identity),
            g.target,
            g.rule,
            g.uses,
            g.by.user.clone().unwrap_or_else(|| g.by.uid.to_string()),
            g.reason.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

fn revoke(config: &Config, id: u64, json: bool) -> Result<(), CliError> {
    let g: GrantInfo = ask(config, &Request::ApprovalsRevoke { id })?;
    if json {
        return print_json(&g);
    }
    println!(
        "revoked grant {} (uid {} {} → {}, rule {}); it had approved {} request{} without asking",
        g.id,
        g.identity.uid,
        process(&g.identity),
        g.target,
        g.rule,
        g.uses,
        if g.uses == 1 { "" } else { "s" }
    );
    Ok(())
}

/// One notice as a human line.
fn notice_line(n: &Notice) -> String {
    // Milliseconds: notices can follow each other within a second, and their order matters.
    let now = crate::text::timestamp_ms(now_micros());
    match n {
        Notice::Requested { approval: p } => format!(
            "{now}  requested   {}  ({}), expires in {}: {}",
            p.id,
            about(p),
            short(p.expires_in_ms),
            one_line(&p.text, 120)
        ),
        Notice::Decided {
            approval,
            session,
            state,
            target,
            rule,
            by,
            reason,
            grant,
        } => format!(
            "{now}  {state:<10}  {}  (session {session} → {target}, rule {rule}){}{}{}",
            approval.map_or_else(|| "-".to_string(), |a| a.to_string()),
            by.as_ref().map(|b| format!(" by {b}")).unwrap_or_default(),
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            grant.map(|g| format!(" [grant {g}]")).unwrap_or_default(),
        ),
        Notice::ApproverRefused {
            approval,
            session,
            target,
            rule,
            by,
            reason,
        } => format!(
            "{now}  REFUSED     {approval}  (session {session} → {target}, rule {rule}) {by} may \
             not decide it: {reason}; it still waits"
        ),
        Notice::Revoked { grant, by } => format!(
            "{now}  revoked     grant {} (uid {} {} → {}, rule {}) by {by}",
            grant.id,
            grant.identity.uid,
            process(&grant.identity),
            grant.target,
            grant.rule
        ),
    }
}

/// `approvals watch`: notices as they happen; across a daemon restart it follows again.
fn watch(config: &Config, json: bool) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let followed = follow(
        config,
        || Request::ApprovalsWatch,
        |answer| {
            match answer {
                Response::Ok { result } => {
                    let written = if json {
                        serde_json::to_writer(&mut out, &result)
                            .map_err(std::io::Error::other)
                            .and_then(|()| out.write_all(b"\n"))
                    } else {
                        let notice: Notice = serde_json::from_value(result).map_err(|e| {
                            CliError::Other(format!("unexpected notice from the daemon: {e}"))
                        })?;
                        writeln!(out, "{}", notice_line(&notice))
                    };
                    if written.and_then(|()| out.flush()).is_err() {
                        return Ok(Flow::Stop); // the reader went away (| head)
                    }
                }
                Response::Error { message } => eprintln!("bulkhead: {message}"),
                Response::Event { .. } | Response::End => {}
            }
            Ok(Flow::Continue)
        },
    );
    match followed {
        Err(CliError::Control(ClientError::NotRunning { path, stale })) => {
            Err(not_running(&path, stale))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn durations_are_short_and_windows_whole_seconds() {
        assert_eq!(short(42_000), "42s");
        assert_eq!(short(252_000), "4m12s");
        assert_eq!(short(3_900_000), "1h05m");
        assert_eq!(parse_window("15m"), Ok(Duration::from_mins(15)));
        assert_eq!(parse_window("1500ms"), Ok(Duration::from_secs(1)));
        assert!(parse_window("200ms").is_err());
        assert!(parse_window("soon").is_err());
    }

    #[test]
    fn long_text_is_one_short_line() {
        assert_eq!(one_line("SELECT\n  1", 60), "SELECT 1");
        assert_eq!(
            one_line("SELECT 1 \x1b[2J\x1b[1A-- \u{202e}evil", 80),
            "SELECT 1 \\x1b[2J\\x1b[1A-- \\u{202e}evil"
        );
        let cut = one_line(&"é".repeat(100), 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from([
            "bulkhead",
            "approvals",
            "approve",
            "17",
            "--reason",
            "migration",
            "--for",
            "15m",
            "--json",
        ])
        .unwrap();
        let Command::Approvals(ApprovalsCommand::Approve {
            id,
            reason,
            window,
            json,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (id, reason.as_deref(), window, json.json),
            (17, Some("migration"), Some(Duration::from_mins(15)), true)
        );
        for args in [
            &["bulkhead", "approvals", "list"][..],
            &["bulkhead", "approvals", "deny", "3", "--reason", "no"],
            &["bulkhead", "approvals", "watch", "--json"],
            &["bulkhead", "approvals", "grants"],
            &["bulkhead", "approvals", "revoke", "3"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["bulkhead", "approvals", "approve", "x"]).is_err());
        assert!(Cli::try_parse_from([
            "bulkhead",
            "approvals",
            "approve",
            "1",
            "--for",
            "2 fortnights"
        ])
        .is_err());
    }

    /// The CLI against an in-process control server: every subcommand decodes what the daemon
    /// answers, in both output modes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subcommand_talks_to_the_daemon() {
        use crate::control::approvals::tests::{broker, held, serve_for_test};
        let dir = tempfile::tempdir().unwrap();
        let (broker, store) = broker();
        let (_path, _stop) = serve_for_test(&broker, &store, dir.path());
        let config = Config::from_toml(
            &format!("[daemon]\nrun_dir = \"{}\"\n", dir.path().display()),
            crate::config::Source::Embedded,
        )
        .unwrap();
        let config = std::sync::Arc::new(config);
        let cli = |command: ApprovalsCommand| {
            let config = std::sync::Arc::clone(&config);
            tokio::task::spawn_blocking(move || run(&config, command).map_err(|e| e.to_string()))
        };
        let json = |json| JsonFlag { json };

        let (first, task) = held(&broker).await;
        for j in [false, true] {
            cli(ApprovalsCommand::List(json(j))).await.unwrap().unwrap();
        }
        cli(ApprovalsCommand::Approve {
            id: first,
            reason: Some("migration".into()),
            window: Some(Duration::from_mins(15)),
            json: json(false),
        })
        .await
        .unwrap()
        .unwrap();
        assert!(task.await.unwrap().is_approved());
        for j in [false, true] {
            cli(ApprovalsCommand::Grants(json(j)))
                .await
                .unwrap()
                .unwrap();
        }
        cli(ApprovalsCommand::Revoke {
            id: first,
            json: json(false),
        })
        .await
        .unwrap()
        .unwrap();
        let e = cli(ApprovalsCommand::Revoke {
            id: first,
            json: json(false),
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(e.contains("no open grant"), "{e}");

        let (second, task) = held(&broker).await;
        cli(ApprovalsCommand::Deny {
            id: second,
            reason: Some("not now".into()),
            json: json(true),
        })
        .await
        .unwrap()
        .unwrap();
        assert!(!task.await.unwrap().is_approved());
        let e = cli(ApprovalsCommand::Deny {
            id: second,
            reason: None,
            json: json(false),
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(
            e.contains(&format!("no pending approval with id {second}")),
            "{e}"
        );
    }

    #[test]
    fn show_prints_the_whole_request_escaped_with_what_it_does() {
        let long = format!(
            "DELETE FROM orders WHERE note = '{}'\n  AND id = 1",
            "x".repeat(300)
        );
        let pending = PendingApproval {
            id: 12,
            session: crate::record::SessionId(3),
            identity: ApprovalIdentity {
                uid: 1000,
                user: Some("agent".into()),
                exe: Some("/usr/bin/psql".into()),
                comm: "psql".into(),
            },
            target: "orders-db".into(),
            protocol: crate::protocol::Protocol::Postgres,
            text: format!("{long}; -- \x1b]0;hidden\x07"),
            rule: "deletes".into(),
            what: crate::approval::RequestDetails {
                classes: vec!["delete".into()],
                objects: vec!["public.orders".into()],
                functions: Vec::new(),
                unknown: Vec::new(),
                params: vec![Some("42".into()), None],
            },
            requested_at_us: 0,
            expires_at_us: 300_000_000,
            age_ms: 1_000,
            expires_in_ms: 299_000,
        };
        let text = show_text(&pending);
        assert!(
            text.contains(
                "requested:  1970-01-01T00:00:00Z (waiting 1s), expires 1970-01-01T00:05:00Z \
                 (in 4m59s)\n"
            ),
            "{text}"
        );
        assert!(text.contains("classes:    delete\n"), "{text}");
        assert!(text.contains("relations:  public.orders\n"), "{text}");
        assert!(text.contains("functions:  -\n"), "{text}");
        assert!(
            text.contains("parameters: $1 = '42', $2 = NULL\n"),
            "{text}"
        );
        assert!(text.contains(&long), "the whole text, lines kept: {text}");
        assert!(text.contains("\\x1b]0;hidden\\x07"), "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text}");
    }

    #[test]
    fn watch_lines_say_what_happened() {
        let identity = ApprovalIdentity {
            uid: 1000,
            user: Some("agent".into()),
            exe: Some("/usr/bin/python3".into()),
            comm: "python3".into(),
        };
        let pending = PendingApproval {
            id: 12,
            session: crate::record::SessionId(3),
            identity: identity.clone(),
            target: "orders-db".into(),
            protocol: crate::protocol::Protocol::Postgres,
            text: "DELETE FROM orders".into(),
            rule: "deletes".into(),
            what: crate::approval::RequestDetails::default(),
            requested_at_us: 0,
            expires_at_us: 300_000_000,
            age_ms: 0,
            expires_in_ms: 300_000,
        };
        let line = notice_line(&Notice::Requested { approval: pending });
        assert!(
            line.contains("requested   12  (session 3, uid 1000 (agent) python3 → orders-db, rule deletes), expires in 5m00s: DELETE FROM orders"),
            "{line}"
        );
        let line = notice_line(&Notice::Decided {
            approval: None,
            session: crate::record::SessionId(3),
            state: crate::approval::ApprovalState::CoveredByGrant,
            target: "orders-db".into(),
            rule: "deletes".into(),
            by: Some(crate::approval::Approver {
                uid: 0,
                user: Some("root".into()),
            }),
            reason: Some("migration".into()),
            grant: Some(9),
        });
        assert!(
            line.contains("covered_by_grant  -  (session 3 → orders-db, rule deletes) by root (uid 0): migration [grant 9]"),
            "{line}"
        );
        let line = notice_line(&Notice::ApproverRefused {
            approval: 12,
            session: crate::record::SessionId(3),
            target: "orders-db".into(),
            rule: "deletes".into(),
            by: crate::approval::Approver {
                uid: 1000,
                user: Some("agent".into()),
            },
            reason: "the approver is the user whose process made the request".into(),
        });
        assert!(
            line.contains("REFUSED     12  (session 3 → orders-db, rule deletes) agent (uid 1000) may not decide it: the approver is the user whose process made the request; it still waits"),
            "{line}"
        );
    }

    #[test]
    fn a_stopped_daemon_is_said_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_toml(
            &format!("[daemon]\nrun_dir = \"{}\"\n", dir.path().display()),
            crate::config::Source::Embedded,
        )
        .unwrap();
        let e = list(&config, false).unwrap_err().to_string();
        assert!(e.contains("the daemon is not running"), "{e}");
        assert!(e.contains("none are pending"), "{e}");
        let e = watch(&config, true).unwrap_err().to_string();
        assert!(e.contains("the daemon is not running"), "{e}");
    }
}

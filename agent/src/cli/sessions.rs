//! `bulkhead sessions list | show | replay | export | tail`.

use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Subcommand, ValueEnum};

use super::{ask_or_read, follow, format_time, open_store, print_json, CliError, Flow, JsonFlag};
use crate::{
    config::Config,
    control::{self, query, ClientError, Request, Response, Selection, SessionDetail},
    protocol::Protocol,
    record::{Event, EventKind, ListFilter, Session, SessionStore as _},
};

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Sessions, newest first
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Sessions started at or before this time (RFC 3339 UTC, or a duration ago like 10m)
        #[arg(long, value_parser = parse_when)]
        until: Option<u64>,
        /// How many sessions to show
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// One session: identity, target, and the timeline of events with verdicts
    Show {
        /// The session's id (`sessions list` shows them)
        id: u64,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Replay a session with its timing: terminal output for terminal sessions, a paced
    /// timeline of events for the others
    Replay {
        /// The session's id (`sessions list` shows them)
        id: u64,
        /// Playback speed factor (2 = twice as fast)
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Longest pause, in seconds, however long the session was idle
        #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
        max_idle: f64,
    },
    /// Export events as JSON lines (docs/EVENTS.md), or a terminal session as asciicast v2
    Export {
        /// One session's events
        #[arg(long, value_name = "ID", conflicts_with_all = ["since", "until"])]
        session: Option<u64>,
        /// Events at or after this time (RFC 3339, or a duration ago like 2h)
        #[arg(long, value_parser = parse_when)]
        since: Option<u64>,
        /// Events at or before this time (RFC 3339, or a duration ago)
        #[arg(long, value_parser = parse_when)]
        until: Option<u64>,
        /// What to write
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write to FILE instead of standard output
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Follow new events as they happen (needs the daemon)
    Tail {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON event per line
    Jsonl,
    /// asciicast v2 (terminal sessions; plays with `asciinema play` / `asciinema cat`)
    Asciicast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerdictFilter {
    /// Sessions in which nothing was denied
    Allowed,
    /// Sessions in which a connection or request was denied
    Denied,
    /// Sessions in which a request was held for an admin's approval
    Held,
    /// Sessions in which result values were masked
    Masked,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Sessions started at or after this time (RFC 3339 UTC like 2026-12-01T05:40:00Z, or a
    /// duration ago like 15m, 2h, 7days)
    #[arg(long, value_parser = parse_when)]
    since: Option<u64>,
    /// Only this target
    #[arg(long)]
    target: Option<String>,
    /// Only this process (name, executable path or file name)
    #[arg(long)]
    process: Option<String>,
    /// Only this user id
    #[arg(long)]
    uid: Option<u32>,
    /// Only sessions with this kind of decision in them
    #[arg(long, value_enum)]
    verdict: Option<VerdictFilter>,
    /// Only this protocol
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Postgres,
    Ssh,
    Http,
    Kubernetes,
    Udp,
    Dns,
    /// Sockets of other families refused by the socket filter
    Socket,
    /// Unix-domain connects
    Unix,
}

impl From<&FilterArgs> for ListFilter {
    fn from(a: &FilterArgs) -> Self {
        ListFilter {
            since_us: a.since,
            until_us: None,
            target: a.target.clone(),
            process: a.process.clone(),
            uid: a.uid,
            protocol: a.protocol.map(|p| match p {
                ProtocolArg::Tcp => Protocol::Tcp,
                ProtocolArg::Postgres => Protocol::Postgres,
                ProtocolArg::Ssh => Protocol::Ssh,
                ProtocolArg::Http => Protocol::Http,
                ProtocolArg::Kubernetes => Protocol::Kubernetes,
                ProtocolArg::Udp => Protocol::Udp,
                ProtocolArg::Dns => Protocol::Dns,
                ProtocolArg::Socket => Protocol::Socket,
                ProtocolArg::Unix => Protocol::Unix,
            }),
            denied: a.verdict == Some(VerdictFilter::Denied),
            allowed: a.verdict == Some(VerdictFilter::Allowed),
            held: a.verdict == Some(VerdictFilter::Held),
            masked: a.verdict == Some(VerdictFilter::Masked),
        }
    }
}

/// An instant as microseconds since the epoch: RFC 3339, or a duration before now.
fn parse_when(text: &str) -> Result<u64, String> {
    let to_us = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .map_err(|_| format!("{text:?} is before 1970"))
    };
    if let Ok(ago) = humantime::parse_duration(text) {
        return to_us(
            SystemTime::now()
                .checked_sub(ago)
                .ok_or_else(|| format!("{text:?} is too long ago"))?,
        );
    }
    // A date alone is its first second (UTC).
    let midnight;
    let time = if text.len() == 10 && !text.contains(['T', 't', ' ']) {
        midnight = format!("{text}T00:00:00Z");
        &midnight
    } else {
        text
    };
    humantime::parse_rfc3339_weak(time)
        .map_err(|_| {
            format!(
                "{text:?} is neither a time in UTC (2026-11-26T14:00:00Z, 2026-11-26) nor a \
                 duration ago (10m, 2h, 7days)"
            )
        })
        .and_then(to_us)
}

pub fn run(config: &Config, command: SessionsCommand) -> Result<(), CliError> {
    match command {
        SessionsCommand::List {
            filter,
            until,
            limit,
            json,
        } => {
            let filter = ListFilter {
                until_us: until,
                ..ListFilter::from(&filter)
            };
            list(config, &filter, limit, json.json)
        }
        SessionsCommand::Show { id, json } => show(config, id, json.json),
        SessionsCommand::Replay {
            id,
            speed,
            max_idle,
        } => replay(config, id, speed, max_idle),
        SessionsCommand::Export {
            session,
            since,
            until,
            format,
            output,
        } => {
            let selection = match session {
                Some(id) => Selection::Session(id),
                None => Selection::Range {
                    since_us: since,
                    until_us: until,
                },
            };
            export(config, &selection, format, output)
        }
        SessionsCommand::Tail { filter, json } => {
            tail(config, &ListFilter::from(&filter), json.json)
        }
    }
}

fn list(config: &Config, filter: &ListFilter, limit: usize, json: bool) -> Result<(), CliError> {
    let req = Request::SessionsList {
        filter: filter.clone(),
        limit,
    };
    let sessions: Vec<Session> =
        ask_or_read(
            config,
            &req,
            || Ok(open_store(config)?.list(filter, limit)?),
        )?;
    if json {
        return print_json(&sessions);
    }
    println!(
        "{:>8}  {:<20}  {:>7}  {:<15}  {:>5}  {:<28}  {:<12}  {:<5}  {:>9}  {:>9}  OUTCOME",
        "ID", "STARTED", "PID", "PROCESS", "UID", "DESTINATION", "TARGET", "PROTO", "UP", "DOWN"
    );
    for s in &sessions {
        println!(
            "{:>8}  {:<20}  {:>7}  {:<15}  {:>5}  {:<28}  {:<12}  {:<5}  {:>9}  {:>9}  {}{}{}",
            s.id.0,
            format_time(s.start.started_at_us),
            s.start.identity.pid,
            s.start.identity.comm,
            s.start.identity.uid,
            s.start.destination.to_string(),
            s.start.target.as_deref().unwrap_or("-"),
            s.start.protocol.to_string(),
            s.bytes_to_target,
            s.bytes_from_target,
            s.outcome.label(),
            if s.denied > 0 {
                format!(" ({} denied)", s.denied)
            } else {
                String::new()
            },
            s.outcome
                .reason()
                .map(|r| format!(": {}", one_line(r, LIST_REASON_CHARS)))
                .unwrap_or_default(),
        );
    }
    if sessions.is_empty() {
        println!("(no sessions match)");
    }
    Ok(())
}

/// How much of a refusal's or failure's reason a `sessions list` row shows (`sessions show`
/// has all of it).
const LIST_REASON_CHARS: usize = 100;

/// `text` on one line, at most `max` characters (cut with `…`), escaped for the terminal.
fn one_line(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = if flat.chars().count() > max {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        flat
    };
    crate::text::terminal_safe(&cut)
}

fn detail(config: &Config, id: u64) -> Result<SessionDetail, CliError> {
    ask_or_read(config, &Request::SessionsShow { id }, || {
        query::show(&open_store(config)?, id).map_err(|e| CliError::Other(e.to_string()))
    })
}

fn show(config: &Config, id: u64, json: bool) -> Result<(), CliError> {
    let d = detail(config, id)?;
    if json {
        return print_json(&d);
    }
    let s = &d.session;
    let who = &s.start.identity;
    println!("session {}  {}", s.id, s.outcome.label());
    if let Some(reason) = s.outcome.reason() {
        println!("  reason:      {}", crate::text::terminal_safe(reason));
    }
    println!("  started:     {}", format_time(s.start.started_at_us));
    if let Some(end) = s.ended_at_us {
        println!(
            "  ended:       {} ({} ms)",
            format_time(end),
            end.saturating_sub(s.start.started_at_us) / 1000
        );
    }
    println!(
        "  destination: {} (target {}, {})",
        s.start.destination,
        s.start.target.as_deref().unwrap_or("-"),
        s.start.protocol
    );
    println!(
        "  bytes:       {} to target, {} from target",
        s.bytes_to_target, s.bytes_from_target
    );
    println!(
        "  process:     pid {} (thread {}) {}",
        who.pid, who.tid, who.comm
    );
    println!(
        "  user:        uid {} ({}) gid {}",
        who.uid,
        who.user.as_deref().unwrap_or("?"),
        who.gid
    );
    println!("  exe:         {}", who.exe.as_deref().unwrap_or("?"));
    println!("  cmdline:     {}", crate::text::shell_quoted(&who.cmdline));
    println!(
        "  cgroup:      {} (id {})",
        who.cgroup.as_deref().unwrap_or("?"),
        who.cgroup_id
    );
    if let Some(unit) = &who.unit {
        println!("  unit:        {unit}");
    }
    for a in &who.ancestors {
        println!(
            "  parent:      pid {} {} {}{}",
            a.pid,
            a.comm,
            a.exe.as_deref().unwrap_or("?"),
            if a.governed { "" } else { "  (not governed)" }
        );
    }
    println!("  timeline:");
    for e in &d.events {
        println!("    {}", timeline_line(e, s.start.started_at_us));
    }
    Ok(())
}

/// One event as a human line: offset from the session start, type, details.
/// One event as a line of `sessions show` / `tail`, escaped for the terminal (statement text,
/// names and errors come from the governed side).
fn timeline_line(e: &Event, start_us: u64) -> String {
    crate::text::terminal_safe(&timeline_text(e, start_us))
}

fn timeline_text(e: &Event, start_us: u64) -> String {
    let offset = e.at_us.saturating_sub(start_us);
    let when = format!("+{}.{:03}s", offset / 1_000_000, (offset / 1000) % 1000);
    format!("{when:>10}  {}", event_text(e))
}

/// A request event's line: verdict, class, rules, text, and how it went.
fn request_text(kind: &EventKind) -> String {
    let EventKind::Request {
        text,
        class,
        verdict,
        rules,
        observed,
        summary,
        error,
        ..
    } = kind
    else {
        return String::new();
    };
    format!(
        "request     {verdict:?}{} [{}]{} {}{}{}",
        if *observed { " (observed)" } else { "" },
        class.as_deref().unwrap_or("-"),
        if rules.is_empty() {
            String::new()
        } else {
            format!(" rules {}", rules.join(","))
        },
        text.replace('\n', " "),
        summary
            .as_deref()
            .map(|s| format!(" → {s}"))
            .unwrap_or_default(),
        error
            .as_deref()
            .map(|e| format!(" → error: {e}"))
            .unwrap_or_default(),
    )
}

/// What an event says, without its time.
fn event_text(e: &Event) -> String {
    match &e.kind {
        EventKind::Connect {
            destination,
            pid,
            uid,
            comm,
            ..
        } => format!("connect     {comm} (pid {pid}, uid {uid}) → {destination}"),
        EventKind::Auth {
            side,
            user,
            method,
            ok,
        } => format!(
            "auth        {side} {method} {} {}",
            user.as_deref().unwrap_or("-"),
            if *ok { "ok" } else { "failed" }
        ),
        EventKind::Request { .. } => request_text(&e.kind),
        EventKind::Response {
            request,
            duration_us,
            summary,
            error,
            masked_rows,
            mask_rules,
        } => format!(
            "response    to #{request} in {duration_us} us{}{}{}",
            summary
                .as_deref()
                .map(|s| format!(": {s}"))
                .unwrap_or_default(),
            masked_rows
                .map(|n| format!(
                    ", MASKED in {} by {}",
                    crate::text::count(usize::try_from(n).unwrap_or(usize::MAX), "row", "rows"),
                    mask_rules.join(", ")
                ))
                .unwrap_or_default(),
            error
                .as_deref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        ),
        EventKind::Approval {
            request,
            state,
            by_user,
            reason,
            ..
        } => format!(
            "approval    {state} {request}{}{}",
            by_user
                .as_deref()
                .map(|u| format!(" by {u}"))
                .unwrap_or_default(),
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        EventKind::TerminalOutput { data } => format!("output      {} bytes", data.len()),
        EventKind::TerminalInput { data } => format!("input       {} bytes", data.len()),
        EventKind::Http {
            method,
            host,
            path,
            status,
        } => format!(
            "http        {method} {host}{path} {}",
            status.map(|s| s.to_string()).unwrap_or_default()
        ),
        EventKind::Error { message } => format!("error       {message}"),
        EventKind::Close {
            outcome,
            bytes_to_target,
            bytes_from_target,
        } => {
            format!(
                "close       {} ({bytes_to_target} up, {bytes_from_target} down){}",
                outcome.label(),
                outcome
                    .reason()
                    .map(|r| format!(": {}", r.replace('\n', " ")))
                    .unwrap_or_default()
            )
        }
    }
}

fn is_terminal(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e.kind, EventKind::TerminalOutput { .. }))
}

fn replay(config: &Config, id: u64, speed: f64, max_idle: f64) -> Result<(), CliError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(CliError::Other("--speed must be a positive number".into()));
    }
    let d = detail(config, id)?;
    let terminal = is_terminal(&d.events);
    let mut out = std::io::stdout().lock();
    let mut last = d.session.start.started_at_us;
    for e in &d.events {
        if terminal && !matches!(e.kind, EventKind::TerminalOutput { .. }) {
            continue;
        }
        let gap = e.at_us.saturating_sub(last) as f64 / 1e6;
        last = e.at_us;
        let pause = gap.min(max_idle.max(0.0)) / speed;
        if pause > 0.0 {
            out.flush().ok();
            std::thread::sleep(Duration::from_secs_f64(pause));
        }
        let written = match &e.kind {
            EventKind::TerminalOutput { data } => out.write_all(data.as_bytes()),
            _ => writeln!(out, "{}", timeline_line(e, d.session.start.started_at_us)),
        };
        if written.is_err() {
            break; // the reader went away (| head)
        }
    }
    out.flush().ok();
    Ok(())
}

/// asciicast v2: a header line, then `[seconds, "o"|"i", data]` per terminal event.
pub fn asciicast(session: &Session, events: &[Event]) -> Result<String, CliError> {
    if !is_terminal(events) {
        return Err(CliError::Other(format!(
            "session {} has no terminal output; export it as --format jsonl",
            session.id
        )));
    }
    let start = session.start.started_at_us;
    let header = serde_json::json!({
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": start / 1_000_000,
        "title": format!("bulkhead session {} {} → {}", session.id, session.start.identity.comm, session.start.destination),
    });
    let mut text = format!("{header}\n");
    for e in events {
        let (kind, data) = match &e.kind {
            EventKind::TerminalOutput { data } => ("o", data),
            EventKind::TerminalInput { data } => ("i", data),
            _ => continue,
        };
        let t = e.at_us.saturating_sub(start) as f64 / 1e6;
        text.push_str(&serde_json::json!([t, kind, data]).to_string());
        text.push('\n');
    }
    Ok(text)
}

fn export(
    config: &Config,
    selection: &Selection,
    format: ExportFormat,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    let mut sink: Box<dyn std::io::Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let write_err = |e: std::io::Error| CliError::Other(format!("writing the export: {e}"));
    if format == ExportFormat::Asciicast {
        let Selection::Session(id) = *selection else {
            return Err(CliError::Other(
                "asciicast export needs --session ID".into(),
            ));
        };
        let d = detail(config, id)?;
        sink.write_all(asciicast(&d.session, &d.events)?.as_bytes())
            .map_err(write_err)?;
        return sink.flush().map_err(write_err);
    }
    let mut line = |event: &Event| -> std::io::Result<()> {
        serde_json::to_writer(&mut sink, event)?;
        sink.write_all(b"\n")
    };
    match control::Client::connect(&config.control_socket(), &config.daemon.admin_group) {
        Ok(mut client) => {
            client.send(&Request::SessionsExport {
                selection: selection.clone(),
            })?;
            loop {
                match client.next()? {
                    Some(Response::Event { event }) => line(&event).map_err(write_err)?,
                    Some(Response::End) | None => break,
                    Some(Response::Error { message }) => return Err(CliError::Other(message)),
                    Some(Response::Ok { .. }) => {}
                }
            }
        }
        Err(ClientError::NotRunning { .. }) => {
            let store = open_store(config)?;
            let mut failed = None;
            query::export(&store, selection, |e| match line(&e) {
                Ok(()) => true,
                Err(err) => {
                    failed = Some(err);
                    false
                }
            })
            .map_err(|e| CliError::Other(e.to_string()))?;
            if let Some(e) = failed {
                return Err(write_err(e));
            }
        }
        Err(e) => return Err(e.into()),
    }
    sink.flush().map_err(write_err)
}

/// `sessions tail`: the events since `--since` first, then new ones; across a daemon restart
/// it picks up where it left off (no event twice, none lost that the store kept).
fn tail(config: &Config, filter: &ListFilter, json: bool) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let last = std::cell::Cell::new(None::<(u64, u64)>); // (event id, its time)
    follow(
        config,
        || Request::SessionsTail {
            filter: ListFilter {
                since_us: last.get().map(|(_, at)| at).or(filter.since_us),
                ..filter.clone()
            },
        },
        |answer| {
            match answer {
                Response::Event { event } => {
                    if last.get().is_some_and(|(id, _)| event.id <= id) {
                        return Ok(Flow::Continue);
                    }
                    last.set(Some((event.id, event.at_us)));
                    let written = if json {
                        serde_json::to_writer(&mut out, &event)
                            .map_err(std::io::Error::other)
                            .and_then(|()| out.write_all(b"\n"))
                    } else {
                        writeln!(
                            out,
                            "{}  session {:>8}  {}",
                            crate::text::timestamp_ms(event.at_us),
                            event.session,
                            crate::text::terminal_safe(&event_text(&event))
                        )
                    };
                    if written.and_then(|()| out.flush()).is_err() {
                        return Ok(Flow::Stop);
                    }
                }
                Response::Error { message } => eprintln!("bulkhead: {message}"),
                Response::Ok { .. } | Response::End => {}
            }
            Ok(Flow::Continue)
        },
    )
}

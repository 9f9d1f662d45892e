//! A model of PostgreSQL's side of a session, as far as names, errors and transactions go,
//! and a relay that puts a [`State`] between it and a client: for the property test that
//! random message sequences never get a row past the gateway unmasked (`tests.rs`).
//!
//! The server model follows PostgreSQL 15's rules for what the gateway tracks: protocol and
//! SQL prepared statements share one namespace, and so do portals and cursors; a Parse of a
//! named statement that exists fails (42P05), a Bind to a named portal that exists fails
//! (42P03); Close of a missing name succeeds; after an error in the extended protocol
//! everything up to the Sync is skipped; a failed transaction block refuses everything but
//! COMMIT/ROLLBACK (25P02); a transaction's end closes its cursors unless `WITH HOLD`; a
//! simple Query drops the unnamed statement and portal; `DECLARE` without `HOLD` needs a
//! transaction block (25P01).

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut as _, Bytes, BytesMut};

use super::{Judged, Masks, Request, State, ToJudge};
use crate::{
    net::OrigDstAddr,
    policy::{self, Classification, MaskRule, SqlClass},
    proxy::postgres::{
        catalog::{Catalogs, Login},
        codec,
        columns::{Results, Tracker},
        settings::PostgresTarget,
        SessionError,
    },
    record::{SessionId, SledStore},
};

/// The value a mask rule covers: it must never reach the client in clear.
pub const SECRET: &str = "s3cr3t";

/// The statements a client may send, by text.
pub const SQL: &[&str] = &[
    "SELECT secret FROM users",
    "SELECT 'plain'",
    "SELECT 1/0",
    "DELETE FROM users",
    "PREPARE a AS SELECT secret FROM users",
    "PREPARE a AS SELECT 'plain'",
    "PREPARE b AS SELECT secret FROM users",
    "EXECUTE a",
    "EXECUTE b",
    "DECLARE c CURSOR FOR SELECT secret FROM users",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 'plain'",
    "DECLARE p CURSOR FOR SELECT 'plain'",
    "DECLARE p CURSOR WITH HOLD FOR SELECT secret FROM users",
    "FETCH ALL FROM c",
    "FETCH ALL FROM p",
    "CLOSE c",
    "CLOSE ALL",
    "DEALLOCATE a",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "DEALLOCATE a; PREPARE a AS SELECT 'plain'",
    "CLOSE c; DECLARE c CURSOR FOR SELECT 'plain'",
    "PREPARE b AS SELECT 'plain'; SELECT 1/0",
    "DECLARE c CURSOR FOR SELECT secret FROM users; FETCH ALL FROM c",
];

/// Statement names and portal names a client may use.
pub const STATEMENTS: &[&str] = &["", "a", "b"];
pub const PORTALS: &[&str] = &["", "c", "p"];

/// What a query returns when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    Secret,
    Plain,
    DivisionByZero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stmt {
    Select(Rows),
    Delete,
    Prepare(String, Rows),
    Execute(String),
    Declare {
        name: String,
        hold: bool,
        rows: Rows,
    },
    Fetch(String),
    Close(Option<String>),
    Deallocate(Option<String>),
    DiscardAll,
    Begin,
    Commit,
    Rollback,
}

impl Stmt {
    fn read(sql: &str) -> Option<Vec<Stmt>> {
        sql.split("; ").map(Self::read_one).collect()
    }

    fn read_one(sql: &str) -> Option<Stmt> {
        let rows = |q: &str| match q {
            "SELECT secret FROM users" => Some(Rows::Secret),
            "SELECT 'plain'" => Some(Rows::Plain),
            "SELECT 1/0" => Some(Rows::DivisionByZero),
            _ => None,
        };
        if let Some(r) = rows(sql) {
            return Some(Stmt::Select(r));
        }
        let words: Vec<&str> = sql.split(' ').collect();
        Some(match words.as_slice() {
            ["DELETE", "FROM", "users"] => Stmt::Delete,
            ["PREPARE", name, "AS", ..] => {
                Stmt::Prepare((*name).into(), rows(&words[3..].join(" "))?)
            }
            ["EXECUTE", name] => Stmt::Execute((*name).into()),
            ["DECLARE", name, "CURSOR", "WITH", "HOLD", "FOR", ..] => Stmt::Declare {
                name: (*name).into(),
                hold: true,
                rows: rows(&words[6..].join(" "))?,
            },
            ["DECLARE", name, "CURSOR", "FOR", ..] => Stmt::Declare {
                name: (*name).into(),
                hold: false,
                rows: rows(&words[4..].join(" "))?,
            },
            ["FETCH", "ALL", "FROM", name] => Stmt::Fetch((*name).into()),
            ["CLOSE", "ALL"] => Stmt::Close(None),
            ["CLOSE", name] => Stmt::Close(Some((*name).into())),
            ["DEALLOCATE", "ALL"] => Stmt::Deallocate(None),
            ["DEALLOCATE", name] => Stmt::Deallocate(Some((*name).into())),
            ["DISCARD", "ALL"] => Stmt::DiscardAll,
            ["BEGIN"] => Stmt::Begin,
            ["COMMIT"] => Stmt::Commit,
            ["ROLLBACK"] => Stmt::Rollback,
            _ => return None,
        })
    }

    /// Whether it returns rows (its Describe answers RowDescription).
    fn returns_rows(&self) -> bool {
        matches!(self, Stmt::Select(_) | Stmt::Execute(_) | Stmt::Fetch(_))
    }

    fn exits_transaction(&self) -> bool {
        matches!(self, Stmt::Commit | Stmt::Rollback)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Idle,
    Block,
    Failed,
}

#[derive(Debug, Clone)]
struct Portal {
    /// What it runs: a bound statement, or a cursor's query.
    stmt: Stmt,
    hold: bool,
}

/// PostgreSQL's side of one session.
#[derive(Debug)]
pub struct Server {
    /// Prepared statements: protocol Parse and SQL PREPARE alike (a SQL one as its query).
    statements: HashMap<String, Stmt>,
    portals: HashMap<String, Portal>,
    tx: Tx,
    /// After an error in the extended protocol: skipping to the Sync.
    skipping: bool,
    /// Answers produced, not yet read by the gateway.
    pub answers: std::collections::VecDeque<Bytes>,
    /// A statement the gateway denied ran.
    pub deleted: bool,
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(tag);
    b.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    b.put_slice(body);
    b.freeze()
}

fn cstr(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

struct Failure {
    sqlstate: &'static str,
    message: String,
}

fn fail(sqlstate: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        sqlstate,
        message: message.into(),
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            statements: HashMap::new(),
            portals: HashMap::new(),
            tx: Tx::Idle,
            skipping: false,
            answers: std::collections::VecDeque::new(),
            deleted: false,
        }
    }
}

impl Server {
    fn send(&mut self, tag: u8, body: &[u8]) {
        self.answers.push_back(frame(tag, body));
    }

    fn error(&mut self, f: &Failure) {
        self.answers
            .push_back(codec::error_response(f.sqlstate, &f.message));
    }

    fn ready(&mut self) {
        let status = match self.tx {
            Tx::Idle => b'I',
            Tx::Block => b'T',
            Tx::Failed => b'E',
        };
        self.send(b'Z', &[status]);
    }

    /// The end of a transaction: its cursors close, unless held.
    fn end_transaction(&mut self) {
        self.portals.retain(|_, p| p.hold);
        self.tx = Tx::Idle;
    }

    fn rows(&mut self, rows: Rows) -> Result<&'static str, Failure> {
        match rows {
            Rows::Secret => {
                let body = [
                    &1i16.to_be_bytes()[..],
                    &6i32.to_be_bytes(),
                    SECRET.as_bytes(),
                ]
                .concat();
                self.send(b'D', &body);
            }
            Rows::Plain => {
                let body = [&1i16.to_be_bytes()[..], &5i32.to_be_bytes(), b"plain"].concat();
                self.send(b'D', &body);
            }
            Rows::DivisionByZero => return Err(fail("22012", "division by zero")),
        }
        Ok("SELECT 1")
    }

    /// Runs one statement; its CommandComplete tag.
    #[expect(
        clippy::too_many_lines,
        reason = "one arm per statement kind: the server model reads best whole"
    )]
    fn run(&mut self, stmt: &Stmt) -> Result<String, Failure> {
        if self.tx == Tx::Failed && !stmt.exits_transaction() {
            return Err(fail(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        Ok(match stmt {
            Stmt::Select(r) => self.rows(*r)?.into(),
            Stmt::Delete => {
                self.deleted = true;
                "DELETE 1".into()
            }
            Stmt::Prepare(name, r) => {
                if self.statements.contains_key(name) {
                    return Err(fail(
                        "42P05",
                        format!("prepared statement \"{name}\" already exists"),
                    ));
                }
                self.statements.insert(name.clone(), Stmt::Select(*r));
                "PREPARE".into()
            }
            Stmt::Execute(name) => {
                let Some(Stmt::Select(r)) = self.statements.get(name).cloned() else {
                    return Err(fail(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                };
                self.rows(r)?.into()
            }
            Stmt::Declare { name, hold, rows } => {
                if self.tx != Tx::Block && !hold {
                    return Err(fail(
                        "25P01",
                        "DECLARE CURSOR can only be used in transaction blocks",
                    ));
                }
                if self.portals.contains_key(name) {
                    return Err(fail("42P03", format!("cursor \"{name}\" already exists")));
                }
                self.portals.insert(
                    name.clone(),
                    Portal {
                        stmt: Stmt::Select(*rows),
                        hold: *hold,
                    },
                );
                "DECLARE CURSOR".into()
            }
            Stmt::Fetch(name) => {
                let Some(portal) = self.portals.get(name).cloned() else {
                    return Err(fail("34000", format!("cursor \"{name}\" does not exist")));
                };
                // A cursor's query, or a bound statement that returns rows.
                match portal.stmt {
                    Stmt::Select(r) => {
                        self.rows(r)?;
                    }
                    Stmt::Execute(_) => {
                        self.run(&portal.stmt)?;
                    }
                    _ => return Err(fail("55000", "cursor can only scan a query")),
                }
                "FETCH 1".into()
            }
            Stmt::Close(Some(name)) => {
                if self.portals.remove(name).is_none() {
                    return Err(fail("34000", format!("cursor \"{name}\" does not exist")));
                }
                "CLOSE CURSOR".into()
            }
            Stmt::Close(None) => {
                self.portals.clear();
                "CLOSE CURSOR ALL".into()
            }
            Stmt::Deallocate(Some(name)) => {
                if self.statements.remove(name).is_none() {
                    return Err(fail(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                "DEALLOCATE".into()
            }
            Stmt::Deallocate(None) => {
                self.statements.clear();
                "DEALLOCATE ALL".into()
            }
            Stmt::DiscardAll => {
                if self.tx == Tx::Block {
                    return Err(fail(
                        "25001",
                        "DISCARD ALL cannot run inside a transaction block",
                    ));
                }
                self.statements.clear();
                self.portals.clear();
                "DISCARD ALL".into()
            }
            Stmt::Begin => {
                self.tx = Tx::Block;
                "BEGIN".into()
            }
            Stmt::Commit => {
                self.end_transaction();
                "COMMIT".into()
            }
            Stmt::Rollback => {
                self.end_transaction();
                "ROLLBACK".into()
            }
        })
    }

    /// An error inside a transaction: a block fails; an implicit transaction is rolled back
    /// (at the Sync, or at the end of the simple Query).
    fn failed(&mut self) {
        if self.tx == Tx::Block {
            self.tx = Tx::Failed;
        }
    }

    /// A frontend message as the gateway forwarded it.
    pub fn receive(&mut self, raw: &[u8]) {
        let (tag, body) = (raw[0], &raw[5..]);
        if self.skipping && tag != b'S' {
            return;
        }
        let result = match tag {
            b'Q' => {
                self.simple_query(codec::query_text(body).unwrap_or(""));
                return;
            }
            b'S' => {
                self.skipping = false;
                if self.tx == Tx::Idle {
                    self.end_transaction();
                }
                self.ready();
                return;
            }
            b'P' => self.parse(body),
            b'B' => self.bind(body),
            b'D' => self.describe(body),
            b'E' => self.execute(body),
            b'C' => self.close(body),
            _ => Ok(()),
        };
        if let Err(f) = result {
            self.error(&f);
            self.failed();
            self.skipping = true;
        }
    }

    fn parse(&mut self, body: &[u8]) -> Result<(), Failure> {
        let (name, sql) = codec::parse_message(body).map_err(|_| fail("08P01", "bad Parse"))?;
        let Some(mut stmts) = Stmt::read(sql) else {
            return Err(fail("42601", format!("syntax error at or near \"{sql}\"")));
        };
        if stmts.len() != 1 {
            return Err(fail(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let stmt = stmts.remove(0);
        if self.tx == Tx::Failed && !stmt.exits_transaction() {
            return Err(fail("25P02", "current transaction is aborted"));
        }
        if !name.is_empty() && self.statements.contains_key(name) {
            return Err(fail(
                "42P05",
                format!("prepared statement \"{name}\" already exists"),
            ));
        }
        self.statements.insert(name.to_string(), stmt);
        self.send(b'1', b"");
        Ok(())
    }

    fn bind(&mut self, body: &[u8]) -> Result<(), Failure> {
        let (portal, statement) = codec::bind_names(body).map_err(|_| fail("08P01", "bad Bind"))?;
        let Some(stmt) = self.statements.get(statement).cloned() else {
            return Err(fail(
                "26000",
                format!("prepared statement \"{statement}\" does not exist"),
            ));
        };
        if self.tx == Tx::Failed && !stmt.exits_transaction() {
            return Err(fail("25P02", "current transaction is aborted"));
        }
        if !portal.is_empty() && self.portals.contains_key(portal) {
            return Err(fail("42P03", format!("cursor \"{portal}\" already exists")));
        }
        self.portals
            .insert(portal.to_string(), Portal { stmt, hold: false });
        self.send(b'2', b"");
        Ok(())
    }

    fn describe(&mut self, body: &[u8]) -> Result<(), Failure> {
        let (kind, name) = codec::close_target(body).map_err(|_| fail("08P01", "bad Describe"))?;
        let stmt = if kind == b'S' {
            let stmt = self.statements.get(name).cloned().ok_or_else(|| {
                fail(
                    "26000",
                    format!("prepared statement \"{name}\" does not exist"),
                )
            })?;
            self.send(b't', &0i16.to_be_bytes());
            stmt
        } else {
            self.portals
                .get(name)
                .map(|p| p.stmt.clone())
                .ok_or_else(|| fail("34000", format!("portal \"{name}\" does not exist")))?
        };
        if stmt.returns_rows() {
            if self.tx == Tx::Failed {
                return Err(fail("25P02", "current transaction is aborted"));
            }
            self.send(b'T', &0i16.to_be_bytes());
        } else {
            self.send(b'n', b"");
        }
        Ok(())
    }

    fn execute(&mut self, body: &[u8]) -> Result<(), Failure> {
        let portal = codec::execute_portal(body).map_err(|_| fail("08P01", "bad Execute"))?;
        let Some(p) = self.portals.get(portal).cloned() else {
            return Err(fail("34000", format!("portal \"{portal}\" does not exist")));
        };
        let tag = self.run(&p.stmt)?;
        self.send(b'C', &cstr(&tag));
        Ok(())
    }

    fn close(&mut self, body: &[u8]) -> Result<(), Failure> {
        let (kind, name) = codec::close_target(body).map_err(|_| fail("08P01", "bad Close"))?;
        if kind == b'S' {
            self.statements.remove(name);
        } else {
            self.portals.remove(name);
        }
        self.send(b'3', b"");
        Ok(())
    }

    fn simple_query(&mut self, sql: &str) {
        self.statements.remove("");
        self.portals.remove("");
        let implicit = self.tx == Tx::Idle;
        match Stmt::read(sql) {
            None => {
                self.error(&fail("42601", format!("syntax error at or near \"{sql}\"")));
                self.failed();
            }
            Some(stmts) => {
                for stmt in &stmts {
                    if stmt.returns_rows() && self.tx != Tx::Failed {
                        self.send(b'T', &0i16.to_be_bytes());
                    }
                    match self.run(stmt) {
                        Ok(tag) => self.send(b'C', &cstr(&tag)),
                        Err(f) => {
                            self.error(&f);
                            self.failed();
                            break;
                        }
                    }
                }
            }
        }
        if implicit && self.tx == Tx::Idle {
            self.end_transaction();
        }
        self.ready();
    }
}

/// The mask rule the harness's policy applies to statements that read `users`.
pub fn secret_rule() -> Arc<MaskRule> {
    Arc::new(MaskRule {
        rule: "secret".into(),
        columns: Vec::new(),
        detectors: Vec::new(),
        style: policy::MaskStyle::Redact,
    })
}

/// One client message, by index into the name and statement lists.
#[derive(Debug, Clone)]
pub enum Op {
    Parse(usize, usize),
    Bind(usize, usize),
    Describe(bool, usize),
    Execute(usize),
    Close(bool, usize),
    Sync,
    Query(usize),
    /// The gateway reads this many of the server's answers.
    Deliver(usize),
}

/// A gateway [`State`] between a client and the [`Server`], deciding as the relay does under
/// a policy that denies unknown statements and deletes and masks what reads `users`. The
/// column masks' own queue of answers ([`Tracker`]) follows the same messages, and must agree
/// with the [`State`] on whose rows are arriving.
pub struct Harness {
    pub state: State,
    pub server: Server,
    tracker: Tracker,
    catalogs: Catalogs,
    /// Where the two queues disagreed on whose rows arrive.
    pub drifted: Vec<String>,
    rule: Arc<MaskRule>,
    requests: u64,
    /// Rows that reached the client with the secret in clear.
    pub leaked: Vec<String>,
}

impl Default for Harness {
    fn default() -> Self {
        let login = Login {
            addr: OrigDstAddr(std::net::SocketAddr::from(([127, 0, 0, 1], 5432))),
            pg: PostgresTarget::default(),
            user: "app".into(),
            database: "app".into(),
            password: None,
        };
        Self {
            state: State::default(),
            server: Server::default(),
            tracker: Tracker::new(true, login),
            catalogs: Catalogs::default(),
            drifted: Vec::new(),
            rule: secret_rule(),
            requests: 0,
            leaked: Vec::new(),
        }
    }
}

/// A store for the column masks' notes (they record only what goes wrong).
fn store() -> &'static SledStore {
    static STORE: std::sync::OnceLock<SledStore> = std::sync::OnceLock::new();
    STORE.get_or_init(|| SledStore::temporary().expect("a temporary store"))
}

/// What ended a run early: the gateway refused to go on, as the relay would.
#[derive(Debug)]
pub enum Stop {
    Session(SessionError),
}

fn reads_names(what: &Classification) -> bool {
    what.uses_prepared
        || what
            .names
            .iter()
            .any(|e| matches!(e, policy::NameEffect::Fetch(_)))
}

impl Harness {
    fn judge(&mut self, what: Arc<Classification>) -> Judged {
        self.requests += 1;
        let refused =
            what.classes.contains(&SqlClass::Unknown) || what.classes.contains(&SqlClass::Delete);
        let masks: Masks = if what.objects.iter().any(|o| o.ends_with("users")) {
            Arc::from([Arc::clone(&self.rule)])
        } else {
            Arc::from([])
        };
        Judged {
            request: self.requests,
            refusal: refused.then(|| "denied".to_string()),
            masks: if refused { Arc::from([]) } else { masks },
            what: Some(what),
            approved_once: false,
        }
    }

    fn classify(&self, sql: &str) -> Arc<Classification> {
        self.state.resolve(&Arc::new(policy::classify(
            sql,
            Some(self.state.prepared()),
        )))
    }

    /// Reads the server's answers until `done` says the wait is over.
    fn settle(&mut self, wait: impl Fn(&State) -> bool) -> Result<(), Stop> {
        while wait(&self.state) {
            assert!(
                !self.server.answers.is_empty(),
                "the gateway waits for answers the server has already sent all of"
            );
            self.deliver(1)?;
        }
        Ok(())
    }

    fn judge_sql(&mut self, sql: &str) -> Result<Judged, Stop> {
        let mut what = self.classify(sql);
        if reads_names(&what) && self.state.must_settle(super::Depends::Any) {
            self.settle(|s| s.must_settle(super::Depends::Any))?;
            what = self.classify(sql);
        }
        Ok(self.judge(what))
    }

    /// The client sends `op`.
    pub fn step(&mut self, op: &Op) -> Result<(), Stop> {
        let raw = match *op {
            Op::Parse(n, q) => codec::parse(STATEMENTS[n % STATEMENTS.len()], SQL[q % SQL.len()]),
            Op::Bind(p, n) => frame(
                b'B',
                &[
                    cstr(PORTALS[p % PORTALS.len()]),
                    cstr(STATEMENTS[n % STATEMENTS.len()]),
                    vec![0; 6],
                ]
                .concat(),
            ),
            Op::Describe(s, n) | Op::Close(s, n) => {
                let name = if s {
                    STATEMENTS[n % STATEMENTS.len()]
                } else {
                    PORTALS[n % PORTALS.len()]
                };
                let tag = if matches!(op, Op::Describe(..)) {
                    b'D'
                } else {
                    b'C'
                };
                frame(
                    tag,
                    &[&[if s { b'S' } else { b'P' }][..], &cstr(name)].concat(),
                )
            }
            Op::Execute(p) => codec::execute(PORTALS[p % PORTALS.len()]),
            Op::Sync => frame(b'S', b""),
            Op::Query(q) => codec::query(SQL[q % SQL.len()]),
            Op::Deliver(n) => return self.deliver(n),
        };
        let request = Request::read(raw[0], &raw[5..]).map_err(Stop::Session)?;
        if matches!(request, Request::Query { .. }) && self.state.mid_batch() {
            // The relay ends such a session; a client that wants to go on sends a Sync first.
            return Ok(());
        }
        let judged = match request {
            Request::Query { sql } | Request::Parse { sql, .. } => Some(self.judge_sql(sql)?),
            Request::Bind { statement, .. } => {
                self.settle(|s| s.must_settle(super::Depends::Statement(statement)))?;
                None
            }
            Request::Execute { portal } => {
                self.settle(|s| s.must_settle(super::Depends::Portal(portal)))?;
                let mut to_judge = self.state.to_judge(portal);
                if to_judge.as_ref().is_some_and(|j| reads_names(&j.what)) {
                    self.settle(|s| s.must_settle(super::Depends::Any))?;
                    to_judge = self.state.to_judge(portal);
                }
                match to_judge {
                    Some(ToJudge { what, sql, .. }) => {
                        let what = if what.uses_prepared {
                            Arc::new(policy::classify(&sql, Some(self.state.prepared())))
                        } else {
                            what
                        };
                        let what = self.state.resolve(&what);
                        Some(self.judge(what))
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let out = self
            .state
            .on_frontend(&request, judged)
            .map_err(Stop::Session)?
            .unwrap_or_else(|| raw.clone());
        // What the relay tells the column masks' tracker.
        match request {
            Request::Query { .. } => self.tracker.forwarded_without_copy(b'Q', ""),
            Request::Parse { name, .. } => self.tracker.forwarded_without_copy(b'P', name),
            _ => {}
        }
        self.tracker.frontend(raw[0], &raw[5..]);
        self.server.receive(&out);
        Ok(())
    }

    /// The gateway reads up to `n` of the server's answers.
    pub fn deliver(&mut self, n: usize) -> Result<(), Stop> {
        for _ in 0..n {
            let Some(answer) = self.server.answers.pop_front() else {
                return Ok(());
            };
            let (tag, body) = (answer[0], &answer[5..]);
            let masked = self.state.front_masks().is_some();
            Results::new(&self.tracker, &self.catalogs, store(), SessionId(0)).observe(
                tag,
                body,
                || masked,
            );
            if tag == b'D' {
                // Rows never arrive while the server skips to a Sync: both queues must hold
                // exactly the answers still owed, the front one a Query or an Execute.
                let tracker = self.tracker.expects();
                let state = self.state.expects();
                if tracker != state || !matches!(state.first(), Some(b'Q' | b'E')) {
                    self.drifted.push(format!(
                        "a row: the gateway expects {:?}, the columns {:?}",
                        String::from_utf8_lossy(&state),
                        String::from_utf8_lossy(&tracker)
                    ));
                }
                let masked = self
                    .state
                    .front_masks()
                    .is_some_and(|(_, m)| m.iter().any(|r| Arc::ptr_eq(r, &self.rule)));
                let clear = codec::data_row_values(body)
                    .unwrap_or_default()
                    .iter()
                    .any(|v| v.is_some_and(|v| v == SECRET.as_bytes()));
                if clear && !masked {
                    self.leaked.push(format!("{:?}", self.state));
                }
                continue;
            }
            self.state.on_backend(tag, body).map_err(Stop::Session)?;
            if !self.state.expected_in_step() {
                self.drifted.push(format!(
                    "after {:?}, the expected names are not the confirmed ones and what is in flight",
                    char::from(tag)
                ));
            }
        }
        Ok(())
    }

    /// What the column masks' tracker still expects.
    pub fn tracker_expects(&self) -> Vec<u8> {
        self.tracker.expects()
    }

    /// Ends the client's work: a Sync, and every answer read.
    pub fn finish(&mut self) -> Result<(), Stop> {
        self.step(&Op::Sync)?;
        self.deliver(usize::MAX)
    }
}

/// Ops read from bytes, two per op (for the fuzz target).
pub fn ops_from_bytes(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(2)
        .map(|c| {
            let (k, a) = (c[0], usize::from(c[1]));
            let (hi, lo) = (a >> 4, a & 0x0f);
            match k % 8 {
                0 => Op::Parse(hi, lo + usize::from(k / 8)),
                1 => Op::Bind(hi, lo),
                2 => Op::Describe(hi % 2 == 0, lo),
                3 => Op::Execute(a),
                4 => Op::Close(hi % 2 == 0, lo),
                5 => Op::Sync,
                6 => Op::Query(a),
                _ => Op::Deliver(a % 8),
            }
        })
        .collect()
}

/// Runs `ops` through a [`Harness`] and panics where the gateway let a row out unmasked, let
/// the denied DELETE run, lost track of the answers, or ended the session.
pub fn check(ops: &[Op]) {
    let mut h = Harness::default();
    for op in ops {
        if let Err(Stop::Session(e)) = h.step(op) {
            panic!("the session ended: {e} (after {op:?})");
        }
    }
    if let Err(Stop::Session(e)) = h.finish() {
        panic!("the session ended at the end: {e}");
    }
    assert!(
        h.leaked.is_empty(),
        "rows went out in clear: {:?}",
        h.leaked
    );
    assert!(!h.server.deleted, "the denied DELETE ran");
    assert_eq!(h.state.in_flight(), 0, "answers left unmatched");
    assert!(
        h.drifted.is_empty(),
        "the two queues disagreed: {:?}",
        h.drifted
    );
    assert!(
        h.tracker_expects().is_empty(),
        "the columns' queue left answers unmatched"
    );
}

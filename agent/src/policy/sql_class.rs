//! What SQL classification produces and the names it folds: the classes a statement can have
//! ([`SqlClass`]), a message's [`Classification`], a session's [`PreparedStatements`], and
//! identifiers as the server reads them. Shared by the classifier (`sql`) and its parts
//! (`sql_walk`, `sql_settings`, `sql_utility`, `sql_functions`), which import it and not each
//! other's entry point.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::{Arc, LazyLock},
};

use serde::{Deserialize, Serialize};

/// Longest identifier the server keeps, in bytes (`NAMEDATALEN - 1`); it cuts longer ones.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// An identifier as PostgreSQL reads it with a UTF8 server encoding: an unquoted name loses its
/// ASCII capitals only (`downcase_identifier` leaves every other letter alone in a multibyte
/// encoding: `É` stays `É`), and any name is cut to 63 bytes at a character boundary
/// (`truncate_identifier`), so `SELECT * FROM ABC` and `"abc"` name one table and `"É"` and `é`
/// two.
pub fn fold_identifier(value: &str, quoted: bool) -> String {
    let mut out = if quoted {
        value.to_string()
    } else {
        value.to_ascii_lowercase()
    };
    if out.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// PostgreSQL 15's `pg_catalog` relations, one a line, `#` comments, sorted (a test checks).
const CATALOG_RELATIONS_TEXT: &str = include_str!("builtin/pg15_catalog_relations.txt");

static CATALOG_RELATIONS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    CATALOG_RELATIONS_TEXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// Where the server may find an unqualified relation name, given a search path the gateway
/// admits (`"$user", public` or `public`: neither names `pg_catalog`, which the server then
/// searches first). A relation of PostgreSQL 15's catalog is `pg_catalog.name`; another name
/// beginning with `pg_` may be a catalog relation of a newer server or a table in `public`, so
/// it is both; any other name is `public.name` (relations in `pg_catalog` all begin with `pg_`).
pub fn unqualified_resolutions(name: &str) -> &'static [&'static str] {
    if CATALOG_RELATIONS.binary_search(&name).is_ok() {
        &["pg_catalog"]
    } else if name.starts_with("pg_") {
        &["pg_catalog", "public"]
    } else {
        &["public"]
    }
}

/// What a statement does, ordered from least to most consequential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqlClass {
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// SET (ordinary settings), RESET, DISCARD, LISTEN, UNLISTEN, DEALLOCATE.
    Session,
    /// SELECT, VALUES, SHOW, EXPLAIN (without ANALYZE), COPY ... TO STDOUT, cursors.
    Read,
    /// LOCK TABLE, SELECT ... FOR UPDATE/SHARE, advisory locks.
    Lock,
    /// NOTIFY, `pg_notify()`.
    Notify,
    Insert,
    Update,
    Delete,
    Merge,
    /// COPY ... FROM STDIN.
    CopyIn,
    /// `nextval()`, `setval()`.
    Sequence,
    /// VACUUM, ANALYZE, REINDEX, CLUSTER, CHECKPOINT, REFRESH MATERIALIZED VIEW.
    Maintenance,
    Truncate,
    /// CREATE / ALTER / DROP / COMMENT of schema objects, SELECT INTO.
    Ddl,
    /// GRANT, REVOKE, ALTER DEFAULT PRIVILEGES.
    Grant,
    /// SET ROLE, SET SESSION AUTHORIZATION, `set_config('role', ...)`, CREATE/ALTER/DROP ROLE.
    Role,
    /// DO, CALL: code the gateway cannot see.
    Procedural,
    /// `pg_terminate_backend`, `pg_reload_conf`, `pg_sleep` and other server-affecting functions.
    AdminFunction,
    /// Server-side files: `pg_read_file`, `lo_export`, COPY to/from a file.
    FileAccess,
    /// `dblink` and friends: the server connects elsewhere.
    Network,
    /// COPY ... PROGRAM: a shell command on the database server.
    CopyProgram,
    /// CREATE / ALTER / DROP EXTENSION, LOAD.
    Extension,
    AlterSystem,
    /// Not parsed or not placed: gets the target's `on_unknown` verdict.
    Unknown,
}

impl SqlClass {
    /// Whether statements of this class can change anything: every class but `read`,
    /// `transaction` and `session` (a session whose rules allow none of them can be opened
    /// read-only at the server).
    pub fn writes(self) -> bool {
        !matches!(
            self,
            SqlClass::Read | SqlClass::Transaction | SqlClass::Session
        )
    }

    pub const ALL: [SqlClass; 24] = [
        SqlClass::Transaction,
        SqlClass::Session,
        SqlClass::Read,
        SqlClass::Lock,
        SqlClass::Notify,
        SqlClass::Insert,
        SqlClass::Update,
        SqlClass::Delete,
        SqlClass::Merge,
        SqlClass::CopyIn,
        SqlClass::Sequence,
        SqlClass::Maintenance,
        SqlClass::Truncate,
        SqlClass::Ddl,
        SqlClass::Grant,
        SqlClass::Role,
        SqlClass::Procedural,
        SqlClass::AdminFunction,
        SqlClass::FileAccess,
        SqlClass::Network,
        SqlClass::CopyProgram,
        SqlClass::Extension,
        SqlClass::AlterSystem,
        SqlClass::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SqlClass::Transaction => "transaction",
            SqlClass::Session => "session",
            SqlClass::Read => "read",
            SqlClass::Lock => "lock",
            SqlClass::Notify => "notify",
            SqlClass::Insert => "insert",
            SqlClass::Update => "update",
            SqlClass::Delete => "delete",
            SqlClass::Merge => "merge",
            SqlClass::CopyIn => "copy_in",
            SqlClass::Sequence => "sequence",
            SqlClass::Maintenance => "maintenance",
            SqlClass::Truncate => "truncate",
            SqlClass::Ddl => "ddl",
            SqlClass::Grant => "grant",
            SqlClass::Role => "role",
            SqlClass::Procedural => "procedural",
            SqlClass::AdminFunction => "admin_function",
            SqlClass::FileAccess => "file_access",
            SqlClass::Network => "network",
            SqlClass::CopyProgram => "copy_program",
            SqlClass::Extension => "extension",
            SqlClass::AlterSystem => "alter_system",
            SqlClass::Unknown => "unknown",
        }
    }

    /// A class name, or a group a rule may name instead of listing classes.
    pub fn parse_set(name: &str) -> Option<Vec<SqlClass>> {
        use SqlClass as C;
        let group: &[SqlClass] = match name {
            "write" => &[
                C::Insert,
                C::Update,
                C::Delete,
                C::Merge,
                C::CopyIn,
                C::Sequence,
                C::Truncate,
            ],
            "privileged" => &[
                C::Grant,
                C::Role,
                C::Procedural,
                C::AdminFunction,
                C::FileAccess,
                C::Network,
                C::CopyProgram,
                C::Extension,
                C::AlterSystem,
            ],
            "any" => &C::ALL[..C::ALL.len() - 1],
            _ => return C::ALL.iter().find(|c| c.name() == name).map(|c| vec![*c]),
        };
        Some(group.to_vec())
    }
}

impl fmt::Display for SqlClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a message does and touches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub classes: BTreeSet<SqlClass>,
    /// Relations read or written, normalized (`schema.table`, unquoted names lowercased).
    pub objects: BTreeSet<String>,
    /// Functions called, normalized (`pg_catalog.` dropped).
    pub functions: BTreeSet<String>,
    /// Functions that alone made the message `unknown` (a policy may vouch for them).
    pub unknown_functions: BTreeSet<String>,
    /// Why the message is `unknown`, besides unknown functions.
    pub unknown_reasons: Vec<String>,
    /// False when part of the message was judged without seeing what it touches (DO, CALL,
    /// keyword fallback): an allow rule that names objects then cannot vouch for it.
    pub objects_complete: bool,
    /// Tables whose rows `objects` share, from the target's catalog (a partition's or an
    /// `INHERITS` child's parents, a parent's children), as `schema.table`: a rule that
    /// restricts (deny, approve, mask) an object touches the statement if it names one of
    /// them; an allow rule must still cover `objects` themselves. Filled by the PostgreSQL
    /// gateway, never by the classifier.
    #[serde(skip)]
    pub kin: BTreeSet<String>,
    pub statements: usize,
    /// Statements this message prepares, by name, with what each would do when executed.
    #[serde(skip)]
    pub prepared: Vec<(String, Arc<Classification>)>,
    /// The message ran a prepared statement: its meaning depends on session state.
    #[serde(skip)]
    pub uses_prepared: bool,
    /// What the message does to the session's named statements and cursors, in order (the
    /// PostgreSQL gateway's model of them follows it; a `FETCH` reads what its cursor holds).
    #[serde(skip)]
    pub names: Vec<NameEffect>,
}

/// One statement's effect on the session's prepared statements and cursors (portals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameEffect {
    /// `PREPARE name AS ...`: what running it would do.
    Prepare {
        name: String,
        what: Arc<Classification>,
    },
    /// `DEALLOCATE name`; `None`: `DEALLOCATE ALL`.
    Deallocate(Option<String>),
    /// `DECLARE name CURSOR [WITH HOLD] FOR query`: what reading it does.
    Declare {
        name: String,
        what: Arc<Classification>,
        hold: bool,
    },
    /// `FETCH ... name`: reads what the cursor holds.
    Fetch(String),
    /// `CLOSE name`; `None`: `CLOSE ALL`.
    Close(Option<String>),
    /// `DISCARD ALL`: every prepared statement and cursor.
    DiscardAll,
    /// `COMMIT`, `ROLLBACK` (to a savepoint too): the transaction's cursors (those not
    /// declared `WITH HOLD`) are closed.
    EndTransaction,
}

impl Classification {
    pub(super) fn unknown(reason: impl Into<String>) -> Self {
        let mut c = Self::default();
        c.classes.insert(SqlClass::Unknown);
        c.unknown_reasons.push(reason.into());
        c
    }

    /// The most consequential class, `None` for an empty message.
    pub fn headline(&self) -> Option<SqlClass> {
        self.classes.iter().next_back().copied()
    }

    /// Adds what `other` does (its session-name effects excepted).
    pub fn merge(&mut self, other: &Classification) {
        self.classes.extend(other.classes.iter().copied());
        self.objects.extend(other.objects.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.unknown_functions
            .extend(other.unknown_functions.iter().cloned());
        self.unknown_reasons
            .extend(other.unknown_reasons.iter().cloned());
        self.objects_complete &= other.objects_complete;
    }
}

/// What each prepared-statement name of a session was prepared as. The protocol handler keeps
/// one per session: from `PREPARE` (see [`Classification::prepared`]) and from extended-protocol
/// Parse messages, and removes names on `DEALLOCATE` / Close.
#[derive(Debug, Default, Clone)]
pub struct PreparedStatements {
    by_name: HashMap<String, Arc<Classification>>,
}

impl PreparedStatements {
    /// Most names a session may hold; past it, new names are not recorded (and so their
    /// `EXECUTE` is unknown: fail closed, bounded memory).
    pub const MAX: usize = 4096;

    pub fn insert(&mut self, name: &str, what: Arc<Classification>) {
        if self.by_name.len() < Self::MAX || self.by_name.contains_key(name) {
            self.by_name.insert(name.to_string(), what);
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Classification>> {
        self.by_name.get(name)
    }
}

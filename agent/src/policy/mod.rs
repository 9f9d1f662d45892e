//! The policy engine: rules from TOML files, evaluated per request into a [`Decision`].
//!
//! Evaluation is pure ([`PolicySet::evaluate`] does no I/O) and order-independent: every rule
//! that matches is collected, then deny beats approve beats allow, and with none of them the
//! target's default applies. Two principles keep it fail closed:
//!
//! - **Allow must cover, deny need only touch.** A request can have several parts (the classes
//!   and objects of a multi-statement SQL message, the commands of an SSH line). An allow rule
//!   matches only if it covers *every* part; a deny, approve or mask rule matches if it touches
//!   *any* part. Likewise a fact we do not know (an exe that vanished, a Kubernetes list across
//!   all namespaces) never satisfies an allow matcher and always satisfies a restricting one.
//! - **Never allow what could not be judged.** A request whose meaning is unknown (unparsed
//!   SQL, a shell expansion, an ambiguous URL) gets the target's `on_unknown` verdict (default
//!   deny); allow rules do not apply to it.
//!
//! See `policies/README.md` for the file format.

#[cfg(test)]
mod cache_tests;
pub mod cli;
mod eval;
#[cfg(test)]
mod example_tests;
pub mod file;
pub mod mask;
pub mod matchers;
pub mod reload;
pub mod sql;
mod sql_cache;
mod sql_class;
pub mod sql_copy;
mod sql_functions;
mod sql_settings;
mod sql_utility;
mod sql_walk;
#[cfg(test)]
mod tests;

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

pub use self::{
    file::{load_dir, parse_file, PolicyFileError},
    mask::{MaskRule, MaskStyle, Masker},
    reload::{watch, PolicyHandle, PolicyStatus},
    sql::{classify, Classification, NameEffect, PreparedStatements, SqlClass},
    sql_cache::SqlCache,
    sql_class::fold_identifier,
    sql_settings::{login_hazard, split_identifier_list},
};
use crate::{identity::ProcessIdentity, protocol::Protocol};
use matchers::{ArgvPattern, Glob};

/// Where policy files live unless configured otherwise.
pub const DEFAULT_POLICY_DIR: &str = "/etc/bulkhead/policies";
/// How long an approval is waited for when neither rule nor target says.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_mins(5);

/// What happens to a request. Ordered: a later variant beats an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    /// Hold the request until a human approves it, or the timeout denies it.
    Approve,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        })
    }
}

/// Enforce decisions, or only record what would have been enforced (for rollout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Observe,
    Enforce,
}

/// The target a request goes to.
#[derive(Debug, Clone, Copy)]
pub struct TargetRef<'a> {
    pub name: &'a str,
    pub protocol: Protocol,
}

/// One request to judge.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub target: TargetRef<'a>,
    pub identity: &'a ProcessIdentity,
    pub action: Action<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Opening the connection. On a `tcp` target (opaque, nothing finer to judge) the target's
    /// default applies when no rule decides; on a protocol target a session grants nothing by
    /// itself, so only rules without a request section decide and the fallback is allow.
    Connect,
    /// A simple-query message; `prepared` resolves `EXECUTE name`.
    Sql {
        text: &'a str,
        prepared: Option<&'a PreparedStatements>,
    },
    /// A statement the handler classified earlier (an extended-protocol Parse, run by Execute).
    SqlClassified(&'a Arc<Classification>),
    SshExec {
        command: &'a str,
    },
    /// An interactive SSH shell (judged as a whole: what is typed is recorded, not judged).
    SshShell,
    /// An sftp file operation on `path` (as the client sent it): reading or listing, or
    /// anything that changes the file system (`write`).
    Sftp {
        write: bool,
        path: &'a str,
    },
    /// A tunnel or forwarding an SSH client asks for: refused unless a rule names it (neither
    /// a target's default nor a rule without an `ssh` section allows one).
    SshForward {
        kind: SshForward,
        /// Where to (`Local`) or where the target listens (`Remote`); empty for `Agent`.
        host: &'a str,
        port: u32,
    },
    /// An environment variable an SSH client sends (`SendEnv`, `SetEnv`): refused unless a rule
    /// names it, since it can change what the remote login shell runs.
    SshEnv {
        name: &'a str,
    },
    Http {
        method: &'a str,
        host: &'a str,
        /// The request target as sent (`/path?query`).
        path: &'a str,
    },
    Kube {
        verb: &'a str,
        /// The API group: `Some("")` for the core group (`/api/v1`), `None` for a request
        /// that is not about a resource (discovery, `/version`).
        group: Option<&'a str>,
        resource: &'a str,
        subresource: Option<&'a str>,
        /// `None`: cluster-scoped, or across all namespaces.
        namespace: Option<&'a str>,
        /// `None`: the whole collection.
        name: Option<&'a str>,
    },
    /// A request its gateway could not read the way the target will (an HTTP path with an
    /// encoded slash, a Kubernetes path the request-info parser cannot place): `on_unknown`.
    Unknown {
        why: &'a str,
    },
}

/// The kinds of SSH forwarding ([`Action::SshForward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshForward {
    /// A direct-tcpip channel (`ssh -L`, `-D`, `-W`, `-J`): the target connects to host:port.
    Local,
    /// A tcpip-forward request (`ssh -R`): the target listens on host:port.
    Remote,
    /// Agent forwarding (`ssh -A`).
    Agent,
    /// X11 forwarding (`ssh -X`, `-Y`).
    X11,
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Matching rules decided.
    Rules,
    /// The request could not be judged: the target's `on_unknown` verdict.
    Unknown,
    /// No allow, approve or deny rule matched: the target's default.
    Default,
}

/// The outcome of [`PolicySet::evaluate`], complete enough to enforce and to record.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// What to enforce. `Allow` in observe mode, whatever was decided.
    pub verdict: Verdict,
    /// What the policy decided.
    pub decided: Verdict,
    pub basis: Basis,
    /// Ids of the rules behind `decided` (all of them, sorted), or `target:NAME:default` /
    /// `target:NAME:on_unknown` for the target's own verdicts.
    pub rules: Vec<String>,
    /// For the client when denied.
    pub message: Option<String>,
    /// How long to hold for approval when `decided` is approve.
    #[serde(serialize_with = "serialize_opt_duration")]
    pub approval_timeout: Option<Duration>,
    /// Masks for the result data. Apply them unless `observe_only` (observe mode records
    /// them without changing what the client sees).
    pub masks: Vec<Arc<MaskRule>>,
    /// Observe mode turned a deny, an approval or a mask into a record only.
    pub observe_only: bool,
    /// What the SQL does, for SQL requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<Arc<Classification>>,
    /// Why the request could not be judged, when `basis` is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

#[expect(
    clippy::ref_option,
    reason = "the signature serde's serialize_with requires"
)]
fn serialize_opt_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// Where a rule or setting was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone)]
pub enum Effect {
    Verdict(Verdict),
    Mask(Arc<MaskRule>),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub origin: Origin,
    pub description: Option<String>,
    pub effect: Effect,
    pub message: Option<String>,
    pub approval_timeout: Option<Duration>,
    pub target: TargetMatch,
    pub identity: IdentityMatch,
    pub request: RequestMatch,
}

#[derive(Debug, Clone, Default)]
pub struct TargetMatch {
    pub names: Vec<Glob>,
    pub protocols: Vec<Protocol>,
}

/// Every field given must match (and); within a field, any pattern (or).
#[derive(Debug, Clone, Default)]
pub struct IdentityMatch {
    pub uids: Vec<u32>,
    pub users: Vec<Glob>,
    /// The process name (comm) or the executable's file name.
    pub processes: Vec<Glob>,
    pub exes: Vec<Glob>,
    /// Any ancestor's name or executable (a pattern with `/` is matched against the exe path).
    pub ancestors: Vec<Glob>,
    pub cgroups: Vec<Glob>,
    pub units: Vec<Glob>,
}

#[derive(Debug, Clone, Default)]
pub enum RequestMatch {
    /// No request matcher: every action on a matching target, including the connection.
    #[default]
    Any,
    Sql(SqlMatch),
    Ssh(SshMatch),
    Http(HttpMatch),
    Kube(KubeMatch),
}

#[derive(Debug, Clone, Default)]
pub struct SqlMatch {
    /// `None`: any class.
    pub classes: Option<Vec<SqlClass>>,
    pub objects: Vec<ObjectPattern>,
    pub functions: Vec<Glob>,
}

/// `schema.table` glob; `table_part` lets a restricting rule catch an unqualified name in any
/// schema (the search path decides which one it is).
#[derive(Debug, Clone)]
pub struct ObjectPattern {
    pub full: Glob,
    pub table_part: Option<Glob>,
}

#[derive(Debug, Clone, Default)]
pub struct SshMatch {
    pub commands: Vec<ArgvPattern>,
    pub regexes: Vec<regex::Regex>,
    /// Matches interactive shells (`ssh = { shell = true }`).
    pub shell: bool,
    /// sftp paths that may be read or listed / written (`sftp = { read = [...], write = [...] }`).
    pub sftp_read: Vec<Glob>,
    pub sftp_write: Vec<Glob>,
    /// direct-tcpip destinations (`forward = ["db.internal:5432"]`), as `host:port`.
    pub forward: Vec<Glob>,
    /// tcpip-forward listen addresses on the target (`remote_forward = ["localhost:*"]`).
    pub remote_forward: Vec<Glob>,
    /// Agent forwarding (`agent = true`).
    pub agent: bool,
    /// X11 forwarding (`x11 = true`).
    pub x11: bool,
    /// Environment variable names (`env = ["LANG", "LC_*"]`).
    pub env: Vec<Glob>,
}

#[derive(Debug, Clone, Default)]
pub struct HttpMatch {
    pub methods: Vec<String>,
    pub hosts: Vec<Glob>,
    pub paths: Vec<Glob>,
}

#[derive(Debug, Clone, Default)]
pub struct KubeMatch {
    pub verbs: Vec<Glob>,
    /// API groups (`""` is the core group); a request with no group matches none.
    pub groups: Vec<Glob>,
    pub resources: Vec<Glob>,
    pub subresources: Vec<Glob>,
    pub namespaces: Vec<Glob>,
    pub names: Vec<Glob>,
}

/// Per-target settings from a `[[target]]` table: which targets by name and/or protocol.
#[derive(Debug, Clone)]
pub struct TargetSettings {
    pub name: Option<Glob>,
    pub protocol: Option<Protocol>,
    pub default: Verdict,
    pub on_unknown: Verdict,
    pub mode: Mode,
    pub approval_timeout: Duration,
    /// Functions vouched for as read-only on these targets (beyond the built-in list).
    pub read_only_functions: Vec<Glob>,
    pub origin: Option<Origin>,
}

impl TargetSettings {
    /// What applies to a target no `[[target]]` table names: deny, deny unknowns, enforce.
    pub fn fallback() -> Self {
        Self {
            name: None,
            protocol: None,
            default: Verdict::Deny,
            on_unknown: Verdict::Deny,
            mode: Mode::Enforce,
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
            read_only_functions: Vec::new(),
            origin: None,
        }
    }
}

/// A validated set of rules and target settings, loaded from one directory.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub rules: Vec<Rule>,
    pub targets: Vec<TargetSettings>,
    pub files: Vec<PathBuf>,
    cache: Arc<SqlCache>,
    /// Whether a rule that restricts names SQL objects ([`PolicySet::restricts_sql_objects`]),
    /// worked out once: the PostgreSQL gateway asks per statement.
    restricts_sql_objects: bool,
}

impl PolicySet {
    pub fn new(rules: Vec<Rule>, targets: Vec<TargetSettings>, files: Vec<PathBuf>) -> Self {
        let restricts_sql_objects = rules.iter().any(|r| {
            !matches!(r.effect, Effect::Verdict(Verdict::Allow))
                && matches!(&r.request, RequestMatch::Sql(m) if !m.objects.is_empty())
        });
        Self {
            rules,
            targets,
            files,
            cache: Arc::new(SqlCache::default()),
            restricts_sql_objects,
        }
    }

    /// No rules: everything is denied (what the daemon runs with before a valid load).
    pub fn deny_all() -> Self {
        Self::new(Vec::new(), Vec::new(), Vec::new())
    }

    /// Shares a classification cache (across reloads: classification does not depend on rules).
    #[must_use]
    pub fn with_cache(mut self, cache: Arc<SqlCache>) -> Self {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> &Arc<SqlCache> {
        &self.cache
    }

    /// Classifies without the cache (for benchmarks and tests).
    #[must_use]
    pub fn without_cache(mut self) -> Self {
        self.cache = Arc::new(SqlCache::disabled());
        self
    }
}

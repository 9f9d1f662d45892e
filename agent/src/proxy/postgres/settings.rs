//! A PostgreSQL target's own settings (`[target.postgres]` in the configuration): whom the
//! gateway logs in as upstream, how it may authenticate, and TLS to the target. The
//! configuration parses them; the gateway applies them.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

use crate::{credentials::CredentialRef, policy::matchers::Glob};

/// How the gateway logs in to a PostgreSQL target. Unset fields take the client's own
/// startup values (the user and database it asked for).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTarget {
    pub user: Option<String>,
    pub database: Option<String>,
    /// How the server may have the gateway authenticate (libpq's `require_auth`): a server that
    /// asks for anything else is not answered, nothing derived from the password is sent.
    #[serde(default = "default_auth")]
    pub auth: Vec<AuthMethod>,
    /// Log in (with the held credentials) at any address of the target's networks, not only at
    /// the `IP:PORT` addresses it names.
    #[serde(default)]
    pub login_to_network: bool,
    /// TLS to the target: `disable` (default) or `verify-full` (the server's certificate must
    /// chain to `ca` and name `server_name`, or the target's address).
    #[serde(default)]
    pub tls: UpstreamTls,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    /// Client user/database → upstream login, first match wins. When there are entries, a
    /// client that matches none is refused.
    #[serde(default)]
    pub map: Vec<PostgresMapping>,
}

impl Default for PostgresTarget {
    fn default() -> Self {
        Self {
            user: None,
            database: None,
            auth: default_auth(),
            login_to_network: false,
            tls: UpstreamTls::default(),
            ca: None,
            server_name: None,
            map: Vec::new(),
        }
    }
}

fn default_auth() -> Vec<AuthMethod> {
    vec![AuthMethod::ScramSha256]
}

/// A way the gateway may authenticate to a target, by libpq's `require_auth` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AuthMethod {
    /// SCRAM-SHA-256: the password never crosses the wire, and the server proves it knows it.
    ScramSha256,
    /// md5: a hash of the password salted by the server, from which whoever asks can guess the
    /// password offline at md5's speed.
    Md5,
    /// The password itself, in cleartext (readable on the way unless TLS protects it).
    Password,
    /// No authentication at all: the server logs the gateway in without asking (pg_hba
    /// `trust`), proving nothing about being the target.
    None,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 4] = [
        AuthMethod::ScramSha256,
        AuthMethod::Md5,
        AuthMethod::Password,
        AuthMethod::None,
    ];

    /// The name in `postgres.auth` (and in libpq's `require_auth`).
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
            AuthMethod::None => "none",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for AuthMethod {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        if let Some(m) = AuthMethod::ALL.into_iter().find(|m| m.name() == name) {
            return Ok(m);
        }
        let known = AuthMethod::ALL.map(|m| format!("\"{m}\"")).join(", ");
        Err(match name.as_str() {
            "trust" => format!(
                "postgres.auth: a server that asks for no password is \"none\" here (libpq's name for pg_hba's trust); one of {known}"
            ),
            _ => format!("postgres.auth: {name:?} is not a method the gateway knows; one of {known}"),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    #[default]
    Disable,
    VerifyFull,
}

/// One `[[target.postgres.map]]` entry: clients it covers and whom the gateway logs in as.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresMapping {
    /// The user the client asked for; absent: any.
    pub client_user: Option<ClientPattern>,
    /// The database the client asked for (its user name when it asked for none); absent: any.
    pub client_database: Option<ClientPattern>,
    /// The upstream user; absent: the target's `postgres.user`, else the client's.
    pub user: Option<String>,
    /// The upstream database; absent: the target's `postgres.database`, else the client's.
    pub database: Option<String>,
    /// The upstream user's password; absent: the target's `credentials`.
    pub credentials: Option<CredentialRef>,
}

/// A name or a glob (`*` any run, `?` one character, `\` escapes) matched against a client's
/// startup value, case-sensitively as PostgreSQL compares role and database names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ClientPattern(Glob);

impl ClientPattern {
    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

impl TryFrom<String> for ClientPattern {
    type Error = String;
    fn try_from(pattern: String) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err(
                "an empty pattern matches no client; leave the key out to match any".into(),
            );
        }
        Glob::new(&pattern, None, false).map(ClientPattern)
    }
}

/// Whom the gateway logs in to a PostgreSQL target as, for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresLogin<'a> {
    pub user: String,
    pub database: String,
    pub credentials: Option<&'a CredentialRef>,
    /// The `postgres.map` entry (0-based) that chose this login; `None`: the target's own.
    pub mapping: Option<usize>,
}

impl PostgresTarget {
    /// The upstream login for a client that asked for `client_user` and `client_database`:
    /// the first `map` entry that matches both, or with no entries the target's own. What an
    /// entry leaves out is the target's `user` / `database` / `credentials` (the target's
    /// `credentials` key, passed in), and a user or database the target leaves out is the
    /// client's. `None` when there are entries and none matches: the connection is refused.
    pub fn login<'a>(
        &'a self,
        target_credentials: Option<&'a CredentialRef>,
        client_user: &str,
        client_database: &str,
    ) -> Option<PostgresLogin<'a>> {
        let default_user = || self.user.clone().unwrap_or_else(|| client_user.into());
        let default_database = || {
            self.database
                .clone()
                .unwrap_or_else(|| client_database.into())
        };
        if self.map.is_empty() {
            return Some(PostgresLogin {
                user: default_user(),
                database: default_database(),
                credentials: target_credentials,
                mapping: None,
            });
        }
        let (i, m) = self.map.iter().enumerate().find(|(_, m)| {
            m.client_user
                .as_ref()
                .is_none_or(|p| p.is_match(client_user))
                && m.client_database
                    .as_ref()
                    .is_none_or(|p| p.is_match(client_database))
        })?;
        Some(PostgresLogin {
            user: m.user.clone().unwrap_or_else(default_user),
            database: m.database.clone().unwrap_or_else(default_database),
            credentials: m.credentials.as_ref().or(target_credentials),
            mapping: Some(i),
        })
    }

    /// The first problem in these settings, as the key under `postgres.` and what is wrong.
    /// `target_credentials`: whether the target itself holds credentials.
    pub fn problem(&self, target_credentials: bool) -> Option<(String, String)> {
        if self.auth.is_empty() {
            return Some((
                "auth".into(),
                "allows no way to log in; leave the key out for the default, [\"scram-sha-256\"]"
                    .into(),
            ));
        }
        if self.tls == UpstreamTls::VerifyFull && self.ca.is_none() {
            return Some((
                "ca".into(),
                "tls = \"verify-full\" needs the CA that signed the target's certificate".into(),
            ));
        }
        for (j, m) in self.map.iter().enumerate() {
            let key = |field: &str| format!("map[{j}].{field}");
            for (field, value) in [("user", &m.user), ("database", &m.database)] {
                if value.as_deref() == Some("") {
                    return Some((
                        key(field),
                        format!("must name a {field}; leave the key out for the default"),
                    ));
                }
            }
            if let Some((field, problem)) = m.credentials.as_ref().and_then(CredentialRef::problem)
            {
                return Some((key(&format!("credentials.{field}")), problem.into()));
            }
        }
        // A login without a password succeeds only where the server asks for none.
        let passwordless = !target_credentials
            && (self.map.is_empty() || self.map.iter().any(|m| m.credentials.is_none()));
        if passwordless && !self.auth.contains(&AuthMethod::None) {
            return Some((
                "auth".into(),
                "the gateway holds no password for this target (no credentials), so it can only \
                 log in where the server asks for none: add credentials, or add \"none\" to auth"
                    .into(),
            ));
        }
        None
    }
}

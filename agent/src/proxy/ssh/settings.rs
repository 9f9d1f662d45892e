//! An SSH target's own settings (`[target.ssh]` in the configuration): whom the gateway logs in
//! as upstream, with which held credential, and how the target's host key is verified.

use std::path::PathBuf;

use serde::Deserialize;

use crate::{credentials::CredentialRef, proxy::postgres::settings::ClientPattern};

/// The most warm upstream connections per key (`pool.rs`), whatever a target's `ssh.pool` says.
pub const MAX_PER_KEY: u8 = 2;

/// How the gateway logs in to an SSH target.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshTarget {
    /// The upstream user; absent: the user the client asked for.
    pub user: Option<String>,
    /// A private key file (OpenSSH format, unencrypted) the gateway logs in with; absent: the
    /// password of the target's `credentials`.
    pub key: Option<PathBuf>,
    /// The target's known host keys (OpenSSH `known_hosts` format).
    pub known_hosts: PathBuf,
    /// `strict` (default): a host not in `known_hosts` is refused. `tofu`: the first key seen
    /// is added to `known_hosts` (and recorded); later ones must match it.
    #[serde(default)]
    pub host_key: HostKeyCheck,
    /// Client user → upstream login, first match wins. When there are entries, a client that
    /// matches none is refused.
    #[serde(default)]
    pub map: Vec<SshMapping>,
    /// Record what is typed into shells (terminal input) besides what they show; `false`
    /// records output only.
    #[serde(default = "record_input_default")]
    pub record_input: bool,
    /// Warm upstream connections kept per (target, upstream login), logged in before a client
    /// asks (0 to 2; 0: none, each session connects when its client logs in).
    #[serde(default = "pool_default")]
    pub pool: u8,
}

fn pool_default() -> u8 {
    1
}

fn record_input_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKeyCheck {
    #[default]
    Strict,
    Tofu,
}

/// One `[[target.ssh.map]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshMapping {
    /// The user the client asked for; absent: any.
    pub client_user: Option<ClientPattern>,
    /// The upstream user; absent: the target's `ssh.user`, else the client's.
    pub user: Option<String>,
    /// The upstream user's key; absent: the target's `ssh.key`.
    pub key: Option<PathBuf>,
    /// The upstream user's password; absent: the target's `credentials`.
    pub credentials: Option<CredentialRef>,
}

/// The credential the gateway logs in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshCredential<'a> {
    Key(&'a std::path::Path),
    Password(&'a CredentialRef),
}

/// Whom the gateway logs in to an SSH target as, for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLogin<'a> {
    pub user: String,
    pub credential: SshCredential<'a>,
    /// The `ssh.map` entry (0-based) that chose this login; `None`: the target's own.
    pub mapping: Option<usize>,
}

impl SshTarget {
    /// The upstream login for a client that asked for `client_user`. A key is preferred over a
    /// password at each level (map entry, then target). `None` when there are map entries and
    /// none matches, or when no credential is held for the login.
    pub fn login<'a>(
        &'a self,
        target_credentials: Option<&'a CredentialRef>,
        client_user: &str,
    ) -> Option<SshLogin<'a>> {
        let default_user = || self.user.clone().unwrap_or_else(|| client_user.into());
        let target_credential = self
            .key
            .as_deref()
            .map(SshCredential::Key)
            .or(target_credentials.map(SshCredential::Password));
        if self.map.is_empty() {
            return Some(SshLogin {
                user: default_user(),
                credential: target_credential?,
                mapping: None,
            });
        }
        let (i, m) = self.map.iter().enumerate().find(|(_, m)| {
            m.client_user
                .as_ref()
                .is_none_or(|p| p.is_match(client_user))
        })?;
        let credential = m
            .key
            .as_deref()
            .map(SshCredential::Key)
            .or(m.credentials.as_ref().map(SshCredential::Password))
            .or(target_credential)?;
        Some(SshLogin {
            user: m.user.clone().unwrap_or_else(default_user),
            credential,
            mapping: Some(i),
        })
    }

    /// The first problem in these settings, as the key under `ssh.` and what is wrong.
    /// `target_credentials`: whether the target itself holds a password.
    pub fn problem(&self, target_credentials: bool) -> Option<(String, String)> {
        let target_holds = target_credentials || self.key.is_some();
        if self.map.is_empty() && !target_holds {
            return Some((
                "key".into(),
                "an SSH target needs a held credential: ssh.key (a private key file) or the \
                 target's credentials (a password)"
                    .into(),
            ));
        }
        for (i, m) in self.map.iter().enumerate() {
            if m.user.as_deref() == Some("") {
                return Some((format!("map[{i}].user"), "must not be empty".into()));
            }
            if m.key.is_none() && m.credentials.is_none() && !target_holds {
                return Some((
                    format!("map[{i}].key"),
                    "this entry holds no credential and the target holds none".into(),
                ));
            }
            if let Some((field, problem)) = m.credentials.as_ref().and_then(CredentialRef::problem)
            {
                return Some((format!("map[{i}].credentials.{field}"), problem.into()));
            }
        }
        if self.user.as_deref() == Some("") {
            return Some(("user".into(), "must not be empty".into()));
        }
        if self.pool > MAX_PER_KEY {
            return Some(("pool".into(), "at most 2 warm connections per login".into()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> SshTarget {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn login_prefers_the_map_then_the_target_and_refuses_unmatched_clients() {
        let t = target(
            "known_hosts = \"/k\"\nkey = \"/t.key\"\n\
             [[map]]\nclient_user = \"ci-*\"\nuser = \"deploy\"\nkey = \"/deploy.key\"\n\
             [[map]]\nclient_user = \"alice\"\n",
        );
        let pw = CredentialRef::Env("PW".into());
        let l = t.login(Some(&pw), "ci-7").unwrap();
        assert_eq!(l.user, "deploy");
        assert_eq!(
            l.credential,
            SshCredential::Key(std::path::Path::new("/deploy.key"))
        );
        let l = t.login(Some(&pw), "alice").unwrap();
        assert_eq!((l.user.as_str(), l.mapping), ("alice", Some(1)));
        assert_eq!(
            l.credential,
            SshCredential::Key(std::path::Path::new("/t.key"))
        );
        assert!(t.login(Some(&pw), "mallory").is_none());
        let plain = target("known_hosts = \"/k\"\nuser = \"svc\"\n");
        assert_eq!(
            plain.login(Some(&pw), "x").unwrap().credential,
            SshCredential::Password(&pw)
        );
        assert!(plain.login(None, "x").is_none(), "no credential held");
        assert_eq!(plain.host_key, HostKeyCheck::Strict);
    }

    #[test]
    fn problems_name_the_key() {
        let t = target("known_hosts = \"/k\"\n");
        assert_eq!(t.problem(false).unwrap().0, "key");
        assert!(t.problem(true).is_none());
        let t = target("known_hosts = \"/k\"\n[[map]]\nuser = \"\"\nkey = \"/a\"\n");
        assert_eq!(t.problem(false).unwrap().0, "map[0].user");
        let t = target("known_hosts = \"/k\"\nkey = \"/a\"\npool = 3\n");
        assert_eq!(t.problem(false).unwrap().0, "pool");
        assert!(toml::from_str::<SshTarget>("host_key = \"tofu\"\n").is_err());
        assert!(toml::from_str::<SshTarget>("known_hosts = \"/k\"\nhost_key = \"lax\"\n").is_err());
    }
}

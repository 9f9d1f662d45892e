//! Warm upstream connections: connected, host key verified and logged in with the held
//! credential before a client asks, so a client's login does not wait for the gateway's own
//! handshake with the target.
//!
//! A warm connection is made for one [`PoolKey`] (target, address, the target's whole `ssh`
//! settings, upstream user, credential) and taken by exactly one client session, which
//! disconnects it at its end: it is never shared and never goes back. A key is warmed only
//! after a session used it (no connection to every configured target at start); each take
//! starts a refill in the background. At most [`SshTarget::pool`] per key; dropped after
//! [`IDLE_AGE`]. Taking re-checks what was true at login: the connection is still open, the
//! credential file is the same file with the same contents stamp, and the host key the target
//! presented is still in `known_hosts`; anything else is dropped and the session connects
//! afresh. The threat model is in docs/ARCHITECTURE.md ("SSH: warm upstream connections").

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::conn_log::debug;
use tokio::sync::mpsc;

use super::{
    settings::{HostKeyCheck, SshCredential, SshLogin, SshTarget, MAX_PER_KEY},
    upstream::{self, FromTarget, HostKeyOutcome, Upstream},
};
use crate::credentials::CredentialRef;

/// How long a warm connection waits for a session before it is dropped.
pub const IDLE_AGE: Duration = Duration::from_mins(1);

/// What a warm connection was made for; a session takes only one made for the key it needs.
/// The whole `ssh` settings are part of it, so a configuration change (reload) is another key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub target: String,
    pub addr: SocketAddr,
    pub settings: SshTarget,
    pub user: String,
    pub credential: HeldCredential,
}

/// [`SshCredential`], owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldCredential {
    Key(PathBuf),
    Password(CredentialRef),
}

impl PoolKey {
    pub fn new(target: &str, addr: SocketAddr, settings: &SshTarget, login: &SshLogin<'_>) -> Self {
        Self {
            target: target.into(),
            addr,
            settings: settings.clone(),
            user: login.user.clone(),
            credential: match login.credential {
                SshCredential::Key(p) => HeldCredential::Key(p.to_path_buf()),
                SshCredential::Password(c) => HeldCredential::Password(c.clone()),
            },
        }
    }

    pub fn login(&self) -> SshLogin<'_> {
        SshLogin {
            user: self.user.clone(),
            credential: match &self.credential {
                HeldCredential::Key(p) => SshCredential::Key(p),
                HeldCredential::Password(c) => SshCredential::Password(c),
            },
            mapping: None,
        }
    }

    fn per_key(&self) -> usize {
        usize::from(self.settings.pool.min(MAX_PER_KEY))
    }

    /// The same target, address and settings (any upstream login).
    fn same_target(&self, target: &str, addr: SocketAddr, settings: &SshTarget) -> bool {
        self.target == target && self.addr == addr && &self.settings == settings
    }
}

/// Which file a credential was read from, as it was: a rewritten or replaced file (a rotated
/// key or password) differs. `None` for a credential that is not a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CredentialStamp(Option<(u64, u64, u64, i64, i64, i64, i64)>);

impl CredentialStamp {
    fn of(credential: &HeldCredential) -> Result<Self, String> {
        let path: &Path = match credential {
            HeldCredential::Key(p) | HeldCredential::Password(CredentialRef::File(p)) => p,
            HeldCredential::Password(CredentialRef::Env(_)) => return Ok(Self(None)),
        };
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self(Some((
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ))))
    }
}

/// A warm connection, logged in.
struct Warm {
    id: u64,
    key: PoolKey,
    stamp: CredentialStamp,
    upstream: Upstream,
    from_target: mpsc::Receiver<FromTarget>,
    since: Instant,
}

/// What a session takes from the pool.
pub struct Taken {
    pub upstream: Upstream,
    pub from_target: mpsc::Receiver<FromTarget>,
    /// How long ago it logged in.
    pub age: Duration,
}

#[derive(Default)]
struct Inner {
    warm: Vec<Warm>,
    /// Keys with a fill under way (one at a time per key).
    filling: Vec<PoolKey>,
    next_id: u64,
}

/// The SSH gateway's warm connections, shared by all its sessions.
#[derive(Default, Clone)]
pub struct Pool {
    inner: Arc<Mutex<Inner>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a connection for this target (any login) is waiting and still valid: then the
    /// session need not start one of its own before the client logs in. Invalid ones found
    /// are dropped (a session then connects itself, and a changed host key is refused with the
    /// reason as the client's banner).
    pub fn has_warm(&self, target: &str, addr: SocketAddr, settings: &SshTarget) -> bool {
        let candidates: Vec<Warm> = {
            let mut inner = self.lock();
            let (mine, others) = std::mem::take(&mut inner.warm)
                .into_iter()
                .partition(|w| w.key.same_target(target, addr, settings));
            inner.warm = others;
            mine
        };
        let mut found = false;
        let mut keep = Vec::with_capacity(candidates.len());
        for w in candidates {
            match still_valid(&w) {
                Ok(()) => {
                    found = true;
                    keep.push(w);
                }
                Err(why) => {
                    debug!(target, why, "warm SSH connection dropped");
                    drop_connection(w.upstream);
                }
            }
        }
        self.lock().warm.extend(keep);
        found
    }

    /// Takes a warm connection for `key` that is still what it was at login; those that are
    /// not are dropped. Starts a refill.
    pub fn take(&self, key: &PoolKey) -> Option<Taken> {
        let taken = loop {
            let warm = {
                let mut inner = self.lock();
                let i = inner.warm.iter().position(|w| &w.key == key)?;
                inner.warm.swap_remove(i)
            };
            match still_valid(&warm) {
                Ok(()) => break warm,
                Err(why) => {
                    debug!(target = %key.target, why, "warm SSH connection dropped");
                    drop_connection(warm.upstream);
                }
            }
        };
        self.fill(key.clone());
        let Warm {
            upstream,
            mut from_target,
            since,
            ..
        } = taken;
        // Channels the target opened while nobody held the connection belong to no session:
        // dropping them rejects them.
        while from_target.try_recv().is_ok() {}
        Some(Taken {
            upstream,
            from_target,
            age: since.elapsed(),
        })
    }

    /// Warms one more connection for `key` in the background, unless it has its share (or a
    /// fill is under way). Connections for the same target under other settings (a reload
    /// changed them) are dropped.
    pub fn fill(&self, key: PoolKey) {
        let per_key = key.per_key();
        {
            let mut inner = self.lock();
            let stale: Vec<Warm> = {
                let (stale, keep) = std::mem::take(&mut inner.warm)
                    .into_iter()
                    .partition(|w| w.key.target == key.target && w.key.settings != key.settings);
                inner.warm = keep;
                stale
            };
            for w in stale {
                drop_connection(w.upstream);
            }
            let have = inner.warm.iter().filter(|w| w.key == key).count();
            if per_key == 0 || have >= per_key || inner.filling.contains(&key) {
                return;
            }
            inner.filling.push(key.clone());
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let warmed = warm_up(&key).await;
            let id = {
                let mut inner = pool.lock();
                inner.filling.retain(|k| k != &key);
                match warmed {
                    Ok((stamp, upstream, from_target)) => {
                        let id = inner.next_id;
                        inner.next_id += 1;
                        inner.warm.push(Warm {
                            id,
                            key: key.clone(),
                            stamp,
                            upstream,
                            from_target,
                            since: Instant::now(),
                        });
                        id
                    }
                    Err(why) => {
                        debug!(target = %key.target, why, "SSH pool fill failed");
                        return;
                    }
                }
            };
            tokio::time::sleep(IDLE_AGE).await;
            let expired = {
                let mut inner = pool.lock();
                inner
                    .warm
                    .iter()
                    .position(|w| w.id == id)
                    .map(|i| inner.warm.swap_remove(i))
            };
            if let Some(w) = expired {
                debug!(target = %key.target, "warm SSH connection idle: dropped");
                drop_connection(w.upstream);
            }
        });
    }
}

/// Connects, verifies and logs in for `key`, as a session would.
async fn warm_up(
    key: &PoolKey,
) -> Result<(CredentialStamp, Upstream, mpsc::Receiver<FromTarget>), String> {
    let stamp = CredentialStamp::of(&key.credential)?;
    let (to_session, from_target) = mpsc::channel(8);
    let mut upstream = upstream::connect(&key.target, &key.settings, key.addr, to_session)
        .await
        .map_err(|(message, _)| message)?;
    upstream::log_in(&mut upstream, &key.login()).await?;
    // The credential read for the login is the one stamped (not one rotated meanwhile).
    if CredentialStamp::of(&key.credential)? != stamp {
        drop_connection(upstream);
        return Err("the credential changed during the login".into());
    }
    Ok((stamp, upstream, from_target))
}

/// Whether a warm connection can be handed to a session: open, not too old, logged in with the
/// credential file as it is now, to a host whose key `known_hosts` still records.
fn still_valid(w: &Warm) -> Result<(), &'static str> {
    if w.since.elapsed() >= IDLE_AGE {
        return Err("idle too long");
    }
    if w.upstream.handle.is_closed() {
        return Err("closed");
    }
    if CredentialStamp::of(&w.key.credential).ok().as_ref() != Some(&w.stamp) {
        return Err("credential file changed");
    }
    let Some(presented) = &w.upstream.host_key else {
        return Err("no host key");
    };
    let host = w.key.addr.ip().to_canonical().to_string();
    let now = upstream::check_host_key(
        &w.key.settings.known_hosts,
        &host,
        w.key.addr.port(),
        presented,
        HostKeyCheck::Strict,
    );
    if now != HostKeyOutcome::Known {
        return Err("host key no longer in known_hosts");
    }
    Ok(())
}

/// Ends a connection no session will use, in the background.
pub fn drop_connection(upstream: Upstream) {
    tokio::spawn(async move {
        let _ = upstream
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> SshTarget {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_key_is_its_settings_and_login_and_a_rewritten_credential_file_is_another_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("held");
        std::fs::write(&key_file, "one").unwrap();
        let s = settings(&format!(
            "known_hosts = \"/k\"\nkey = \"{}\"\nuser = \"root\"\n",
            key_file.display()
        ));
        let addr: SocketAddr = "10.0.0.5:22".parse().unwrap();
        let login = s.login(None, "agent").unwrap();
        let key = PoolKey::new("box", addr, &s, &login);
        assert_eq!(key.login().user, "root");
        assert_eq!(key.login().credential, login.credential);
        assert_eq!(key.per_key(), 1, "one warm connection by default");
        let mut reloaded = s.clone();
        reloaded.record_input = false;
        assert_ne!(
            PoolKey::new("box", addr, &reloaded, &login),
            key,
            "changed settings are another key"
        );
        assert!(key.same_target("box", addr, &s));
        assert!(!key.same_target("box", addr, &reloaded));

        let before = CredentialStamp::of(&key.credential).unwrap();
        assert_eq!(CredentialStamp::of(&key.credential).unwrap(), before);
        std::fs::write(&key_file, "rotated").unwrap();
        assert_ne!(CredentialStamp::of(&key.credential).unwrap(), before);
        std::fs::remove_file(&key_file).unwrap();
        assert!(CredentialStamp::of(&key.credential).is_err());
        assert_eq!(
            CredentialStamp::of(&HeldCredential::Password(CredentialRef::Env("PW".into())))
                .unwrap(),
            CredentialStamp(None)
        );
    }

    #[test]
    fn pool_size_is_capped() {
        let mut s = settings("known_hosts = \"/k\"\nkey = \"/t\"\npool = 9\n");
        let addr: SocketAddr = "10.0.0.5:22".parse().unwrap();
        let key = PoolKey::new("box", addr, &s, &s.login(None, "a").unwrap());
        assert_eq!(key.per_key(), usize::from(MAX_PER_KEY));
        s.pool = 0;
        let key = PoolKey::new("box", addr, &s, &s.login(None, "a").unwrap());
        assert_eq!(key.per_key(), 0);
    }
}

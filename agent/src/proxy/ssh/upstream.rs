//! The gateway's own SSH connection to the target: host key verified against the target's
//! `known_hosts` (strict, or trust on first use when the target says so), then a login with
//! the held credential.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use russh::{
    client,
    keys::{
        known_hosts::{known_host_keys_path, learn_known_hosts_path},
        HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
    },
};
use tokio::net::TcpStream;

use super::settings::{HostKeyCheck, SshCredential, SshLogin, SshTarget};

/// How the target's host key compared with its `known_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyOutcome {
    /// It is recorded there.
    Known,
    /// Not recorded, and the target trusts on first use: now it is (pinned).
    Learned { fingerprint: String },
    /// Not recorded, and the target is strict.
    Unknown { fingerprint: String },
    /// Other keys are recorded for the host: refused.
    Changed {
        presented: String,
        recorded: Vec<String>,
    },
    /// `known_hosts` could not be read or written, or the server presented a certificate.
    Error(String),
}

impl HostKeyOutcome {
    pub fn accepted(&self) -> bool {
        matches!(self, HostKeyOutcome::Known | HostKeyOutcome::Learned { .. })
    }

    /// Why the connection was refused, naming the target.
    pub fn refusal(&self, target: &str, host: &str) -> Option<String> {
        Some(match self {
            HostKeyOutcome::Known | HostKeyOutcome::Learned { .. } => return None,
            HostKeyOutcome::Unknown { fingerprint } => format!(
                "bulkhead: the host key of target {target} ({host}) is not in its known_hosts \
                 (presented {fingerprint}); refused"
            ),
            HostKeyOutcome::Changed {
                presented,
                recorded,
            } => format!(
                "bulkhead: the host key of target {target} ({host}) has changed: known_hosts has \
                 {}, the server presented {presented}; refused",
                recorded.join(", ")
            ),
            HostKeyOutcome::Error(e) => {
                format!("bulkhead: cannot verify the host key of target {target} ({host}): {e}")
            }
        })
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Compares `presented` with what `known_hosts` records for `host`:`port`; with `tofu`, a host
/// with nothing recorded is added.
pub fn check_host_key(
    known_hosts: &Path,
    host: &str,
    port: u16,
    presented: &PublicKey,
    mode: HostKeyCheck,
) -> HostKeyOutcome {
    let recorded = match known_host_keys_path(host, port, known_hosts) {
        Ok(r) => r,
        Err(e) => return HostKeyOutcome::Error(format!("{}: {e}", known_hosts.display())),
    };
    if recorded
        .iter()
        .any(|(_, k)| k.key_data() == presented.key_data())
    {
        return HostKeyOutcome::Known;
    }
    if !recorded.is_empty() {
        return HostKeyOutcome::Changed {
            presented: fingerprint(presented),
            recorded: recorded.iter().map(|(_, k)| fingerprint(k)).collect(),
        };
    }
    match mode {
        HostKeyCheck::Strict => HostKeyOutcome::Unknown {
            fingerprint: fingerprint(presented),
        },
        HostKeyCheck::Tofu => match learn_known_hosts_path(host, port, presented, known_hosts) {
            Ok(()) => HostKeyOutcome::Learned {
                fingerprint: fingerprint(presented),
            },
            Err(e) => HostKeyOutcome::Error(format!("{}: {e}", known_hosts.display())),
        },
    }
}

/// What the host key check found, and the key presented (none for a certificate).
type Checked = (HostKeyOutcome, Option<PublicKey>);

/// The client-side handler: checks the host key; hands the channels the target opens for an
/// allowed `-R` or `-A` to the session task and refuses every other.
pub struct TargetSide {
    known_hosts: std::path::PathBuf,
    host: String,
    port: u16,
    mode: HostKeyCheck,
    outcome: Arc<Mutex<Option<Checked>>>,
    to_session: tokio::sync::mpsc::Sender<FromTarget>,
}

impl client::Handler for TargetSide {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (outcome, key) = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                check_host_key(&self.known_hosts, &self.host, self.port, key, self.mode),
                Some(key.clone()),
            ),
            PublicKeyOrCertificate::Certificate(_) => (
                HostKeyOutcome::Error("the server presented a certificate, not a key".into()),
                None,
            ),
        };
        let accepted = outcome.accepted();
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some((outcome, key));
        Ok(accepted)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // The session task accepts it only for a listen it asked for (an allowed `-R`);
        // dropping `reply` (no session any more) rejects it.
        let _ = self
            .to_session
            .send(FromTarget::Forwarded {
                channel,
                listen: (connected_address.to_string(), connected_port),
                originator: (originator_address.to_string(), originator_port),
                reply,
            })
            .await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let _ = self
            .to_session
            .send(FromTarget::Agent { channel, reply })
            .await;
        Ok(())
    }

    // Every other channel the target might open toward the gateway is refused (russh accepts
    // them by default).

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        channel: russh::Channel<client::Msg>,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let _ = self
            .to_session
            .send(FromTarget::X11 {
                channel,
                originator: (originator_address.to_string(), originator_port),
                reply,
            })
            .await;
        Ok(())
    }
}

/// Channels the target opens toward the gateway, for the session task to judge.
pub enum FromTarget {
    /// A connection to a listen the gateway asked for (`ssh -R`): (address, port) as asked.
    Forwarded {
        channel: russh::Channel<client::Msg>,
        listen: (String, u32),
        originator: (String, u32),
        reply: client::ChannelOpenHandle,
    },
    /// An agent channel (the target's `SSH_AUTH_SOCK` was used).
    Agent {
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
    },
    /// An X11 channel (a program on the target opened its `DISPLAY`).
    X11 {
        channel: russh::Channel<client::Msg>,
        originator: (String, u32),
        reply: client::ChannelOpenHandle,
    },
}

/// How long the target has for its side of the key exchange.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// A connected, host-verified target; not logged in yet.
pub struct Upstream {
    pub handle: client::Handle<TargetSide>,
    pub outcome: HostKeyOutcome,
    /// The key the target presented (and `known_hosts` accepted).
    pub host_key: Option<PublicKey>,
}

/// Connects to `addr`, runs the key exchange and verifies the host key. `Err` is the message
/// for the client and the record, and the host key outcome when the key was the reason.
pub async fn connect(
    target_name: &str,
    ssh: &SshTarget,
    addr: std::net::SocketAddr,
    to_session: tokio::sync::mpsc::Sender<FromTarget>,
) -> Result<Upstream, (String, Option<HostKeyOutcome>)> {
    let host = addr.ip().to_canonical().to_string();
    let port = addr.port();
    let tcp = tokio::time::timeout(
        crate::proxy::UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(addr),
    )
    .await
    .map_err(|_| {
        (
            format!("bulkhead: target {target_name}: connect timed out"),
            None,
        )
    })?
    .map_err(|e| {
        (
            format!("bulkhead: target {target_name}: connect: {e}"),
            None,
        )
    })?;
    let _ = tcp.set_nodelay(true);
    let outcome = Arc::new(Mutex::new(None));
    let handler = TargetSide {
        known_hosts: ssh.known_hosts.clone(),
        host: host.clone(),
        port,
        mode: ssh.host_key,
        outcome: Arc::clone(&outcome),
        to_session,
    };
    let mut config = client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..client::Config::default()
    };
    // Ask only for the key types known_hosts records for the host, so a server with several
    // keys presents one that can be checked.
    if let Ok(recorded) = known_host_keys_path(&host, port, &ssh.known_hosts) {
        let mut algorithms: Vec<_> = recorded.iter().map(|(_, k)| k.algorithm()).collect();
        algorithms.dedup();
        if !algorithms.is_empty() {
            config.preferred.key = algorithms.into();
        }
    }
    let Ok(connected) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client::connect_stream(Arc::new(config), tcp, handler),
    )
    .await
    else {
        return Err((
            format!(
                "bulkhead: target {target_name}: no SSH handshake within {HANDSHAKE_TIMEOUT:?}"
            ),
            None,
        ));
    };
    let seen = outcome
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match (connected, seen) {
        (Ok(handle), Some((outcome, host_key))) if outcome.accepted() => Ok(Upstream {
            handle,
            outcome,
            host_key,
        }),
        (_, Some((outcome, _))) if !outcome.accepted() => Err((
            outcome
                .refusal(target_name, &format!("{host}:{port}"))
                .unwrap_or_default(),
            Some(outcome),
        )),
        (Err(e), _) => Err((
            format!("bulkhead: target {target_name}: SSH handshake: {e}"),
            None,
        )),
        (Ok(_), _) => Err((
            format!("bulkhead: target {target_name}: the host key was never checked"),
            None,
        )),
    }
}

/// Logs in as `login` with its held credential. `Err` is why (without the secret).
pub async fn log_in(upstream: &mut Upstream, login: &SshLogin<'_>) -> Result<(), String> {
    let handle = &mut upstream.handle;
    let result = match login.credential {
        SshCredential::Key(path) => {
            let key = russh::keys::load_secret_key(path, None)
                .map_err(|e| format!("held key {}: {e}", path.display()))?;
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| e.to_string())?
                    .flatten()
            } else {
                None
            };
            handle
                .authenticate_publickey(
                    login.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
        }
        SshCredential::Password(cred) => {
            let password = cred.read_secret()?;
            handle
                .authenticate_password(login.user.clone(), password)
                .await
        }
    };
    match result {
        Ok(r) if r.success() => Ok(()),
        Ok(_) => Err(format!(
            "the target refused the held credential for user {}",
            login.user
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::{ssh_key::private::Ed25519Keypair, PrivateKey};

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
            .public_key()
            .clone()
    }

    #[test]
    fn known_changed_unknown_and_pinned_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let (a, b) = (key(1), key(2));
        std::fs::write(
            &kh,
            format!("[10.0.0.5]:2222 {}\n", a.to_openssh().unwrap()),
        )
        .unwrap();
        let check = |k: &PublicKey, port, mode| check_host_key(&kh, "10.0.0.5", port, k, mode);
        assert_eq!(check(&a, 2222, HostKeyCheck::Strict), HostKeyOutcome::Known);
        let changed = check(&b, 2222, HostKeyCheck::Tofu);
        let HostKeyOutcome::Changed {
            presented,
            recorded,
        } = &changed
        else {
            panic!("{changed:?}")
        };
        assert_eq!(presented, &fingerprint(&b));
        assert_eq!(recorded, &[fingerprint(&a)]);
        let message = changed.refusal("box", "10.0.0.5:2222").unwrap();
        assert!(
            message.contains("box")
                && message.contains(&fingerprint(&a))
                && message.contains(&fingerprint(&b)),
            "{message}"
        );
        assert!(matches!(
            check(&b, 22, HostKeyCheck::Strict),
            HostKeyOutcome::Unknown { .. }
        ));
        assert!(matches!(
            check(&b, 22, HostKeyCheck::Tofu),
            HostKeyOutcome::Learned { .. }
        ));
        assert_eq!(
            check(&b, 22, HostKeyCheck::Strict),
            HostKeyOutcome::Known,
            "pinned"
        );
        assert!(matches!(
            check(&a, 22, HostKeyCheck::Tofu),
            HostKeyOutcome::Changed { .. }
        ));
    }
}

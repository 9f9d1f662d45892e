//! The gateway's SSH certificate authority and its host certificate.
//!
//! Kept in the state directory (`ssh-ca/`, mode 0700): the CA key `ca` and the gateway's host
//! key `host_ed25519` (both mode 0600, readable by the daemon only), created on first start.
//! Each start signs a host certificate for the host key (no principals: OpenSSH accepts a host
//! certificate without principals for any host name, which is what a gateway answering for
//! every target needs), valid from an hour ago for a year. `bulkhead ca export --ssh` prints
//! the `@cert-authority * ssh-ed25519 ...` line clients put in `ssh_known_hosts`.

use std::{
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use russh::keys::{
    ssh_key::{
        certificate::{Builder, CertType},
        private::Ed25519Keypair,
        LineEnding,
    },
    Certificate, HashAlg, PrivateKey, PublicKey,
};

#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("host certificate: {0}")]
    Certificate(String),
    #[error("randomness: {0}")]
    Random(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SshCaError + '_ {
    move |source| SshCaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The CA, the host key and the host certificate the gateway presents.
pub struct SshCa {
    ca_public: PublicKey,
    pub host_key: PrivateKey,
    pub host_certificate: Certificate,
}

/// The directory under the state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh-ca")
}

impl SshCa {
    /// Loads the CA and host key from `dir`, creating them on first use, and signs a host
    /// certificate.
    pub fn load_or_create(dir: &Path) -> Result<Self, SshCaError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir))?;
        let ca = load_or_generate(&dir.join("ca"), "bulkhead SSH CA")?;
        let host_key = load_or_generate(&dir.join("host_ed25519"), "bulkhead gateway host key")?;
        let ca_public = ca.public_key().clone();
        let pub_path = dir.join("ca.pub");
        let line = ca_public
            .to_openssh()
            .map_err(|e| SshCaError::Certificate(e.to_string()))?;
        std::fs::write(&pub_path, format!("{line}\n")).map_err(io_err(&pub_path))?;
        let host_certificate = sign_host(&ca, host_key.public_key())?;
        Ok(Self {
            ca_public,
            host_key,
            host_certificate,
        })
    }

    /// `@cert-authority * ssh-ed25519 AAAA... bulkhead SSH CA`: the line for `ssh_known_hosts`.
    pub fn known_hosts_line(&self) -> String {
        known_hosts_line(&self.ca_public)
    }

    pub fn ca_fingerprint(&self) -> String {
        self.ca_public.fingerprint(HashAlg::Sha256).to_string()
    }
}

/// The `@cert-authority` line for the CA public key `ca`.
pub fn known_hosts_line(ca: &PublicKey) -> String {
    let mut key = ca.clone();
    key.set_comment("");
    let text = key.to_openssh().unwrap_or_default();
    format!("@cert-authority * {} bulkhead SSH CA", text.trim())
}

/// The line for the CA kept under `state_dir` (for `bulkhead ca export --ssh`, which reads
/// `ca.pub` and never the private key).
pub fn export_line(state_dir: &Path) -> Result<String, SshCaError> {
    let path = dir(state_dir).join("ca.pub");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let key = PublicKey::from_openssh(text.trim()).map_err(|e| SshCaError::Key {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(known_hosts_line(&key))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SshCaError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| SshCaError::Random(e.to_string()))?;
    Ok(b)
}

fn load_or_generate(path: &Path, comment: &str) -> Result<PrivateKey, SshCaError> {
    let bad = |message: String| SshCaError::Key {
        path: path.to_path_buf(),
        message,
    };
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        return PrivateKey::from_openssh(text).map_err(|e| bad(e.to_string()));
    }
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&random_bytes::<32>()?));
    key.set_comment(comment);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| bad(e.to_string()))?;
    // Private from the start: created with mode 0600, never widened.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))?;
    Ok(key)
}

fn sign_host(ca: &PrivateKey, host: &PublicKey) -> Result<Certificate, SshCaError> {
    let cert_err = |e: russh::keys::ssh_key::Error| SshCaError::Certificate(e.to_string());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut builder = Builder::new(
        random_bytes::<32>()?.to_vec(),
        host.key_data().clone(),
        now.saturating_sub(3600),
        now.saturating_add(365 * 24 * 3600),
    )
    .map_err(cert_err)?;
    builder
        .cert_type(CertType::Host)
        .map_err(cert_err)?
        .key_id("bulkhead gateway")
        .map_err(cert_err)?
        .all_principals_valid()
        .map_err(cert_err)?;
    builder.sign(ca).map_err(cert_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_the_certificate_verifies_against_the_exported_ca() {
        let state = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(&dir(state.path())).unwrap();
        for name in ["ca", "host_ed25519"] {
            let mode = std::fs::metadata(dir(state.path()).join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let again = SshCa::load_or_create(&dir(state.path())).unwrap();
        assert_eq!(ca.ca_fingerprint(), again.ca_fingerprint(), "reloaded");
        assert_eq!(
            ca.host_key.public_key(),
            again.host_key.public_key(),
            "the host key is kept"
        );
        let line = export_line(state.path()).unwrap();
        assert!(
            line.starts_with("@cert-authority * ssh-ed25519 AAAA"),
            "{line}"
        );
        assert_eq!(line, ca.known_hosts_line());
        let fp = ca.ca_public.fingerprint(HashAlg::Sha256);
        ca.host_certificate.validate([&fp]).unwrap();
        assert_eq!(ca.host_certificate.cert_type(), CertType::Host);
        assert_eq!(
            ca.host_certificate.public_key(),
            ca.host_key.public_key().key_data()
        );
    }
}

//! TLS on both legs, with rustls.
//!
//! * Toward governed clients the gateway presents leaf certificates minted by a local CA kept in
//!   the state directory (`ca/ca.pem`, key `ca/ca.key`, mode 0600), for the names and
//!   addresses the client dialled; `bulkhead ca export` prints the CA for trust stores.
//! * Toward targets it verifies the server against the CA the target's configuration names.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{path}: no certificate in PEM")]
    NoCertificate { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway's own certificate authority.
pub struct LocalCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Server configurations by the address a client dialled.
    leaves: Mutex<HashMap<IpAddr, Arc<ServerConfig>>>,
    /// HTTP server configurations (ALPN h2, http/1.1) by the server name a client asked for,
    /// or the address it dialled when it named none.
    named: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

/// At most this many HTTP leaves are kept; beyond, the cache starts over.
const MAX_NAMED_LEAVES: usize = 4096;

impl LocalCa {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "Bulkhead local CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            // The key first, private from the start; then the certificate.
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self {
            cert_pem,
            issuer,
            leaves: Mutex::default(),
            named: Mutex::default(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server configuration presenting a leaf for `ip` (and `names`), minted once per address.
    pub fn server_config(
        &self,
        ip: IpAddr,
        names: &[String],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self
            .leaves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
        {
            return Ok(Arc::clone(c));
        }
        let config = Arc::new(self.mint(ip, names)?);
        self.leaves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ip, Arc::clone(&config));
        Ok(config)
    }

    /// A new leaf for `names` and `ip`, signed by this CA, in a server configuration.
    fn mint(&self, ip: IpAddr, names: &[String]) -> Result<ServerConfig, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.subject_alt_names.push(SanType::IpAddress(ip));
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| ip.to_string()),
        );
        let leaf = params.signed_by(&key, &self.issuer)?;
        let chain = vec![
            leaf.der().clone(),
            CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|_| {
                TlsError::NoCertificate {
                    path: PathBuf::from("ca.pem"),
                }
            })?,
        ];
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.into())))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(config)
    }

    /// A server configuration for HTTP(S): a leaf for the server name `name` (SNI) if the
    /// client sent one, else for the address `ip` it dialled; ALPN offers h2 and http/1.1.
    /// Minted once per name.
    pub fn http_server_config(
        &self,
        name: Option<&str>,
        ip: IpAddr,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let key = name.map_or_else(|| ip.to_string(), str::to_ascii_lowercase);
        if let Some(c) = self
            .named
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(Arc::clone(c));
        }
        let dns_names: Vec<String> = name.map(|_| vec![key.clone()]).unwrap_or_default();
        let mut config = self.mint(ip, &dns_names)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut cache = self.named.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_NAMED_LEAVES {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

/// The file name of the CA bundle the daemon writes in its run directory: the system's roots
/// and the gateway's CA, for governed tools (`bulkhead run` points them at it).
pub const CA_BUNDLE: &str = "ca-bundle.pem";

/// The variables `bulkhead run` sets to the bundle, for OpenSSL, Python requests, Node and curl.
pub const CA_BUNDLE_VARS: [&str; 4] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
];

/// Writes `run_dir/ca-bundle.pem`: `system_roots` (if readable) then this CA, readable by
/// everyone (it holds only certificates), replaced atomically.
pub fn write_bundle(
    ca: &LocalCa,
    system_roots: &Path,
    run_dir: &Path,
) -> Result<PathBuf, TlsError> {
    let mut text = std::fs::read_to_string(system_roots).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# Bulkhead local CA\n");
    text.push_str(ca.cert_pem());
    let path = run_dir.join(CA_BUNDLE);
    let tmp = run_dir.join(format!(".{CA_BUNDLE}.tmp"));
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A client configuration that trusts only the CA certificates in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let pem = std::fs::read(ca_file).map_err(io_err(ca_file))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|_| TlsError::NoCertificate {
            path: ca_file.to_path_buf(),
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: ca_file.to_path_buf(),
        });
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_kept_private_and_mints_leaves_a_client_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("ca")).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = LocalCa::load_or_create(&dir.path().join("ca")).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem(), "reloaded, not regenerated");
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let a = ca.server_config(ip, &["db.internal".into()]).unwrap();
        let b = ca.server_config(ip, &[]).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one leaf per address");
        let h = ca.http_server_config(Some("API.example"), ip).unwrap();
        assert_eq!(h.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        let again = ca.http_server_config(Some("api.example"), ip).unwrap();
        assert!(Arc::ptr_eq(&h, &again), "one leaf per server name");
        assert!(!Arc::ptr_eq(&h, &ca.http_server_config(None, ip).unwrap()));
        std::fs::write(dir.path().join("trust.pem"), ca.cert_pem()).unwrap();
        assert!(client_config(&dir.path().join("trust.pem")).is_ok());
        std::fs::write(dir.path().join("roots.pem"), "ROOTS").unwrap();
        let bundle = write_bundle(&ca, &dir.path().join("roots.pem"), dir.path()).unwrap();
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert!(
            text.starts_with("ROOTS\n") && text.ends_with(ca.cert_pem()),
            "{text}"
        );
        let mode = std::fs::metadata(&bundle).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        assert!(client_config(&dir.path().join("empty.pem")).is_err());
    }
}

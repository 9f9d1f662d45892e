//! The kubeconfig `bulkhead run` hands a governed command: each configured Kubernetes target
//! at its own address (the URL kubectl connects to is the cluster's, so the connection is
//! captured and reaches the gateway), trusting the gateway's CA bundle, with no credential
//! (the gateway holds the cluster's token or client certificate and sets it on each request).
//! The user has a placeholder token, [`PLACEHOLDER_TOKEN`]: with no credential at all kubectl
//! prompts for a user name and password; the gateway replaces the header it is sent in.

use std::{
    fmt::Write as _,
    io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use crate::config::{Target, TargetAddress, TargetKind};

/// The token the kubeconfig gives kubectl: not a credential, the gateway sets the real one.
pub const PLACEHOLDER_TOKEN: &str = "held-by-bulkhead";

/// The kubeconfig for the Kubernetes targets among `targets` (`None` when there are none):
/// a cluster, an empty user and a context per target, named after it; the first is current.
pub fn for_targets(targets: &[Target], ca_bundle: &Path) -> Option<String> {
    let clusters: Vec<(&str, String)> = targets
        .iter()
        .filter(|t| matches!(t.kind, TargetKind::Kubernetes(_)))
        .filter_map(|t| {
            t.addresses.iter().find_map(|a| match a {
                TargetAddress::Socket(s) => Some((t.name.as_str(), format!("https://{s}"))),
                TargetAddress::Network(_) => None,
            })
        })
        .collect();
    let (current, _) = clusters.first()?;
    let mut text = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (name, server) in &clusters {
        let _ = write!(
            text,
            "- name: {}\n  cluster:\n    server: {}\n    certificate-authority: {}\n",
            quoted(name),
            quoted(server),
            quoted(&ca_bundle.display().to_string())
        );
    }
    let _ = write!(
        text,
        "users:\n- name: bulkhead\n  user:\n    token: {PLACEHOLDER_TOKEN}\ncontexts:\n"
    );
    for (name, _) in &clusters {
        let _ = write!(
            text,
            "- name: {n}\n  context:\n    cluster: {n}\n    user: bulkhead\n",
            n = quoted(name)
        );
    }
    let _ = writeln!(text, "current-context: {}", quoted(current));
    Some(text)
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Writes `text` as `kubeconfig` in a new directory only the caller can open, under `base`.
pub fn write_private(base: &Path, text: &str) -> io::Result<PathBuf> {
    let nonce = getrandom::u64().map_err(|e| io::Error::other(e.to_string()))?;
    let dir = base.join(format!("bulkhead-kube-{}-{nonce:016x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};

    #[test]
    fn one_context_per_kubernetes_target_without_credentials() {
        let config = Config::from_toml(
            "[[target]]\nname = \"db\"\naddresses = [\"10.0.0.9:5432\"]\nprotocol = \"tcp\"\n\
             [[target]]\nname = \"prod-cluster\"\naddresses = [\"10.0.0.0/24\", \"10.0.0.5:6443\"]\n\
             protocol = \"kubernetes\"\n\
             [[target]]\nname = \"dev\"\naddresses = [\"[fd00::5]:443\"]\nprotocol = \"kubernetes\"\n",
            Source::Embedded,
        )
        .unwrap();
        let text = for_targets(&config.targets, Path::new("/run/bulkhead/ca-bundle.pem")).unwrap();
        assert_eq!(
            text,
            "apiVersion: v1\nkind: Config\nclusters:\n\
             - name: \"prod-cluster\"\n  cluster:\n    server: \"https://10.0.0.5:6443\"\n    certificate-authority: \"/run/bulkhead/ca-bundle.pem\"\n\
             - name: \"dev\"\n  cluster:\n    server: \"https://[fd00::5]:443\"\n    certificate-authority: \"/run/bulkhead/ca-bundle.pem\"\n\
             users:\n- name: bulkhead\n  user:\n    token: held-by-bulkhead\ncontexts:\n\
             - name: \"prod-cluster\"\n  context:\n    cluster: \"prod-cluster\"\n    user: bulkhead\n\
             - name: \"dev\"\n  context:\n    cluster: \"dev\"\n    user: bulkhead\n\
             current-context: \"prod-cluster\"\n"
        );
        assert!(for_targets(&config.targets[..1], Path::new("/x")).is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = write_private(dir.path(), &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
    }
}

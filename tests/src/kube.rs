//! Kubernetes test helpers: the test API server (`bh-kube-apiserver`) on the target host, and
//! the real `kubectl` with a kubeconfig of the test's own.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{profile_dir, Proc, Side, Topology, TARGET_V4};

/// The port the test API server listens on, on the target host.
pub const APISERVER_PORT: u16 = 6443;

/// A running test API server.
pub struct KubeApi {
    pub proc: Proc,
    /// The cluster CA it was minted from.
    pub ca: PathBuf,
    /// `https://10.201.0.2:6443`.
    pub url: String,
    /// The bearer token it requires.
    pub token: String,
}

impl KubeApi {
    /// The JSON request lines it printed so far.
    pub fn requests(&mut self) -> Vec<serde_json::Value> {
        self.proc
            .drain_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// `kubectl`: `$KUBECTL`, else the one on the machine.
pub fn kubectl_bin() -> PathBuf {
    std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("/usr/bin/kubectl"), PathBuf::from)
}

/// Why Kubernetes tests cannot run here, if they cannot.
pub fn missing_kubectl() -> Option<String> {
    (!kubectl_bin().exists()).then(|| {
        format!(
            "{} is missing (scripts/setup.sh installs Debian's kubernetes-client)",
            kubectl_bin().display()
        )
    })
}

/// A kubeconfig for `server` trusting `ca`, with `token` (or no credential at all).
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: Option<&str>) {
    let user = token.map_or_else(
        || "  user: {}\n".to_string(),
        |t| format!("  user:\n    token: {t}\n"),
    );
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: test\n{user}contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         current-context: test\n",
        ca = ca.display()
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

impl Topology {
    /// Starts the test API server on the target host; its CA and state live in this
    /// topology's directory.
    pub fn kube_apiserver(&self) -> KubeApi {
        let dir = self.dir.join("kube-apiserver");
        std::fs::create_dir_all(&dir).expect("apiserver dir");
        let token = format!("cluster-token-{}", self.id);
        let addr = format!("{TARGET_V4}:{APISERVER_PORT}");
        let mut cmd = Command::new(profile_dir().join("bh-kube-apiserver"));
        cmd.arg(&addr).arg(&dir).arg(&token);
        let mut proc = self.spawn(Side::Target, "kube-apiserver", cmd);
        let ready = proc.line(Duration::from_secs(10));
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "bh-kube-apiserver did not start: {}",
            proc.stderr()
        );
        KubeApi {
            proc,
            ca: dir.join("ca/ca.pem"),
            url: format!("https://{addr}"),
            token,
        }
    }

    /// `kubectl ARGS` with `kubeconfig`, a discovery cache of this topology's own, and no proxy
    /// from the environment.
    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_bin());
        cmd.env("KUBECONFIG", kubeconfig)
            .env("HOME", self.dir.join("kube-home"))
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .arg("--cache-dir")
            .arg(self.dir.join("kube-cache"))
            .arg("--request-timeout=20s")
            .args(args);
        cmd
    }
}

impl Topology {
    /// A Kubernetes target `prod-cluster` at the test API server, whose bearer token and CA
    /// the gateway holds (`[target.kubernetes]`), written into the daemon configuration.
    pub fn kube_target(&self, api: &KubeApi) {
        let secret = self.credential_file("prod-cluster", &api.token);
        self.write_config(&format!(
            "[[target]]\nname = \"prod-cluster\"\nprotocol = \"kubernetes\"\n\
             addresses = [\"{TARGET_V4}:{APISERVER_PORT}\"]\n\
             [target.kubernetes]\nca = \"{ca}\"\n\
             [[target.kubernetes.inject]]\nheader = \"authorization\"\nprefix = \"Bearer \"\n\
             credentials = {{ file = \"{secret}\" }}\n",
            ca = api.ca.display(),
            secret = secret.display(),
        ));
    }

    /// `kubectl ARGS` governed through `bulkhead run`, as `nobody` (as under sudo), with the
    /// kubeconfig `bulkhead run` writes and a discovery cache nobody can write.
    pub fn governed_kubectl(&self, args: &[&str]) -> Command {
        let cache = self.dir.join("kube-cache-governed");
        std::fs::create_dir_all(&cache).expect("cache dir");
        std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod cache");
        let mut cmd = self.bulkhead(&["run", "--"]);
        cmd.arg(kubectl_bin())
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--request-timeout=60s")
            .args(args)
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .env("SUDO_USER", "nobody")
            .env_remove("KUBECONFIG")
            .current_dir(&self.dir);
        for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
            cmd.env_remove(var);
        }
        cmd
    }
}

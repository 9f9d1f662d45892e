//! OpenSSH on the target host for the SSH gateway's tests: Debian's `sshd` with a host key and
//! an authorized key the test generates (never this machine's), and the governed `ssh` client.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{Proc, Side, Topology, TARGET_V4};

static OTHER_KEYS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The port sshd listens on in the target namespace.
pub const SSHD_PORT: u16 = 2222;
pub const SSHD: &str = "/usr/sbin/sshd";

/// An sshd of the test's own. Stopped (by pid) when dropped, with the topology's directory.
pub struct SshServer {
    pub proc: Proc,
    pub dir: PathBuf,
    /// The gateway's held key (its public half is the only authorized key).
    pub held_key: PathBuf,
    /// `known_hosts` for the target, naming the server's real host key.
    pub known_hosts: PathBuf,
}

fn keygen(path: &std::path::Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bulkhead-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

impl SshServer {
    /// A fresh key pair's public line, for a known_hosts entry that does not match.
    pub fn other_host_key(&self) -> String {
        let n = OTHER_KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("other-{n}"));
        keygen(&path);
        fs::read_to_string(path.with_extension("pub")).expect("pub")
    }

    /// Writes the target's known_hosts with `key_line` (`ssh-ed25519 AAAA...`).
    pub fn write_known_hosts(&self, key_line: &str) {
        fs::write(
            &self.known_hosts,
            format!("[{TARGET_V4}]:{SSHD_PORT} {}\n", key_line.trim()),
        )
        .expect("known_hosts");
    }

    pub fn host_key_line(&self) -> String {
        fs::read_to_string(self.dir.join("host_ed25519.pub")).expect("host key")
    }
}

impl Topology {
    /// Starts sshd on `TARGET_V4:SSHD_PORT` accepting only a fresh key, which the gateway will
    /// hold; forwarding and `BULKHEAD_*` variables are allowed by sshd, so what refuses them in
    /// the tests is the gateway.
    pub fn sshd(&self) -> SshServer {
        self.sshd_with("", None)
    }

    /// [`Topology::sshd`] that also takes `password` for root: sshd runs in a mount namespace
    /// of its own where `/etc/shadow` is a copy with that password (this machine's is not
    /// touched), and `PasswordAuthentication` is on.
    pub fn sshd_with_password(&self, password: &str) -> SshServer {
        let out = Command::new("openssl")
            .args(["passwd", "-6", password])
            .output()
            .expect("openssl passwd");
        assert!(out.status.success(), "openssl passwd: {out:?}");
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let shadow: String = fs::read_to_string("/etc/shadow")
            .expect("/etc/shadow")
            .lines()
            .map(|l| match l.split_once(':') {
                Some(("root", rest)) => {
                    let after = rest.split_once(':').map_or("", |(_, a)| a);
                    format!("root:{hash}:{after}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        let dir = self.dir.join("sshd");
        fs::create_dir_all(&dir).expect("sshd dir");
        let copy = dir.join("shadow");
        fs::write(&copy, shadow).expect("shadow copy");
        fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        self.sshd_with(
            "PasswordAuthentication yes\nPermitRootLogin yes\n",
            Some(&copy),
        )
    }

    /// `extra` goes first in sshd_config (sshd takes a keyword's first value); `shadow`, when
    /// given, is bind-mounted on `/etc/shadow` in sshd's own mount namespace.
    fn sshd_with(&self, extra: &str, shadow: Option<&std::path::Path>) -> SshServer {
        assert!(
            std::path::Path::new(SSHD).exists(),
            "{SSHD} is missing: apt-get install openssh-server (scripts/setup.sh)"
        );
        let dir = self.dir.join("sshd");
        fs::create_dir_all(&dir).expect("sshd dir");
        // Privilege separation needs this directory (the package creates it at boot).
        fs::create_dir_all("/run/sshd").expect("/run/sshd");
        keygen(&dir.join("host_ed25519"));
        let held_key = dir.join("held_key");
        keygen(&held_key);
        fs::copy(held_key.with_extension("pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "{extra}Port {SSHD_PORT}\nListenAddress {TARGET_V4}\nHostKey {d}/host_ed25519\n\
                 PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
                 AllowTcpForwarding yes\nAllowAgentForwarding yes\nX11Forwarding no\n\
                 PrintMotd no\nPrintLastLog no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n\
                 AcceptEnv BULKHEAD_*\n",
                d = dir.display()
            ),
        )
        .expect("sshd_config");
        let mut cmd = match shadow {
            None => Command::new(SSHD),
            Some(copy) => {
                // unshare(1) makes the new namespace's mounts private: nothing leaks out.
                let mut c = Command::new("unshare");
                c.args([
                    "-m",
                    "sh",
                    "-c",
                    "mount --bind \"$0\" /etc/shadow && exec \"$@\"",
                ])
                .arg(copy)
                .arg(SSHD);
                c
            }
        };
        cmd.args(["-D", "-e", "-f"]).arg(&config);
        let mut proc = self.spawn(Side::Target, "sshd", cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if proc.stderr().contains("Server listening on") {
                break;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("sshd exited ({status}): {}", proc.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let server = SshServer {
            proc,
            known_hosts: dir.join("known_hosts"),
            held_key,
            dir,
        };
        server.write_known_hosts(&server.host_key_line());
        server
    }

    /// sshd on the target host as target `box` (user root, the held key, strict known_hosts,
    /// `target_toml` added to `[target.ssh]`), `policy` as `box.toml`; the daemon started.
    pub fn ssh_target(&self, policy: &str, target_toml: &str) -> (SshServer, Proc) {
        self.ssh_target_on(self.sshd(), policy, target_toml)
    }

    /// [`Topology::ssh_target`] whose sshd forwards X11 (`X11Forwarding yes`), its `xauth`
    /// writing to `xauthority` in the test's directory (never a home directory).
    pub fn ssh_target_x11(&self, policy: &str, target_toml: &str) -> (SshServer, Proc, PathBuf) {
        let xauthority = self.dir.join("Xauthority");
        let wrapper = self.dir.join("xauth");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nXAUTHORITY={} exec /usr/bin/xauth \"$@\"\n",
                xauthority.display()
            ),
        )
        .expect("xauth wrapper");
        fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod xauth wrapper");
        let server = self.sshd_with(
            &format!(
                "X11Forwarding yes\nX11UseLocalhost yes\nXAuthLocation {}\n",
                wrapper.display()
            ),
            None,
        );
        let (server, daemon) = self.ssh_target_on(server, policy, target_toml);
        (server, daemon, xauthority)
    }

    fn ssh_target_on(
        &self,
        server: SshServer,
        policy: &str,
        target_toml: &str,
    ) -> (SshServer, Proc) {
        self.write_config(&format!(
            "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\naddresses = [\"{TARGET_V4}:{SSHD_PORT}\"]\n\
             [target.ssh]\nuser = \"root\"\nkey = \"{}\"\nknown_hosts = \"{}\"\n{target_toml}",
            server.held_key.display(),
            server.known_hosts.display()
        ));
        self.policy("box.toml", policy);
        let daemon = self.start_daemon(&[]);
        (server, daemon)
    }

    /// The known hosts file the daemon writes for governed OpenSSH clients.
    pub fn gateway_known_hosts(&self) -> PathBuf {
        self.dir.join("run/ssh/ssh_known_hosts")
    }

    /// `ssh` from the governed side to target `box`, holding no key and offering no password,
    /// trusting only the gateway's CA (strictly): `extra` options before the destination,
    /// `remote` the command (none: no command).
    pub fn ssh_command(&self, extra: &[&str], remote: Option<&str>) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-p", &SSHD_PORT.to_string()])
            .args(self.ssh_options())
            .args(extra)
            .arg(format!("agent@{TARGET_V4}"));
        if let Some(r) = remote {
            cmd.arg(r);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    /// The options every governed OpenSSH client (`ssh`, `scp`, `sftp`) gets in these tests: no
    /// configuration file, no key, no password, only the gateway's CA trusted (strictly).
    pub fn ssh_options(&self) -> Vec<String> {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null"])
            .arg("-o")
            .arg(format!(
                "GlobalKnownHostsFile={}",
                self.gateway_known_hosts().display()
            ))
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
                "-o",
                "ConnectTimeout=10",
            ]);
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Runs `ssh` as [`Topology::ssh_command`] builds it, governed; (status code, stdout, stderr).
    pub fn ssh(&self, extra: &[&str], remote: &str) -> (Option<i32>, String, String) {
        let out = self.output(Side::Governed, self.ssh_command(extra, Some(remote)));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Topology {
    /// [`Topology::ssh_command`] as one line for `sh -c` (each word single-quoted).
    pub fn ssh_line(&self, extra: &[&str], remote: Option<&str>) -> String {
        let cmd = self.ssh_command(extra, remote);
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|w| format!("'{}'", w.to_string_lossy().replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

//! UDP destinations opened by the policy. The kernel cannot ask user space about each datagram,
//! so the policy's `udp` decisions are compiled into `UDP_ALLOW` when it loads and reloads:
//! every destination a `udp` target table or an allow rule names exactly (`"192.0.2.7:514"`,
//! `"[fd00::7]:4789"`) is judged as a `udp` connect by an unknown process, and opened when the
//! policy allows it (enforced, not observed). An unknown process satisfies no identity
//! condition of an allow rule and every one of a deny rule, so what is compiled is allowed for
//! every governed process; destinations allowed only to some processes, or named by a pattern,
//! stay refused (fail closed) and are reported.

use std::net::{IpAddr, SocketAddr};

use super::rules::{udp_entry, UdpEntry};
use crate::{
    identity::ProcessIdentity,
    net::Cidr,
    policy::{Action, Effect, IdentityMatch, PolicySet, Request, TargetRef, Verdict},
    protocol::Protocol,
};

/// What the policy opens, and what it names that could not be opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// `UDP_ALLOW` entries (direct destinations).
    pub entries: Vec<UdpEntry>,
    /// The destinations opened, as the policy names them (`192.0.2.7:514`).
    pub allowed: Vec<String>,
    /// Why other `udp` names of the policy are not opened.
    pub notes: Vec<String>,
}

/// A policy name that is exactly a destination, in canonical form.
fn destination(name: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = name.parse().ok()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

fn is_udp(protocols: &[Protocol]) -> bool {
    protocols.is_empty() || protocols.contains(&Protocol::Udp)
}

fn identity_free(m: &IdentityMatch) -> bool {
    m.uids.is_empty()
        && m.users.is_empty()
        && m.processes.is_empty()
        && m.exes.is_empty()
        && m.ancestors.is_empty()
        && m.cgroups.is_empty()
        && m.units.is_empty()
}

pub fn compile(set: &PolicySet) -> Compiled {
    let mut names: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for t in &set.targets {
        let (Some(name), Some(Protocol::Udp) | None) = (&t.name, t.protocol) else {
            continue;
        };
        match destination(name.as_str()) {
            Some(_) => names.push(name.as_str().to_string()),
            None if t.protocol == Some(Protocol::Udp) => notes.push(format!(
                "udp target {:?} is not an address:port; UDP is opened by exact destination only",
                name.as_str()
            )),
            None => {}
        }
    }
    for r in &set.rules {
        if !matches!(r.effect, Effect::Verdict(Verdict::Allow)) || !is_udp(&r.target.protocols) {
            continue;
        }
        for n in &r.target.names {
            match destination(n.as_str()) {
                Some(_) => names.push(n.as_str().to_string()),
                None if r.target.protocols.contains(&Protocol::Udp) => notes.push(format!(
                    "rule {}: udp target {:?} is not an address:port; UDP is opened by exact \
                     destination only",
                    r.id,
                    n.as_str()
                )),
                None => {}
            }
        }
    }
    names.sort();
    names.dedup();
    let unknown = ProcessIdentity::default();
    let mut out = Compiled {
        notes,
        ..Compiled::default()
    };
    for name in names {
        let Some(dst) = destination(&name) else {
            continue;
        };
        let canonical = dst.to_string();
        let decision = set.evaluate(&Request {
            target: TargetRef {
                name: &canonical,
                protocol: Protocol::Udp,
            },
            identity: &unknown,
            action: Action::Connect,
        });
        // An unknown process is uid 0 to the evaluator: an allow that rests on a rule with
        // identity conditions is not an allow for every process.
        let by_identity = decision.rules.iter().any(|id| {
            set.rules
                .iter()
                .any(|r| &r.id == id && !identity_free(&r.identity))
        });
        if decision.decided != Verdict::Allow || decision.observe_only {
            continue;
        }
        if by_identity {
            out.notes.push(format!(
                "udp {canonical}: allowed only to some processes; the kernel cannot tell them \
                 apart per datagram, so it stays refused"
            ));
            continue;
        }
        let host = match dst.ip() {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if let Ok(net) = Cidr::new(dst.ip(), host) {
            out.entries.push(udp_entry(net, dst.port()));
            out.allowed.push(canonical);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(toml: &str) -> PolicySet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), toml).unwrap();
        crate::policy::load_dir(dir.path()).unwrap()
    }

    #[test]
    fn exact_udp_destinations_the_policy_allows_are_opened_and_nothing_else() {
        let c = compile(&set(r#"
[[target]]
name = "10.0.0.5:514"
protocol = "udp"
default = "allow"

[[target]]
name = "10.0.0.6:514"
protocol = "udp"
default = "deny"

[[target]]
name = "10.0.0.9:123"
protocol = "udp"
default = "allow"

[[rule]]
id = "no-ntp"
verdict = "deny"
target = { name = ["10.0.0.*:123"], protocol = ["udp"] }

[[rule]]
id = "wireguard"
verdict = "allow"
target = { name = ["[fd00::7]:51820", "192.0.2.*:4789"], protocol = ["udp"] }

[[rule]]
id = "only-root-syslog"
verdict = "allow"
target = { name = ["10.0.0.8:514"], protocol = ["udp"] }
identity = { uid = [0] }

[[rule]]
id = "tcp-only"
verdict = "allow"
target = { name = ["10.0.0.10:53"], protocol = ["tcp"] }
"#));
        assert_eq!(c.allowed, vec!["10.0.0.5:514", "[fd00::7]:51820"]);
        assert_eq!(c.entries.len(), 2);
        assert!(
            c.notes.iter().any(|n| n.contains("192.0.2.*:4789")),
            "{:?}",
            c.notes
        );
        assert!(
            c.notes.iter().any(|n| n.contains("10.0.0.8:514")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn an_observed_udp_target_opens_nothing() {
        let c = compile(&set(
            "[[target]]\nname = \"10.0.0.5:514\"\nprotocol = \"udp\"\ndefault = \"deny\"\nmode = \"observe\"\n",
        ));
        assert!(c.allowed.is_empty(), "{c:?}");
    }
}

//! [`PolicySet::evaluate`]: match every rule, then combine order-independently.

use std::{borrow::Cow, sync::Arc};

use super::{
    matchers::{normalize_host, normalize_path, split_command, Glob},
    Action, Basis, Classification, Decision, Effect, HttpMatch, IdentityMatch, KubeMatch, MaskRule,
    Mode, ObjectPattern, PolicySet, Request, RequestMatch, Rule, SqlClass, SqlMatch, SshForward,
    SshMatch, TargetMatch, TargetRef, TargetSettings, Verdict,
};
use crate::{identity::ProcessIdentity, protocol::Protocol};

/// Whether a rule must cover the whole request (allow) or only touch it (deny, approve, mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polarity {
    Cover,
    Touch,
}

/// The request, parsed once for all rules.
enum Analysis<'a> {
    Connect,
    Sql(Arc<Classification>),
    Ssh(Vec<Vec<String>>),
    SshShell,
    Sftp {
        write: bool,
        path: &'a str,
    },
    /// `address` is `host:port`, normalized ([`forward_address`]).
    SshForward {
        kind: SshForward,
        address: String,
    },
    SshEnv {
        name: &'a str,
    },
    Http {
        method: String,
        host: String,
        path: String,
    },
    Kube {
        verb: &'a str,
        group: Option<&'a str>,
        resource: &'a str,
        subresource: Option<&'a str>,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    },
    /// Could not be judged, and why; `sql` when it was SQL.
    Unknown {
        sql: bool,
        why: String,
    },
}

#[derive(Default)]
struct Matched<'r> {
    deny: Vec<&'r Rule>,
    approve: Vec<&'r Rule>,
    allow: Vec<&'r Rule>,
    masks: Vec<Arc<MaskRule>>,
}

impl PolicySet {
    /// The settings for a target: the most specific `[[target]]` tables that match (exact name,
    /// then name pattern, then protocol only); several equally specific ones combine strictly.
    pub fn settings_for(&self, target: TargetRef<'_>) -> Cow<'_, TargetSettings> {
        let specificity = |s: &TargetSettings| -> Option<u8> {
            if s.protocol.is_some_and(|p| p != target.protocol) {
                return None;
            }
            match &s.name {
                Some(g) if !g.is_match(target.name) => None,
                Some(g) if g.as_str() == target.name => Some(3),
                Some(_) => Some(2),
                None if s.protocol.is_some() => Some(1),
                None => Some(0),
            }
        };
        let best = self.targets.iter().filter_map(specificity).max();
        let Some(best) = best else {
            return Cow::Owned(TargetSettings::fallback());
        };
        let mut chosen = self.targets.iter().filter(|s| specificity(s) == Some(best));
        let Some(first) = chosen.next() else {
            return Cow::Owned(TargetSettings::fallback());
        };
        let mut rest = chosen.peekable();
        if rest.peek().is_none() {
            return Cow::Borrowed(first);
        }
        let mut out = first.clone();
        for s in rest {
            out.default = out.default.max(s.default);
            out.on_unknown = out.on_unknown.max(s.on_unknown);
            out.mode = out.mode.max(s.mode);
            out.approval_timeout = out.approval_timeout.min(s.approval_timeout);
            // Vouching for a function needs every applicable table to vouch.
            out.read_only_functions.retain(|g| {
                s.read_only_functions
                    .iter()
                    .any(|h| h.as_str() == g.as_str())
            });
        }
        Cow::Owned(out)
    }

    /// Whether a session of `identity` on `target` may run anything that writes: a rule that
    /// could apply allows or holds for approval a writing class (or any class), the target's
    /// default or `on_unknown` is not deny, or the target is in observe mode. Facts the
    /// identity lacks count as matching (it may write). When it may not, the PostgreSQL
    /// gateway opens the session read-only at the server, which then refuses writes hidden
    /// behind objects the gateway cannot see into (a view calling a volatile function).
    pub fn may_write(&self, target: TargetRef<'_>, identity: &ProcessIdentity) -> bool {
        let settings = self.settings_for(target);
        if settings.mode == Mode::Observe
            || settings.default != Verdict::Deny
            || settings.on_unknown != Verdict::Deny
        {
            return true;
        }
        self.rules.iter().any(|rule| {
            matches!(
                rule.effect,
                Effect::Verdict(Verdict::Allow | Verdict::Approve)
            ) && rule.target.matches(target)
                && rule.identity.matches(identity, Polarity::Touch)
                && match &rule.request {
                    RequestMatch::Any => true,
                    RequestMatch::Sql(m) => m
                        .classes
                        .as_ref()
                        .is_none_or(|classes| classes.iter().any(|c| c.writes())),
                    RequestMatch::Ssh(_) | RequestMatch::Http(_) | RequestMatch::Kube(_) => false,
                }
        })
    }

    /// Whether anything could be held for approval: a rule or a target table says `approve`.
    pub fn can_hold(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.effect, Effect::Verdict(Verdict::Approve)))
            || self
                .targets
                .iter()
                .any(|t| t.default == Verdict::Approve || t.on_unknown == Verdict::Approve)
    }

    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let settings = self.settings_for(req.target);
        let analysis = self.analyze(&req.action, &settings);
        let sql = match &analysis {
            Analysis::Sql(c) => Some(Arc::clone(c)),
            _ => match req.action {
                Action::Sql { .. } | Action::SqlClassified(_) => self.sql_of(&req.action),
                _ => None,
            },
        };

        let Matched {
            deny,
            approve,
            allow,
            masks,
        } = self.match_rules(req, &analysis);
        let target = req.target.name;
        let ids = |rules: &[&Rule]| {
            let mut v: Vec<String> = rules.iter().map(|r| r.id.clone()).collect();
            v.sort();
            v
        };
        let unknown = match &analysis {
            Analysis::Unknown { why, .. } => Some(why.clone()),
            _ => None,
        };
        let (decided, basis, rules) = if !deny.is_empty() {
            (Verdict::Deny, Basis::Rules, ids(&deny))
        } else if unknown.is_some() {
            let mut rules = vec![format!("target:{target}:on_unknown")];
            let verdict = if settings.on_unknown == Verdict::Allow && !approve.is_empty() {
                rules = ids(&approve);
                Verdict::Approve
            } else {
                settings.on_unknown
            };
            (verdict, Basis::Unknown, rules)
        } else if !approve.is_empty() {
            (Verdict::Approve, Basis::Rules, ids(&approve))
        } else if !allow.is_empty() {
            (Verdict::Allow, Basis::Rules, ids(&allow))
        } else if let Action::SshForward { .. } | Action::SshEnv { .. } = req.action {
            // Each is a way around the gateway (or what it judged): only a rule naming it allows.
            let rule = format!("target:{target}:needs-a-rule");
            (Verdict::Deny, Basis::Default, vec![rule])
        } else if matches!(req.action, Action::Connect)
            && !matches!(req.target.protocol, Protocol::Tcp | Protocol::Udp)
        {
            // Opening a session grants nothing on a protocol target: each request in it is
            // judged. Only rules without a request section (identity gates) decide here.
            (
                Verdict::Allow,
                Basis::Default,
                vec![format!("target:{target}:connect")],
            )
        } else {
            (
                settings.default,
                Basis::Default,
                vec![format!("target:{target}:default")],
            )
        };

        let message = (decided == Verdict::Deny).then(|| {
            let mut from_rules: Vec<&str> =
                deny.iter().filter_map(|r| r.message.as_deref()).collect();
            from_rules.sort_unstable();
            from_rules.dedup();
            if !from_rules.is_empty() {
                return from_rules.join("; ");
            }
            match (&unknown, basis) {
                (Some(why), Basis::Unknown) => {
                    format!("bulkhead: request not understood, denied ({why})")
                }
                _ if basis == Basis::Default => {
                    format!("bulkhead: no policy allows this on {target}")
                }
                _ => format!("bulkhead: denied by policy ({})", rules.join(", ")),
            }
        });
        let approval_timeout = (decided == Verdict::Approve).then(|| {
            approve
                .iter()
                .filter_map(|r| r.approval_timeout)
                .min()
                .unwrap_or(settings.approval_timeout)
        });
        let observe = settings.mode == Mode::Observe;
        let verdict = if observe { Verdict::Allow } else { decided };
        Decision {
            verdict,
            decided,
            basis,
            rules,
            message,
            approval_timeout,
            observe_only: observe && (decided != Verdict::Allow || !masks.is_empty()),
            masks,
            sql,
            unknown,
        }
    }

    /// Every rule that matches, by what it does.
    fn match_rules(&self, req: &Request<'_>, analysis: &Analysis<'_>) -> Matched<'_> {
        let mut m = Matched::default();
        for rule in &self.rules {
            let polarity = match rule.effect {
                Effect::Verdict(Verdict::Allow) => Polarity::Cover,
                _ => Polarity::Touch,
            };
            if !rule.target.matches(req.target)
                || !rule.identity.matches(req.identity, polarity)
                || !rule.request.matches(analysis, polarity)
            {
                continue;
            }
            match &rule.effect {
                Effect::Verdict(Verdict::Deny) => m.deny.push(rule),
                Effect::Verdict(Verdict::Approve) => m.approve.push(rule),
                Effect::Verdict(Verdict::Allow) => m.allow.push(rule),
                Effect::Mask(mask) => m.masks.push(Arc::clone(mask)),
            }
        }
        m
    }

    fn sql_of(&self, action: &Action<'_>) -> Option<Arc<Classification>> {
        match action {
            Action::Sql { text, prepared } => Some(self.cache().classify(text, *prepared)),
            Action::SqlClassified(c) => Some(Arc::clone(c)),
            _ => None,
        }
    }

    fn analyze<'a>(&self, action: &Action<'a>, settings: &TargetSettings) -> Analysis<'a> {
        match *action {
            Action::Connect => Analysis::Connect,
            Action::Sql { .. } | Action::SqlClassified(_) => {
                let Some(c) = self.sql_of(action) else {
                    return Analysis::Unknown {
                        sql: true,
                        why: "no SQL".into(),
                    };
                };
                if !c.classes.contains(&SqlClass::Unknown) {
                    return Analysis::Sql(c);
                }
                let vouched = c.unknown_reasons.is_empty()
                    && c.unknown_functions
                        .iter()
                        .all(|f| settings.read_only_functions.iter().any(|g| g.is_match(f)));
                if vouched {
                    let mut c = (*c).clone();
                    c.classes.remove(&SqlClass::Unknown);
                    if c.classes.is_empty() {
                        c.classes.insert(SqlClass::Read);
                    }
                    return Analysis::Sql(Arc::new(c));
                }
                let why = c.unknown_reasons.first().cloned().unwrap_or_else(|| {
                    let names: Vec<&str> = c.unknown_functions.iter().map(String::as_str).collect();
                    format!(
                        "calls functions not known to be read-only: {}",
                        names.join(", ")
                    )
                });
                Analysis::Unknown { sql: true, why }
            }
            Action::SshExec { command } => match split_command(command) {
                Ok(cmds) if cmds.is_empty() => Analysis::Unknown {
                    sql: false,
                    why: "empty command".into(),
                },
                Ok(cmds) => Analysis::Ssh(cmds),
                Err(e) => Analysis::Unknown {
                    sql: false,
                    why: format!("SSH command: {e}"),
                },
            },
            Action::SshShell => Analysis::SshShell,
            Action::Sftp { write, path } => {
                if path.is_empty()
                    || path.split('/').any(|part| part == "..")
                    || path.contains('\0')
                {
                    Analysis::Unknown {
                        sql: false,
                        why: "sftp path with `..` (or empty): where it leads is only known on the server".into(),
                    }
                } else {
                    Analysis::Sftp { write, path }
                }
            }
            Action::SshForward { .. } | Action::SshEnv { .. } => analyze_ssh_forward(action),
            Action::Http { method, host, path } => match normalize_path(path) {
                Ok(p) => Analysis::Http {
                    method: method.to_ascii_uppercase(),
                    host: normalize_host(host),
                    path: p,
                },
                Err(e) => Analysis::Unknown {
                    sql: false,
                    why: format!("HTTP path: {e}"),
                },
            },
            Action::Unknown { why } => Analysis::Unknown {
                sql: false,
                why: why.to_string(),
            },
            Action::Kube {
                verb,
                group,
                resource,
                subresource,
                namespace,
                name,
            } => Analysis::Kube {
                verb,
                group,
                resource,
                subresource,
                namespace,
                name,
            },
        }
    }
}

impl TargetMatch {
    fn matches(&self, target: TargetRef<'_>) -> bool {
        (self.names.is_empty() || self.names.iter().any(|g| g.is_match(target.name)))
            && (self.protocols.is_empty() || self.protocols.contains(&target.protocol))
    }
}

/// A matcher on one optional fact: unknown facts fail a covering rule and satisfy a touching one.
fn optional(patterns: &[Glob], value: Option<&str>, polarity: Polarity) -> bool {
    if patterns.is_empty() {
        return true;
    }
    match value {
        Some(v) => patterns.iter().any(|g| g.is_match(v)),
        None => polarity == Polarity::Touch,
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl IdentityMatch {
    fn matches(&self, id: &ProcessIdentity, polarity: Polarity) -> bool {
        let process = |g: &Glob| {
            g.is_match(&id.comm) || id.exe.as_deref().is_some_and(|e| g.is_match(basename(e)))
        };
        (self.uids.is_empty() || self.uids.contains(&id.uid))
            && optional(&self.users, id.user.as_deref(), polarity)
            && (self.processes.is_empty() || self.processes.iter().any(process))
            && optional(&self.exes, id.exe.as_deref(), polarity)
            && optional(&self.cgroups, id.cgroup.as_deref(), polarity)
            && optional(&self.units, id.unit.as_deref(), polarity)
            && (self.ancestors.is_empty()
                || self.ancestors.iter().any(|g| {
                    id.ancestors.iter().any(|a| {
                        if g.as_str().contains('/') {
                            a.exe.as_deref().is_some_and(|e| g.is_match(e))
                        } else {
                            g.is_match(&a.comm)
                                || a.exe.as_deref().is_some_and(|e| g.is_match(basename(e)))
                        }
                    })
                }))
    }
}

impl RequestMatch {
    fn matches(&self, analysis: &Analysis<'_>, polarity: Polarity) -> bool {
        match (self, analysis) {
            // A rule without a request section allows no tunnel and no variable (each must be
            // named); it may still deny or hold them.
            (RequestMatch::Any, Analysis::SshForward { .. } | Analysis::SshEnv { .. }) => {
                polarity == Polarity::Touch
            }
            (RequestMatch::Any, _) => true,
            // Unknown SQL is matched by restricting rules that name `unknown` or no class at all
            // (what it touches is not known, so object conditions cannot exclude it). Covering
            // rules never match it, and other kinds leave unknowns to `on_unknown`.
            (RequestMatch::Sql(m), Analysis::Unknown { sql: true, .. }) => {
                polarity == Polarity::Touch
                    && m.classes
                        .as_ref()
                        .is_none_or(|c| c.contains(&SqlClass::Unknown))
            }
            (RequestMatch::Sql(m), Analysis::Sql(c)) => m.matches(c, polarity),
            (RequestMatch::Ssh(m), Analysis::Ssh(cmds)) => m.matches(cmds, polarity),
            (RequestMatch::Ssh(m), Analysis::SshShell) => m.shell,
            (RequestMatch::Ssh(m), Analysis::Sftp { write, path }) => {
                let globs = if *write { &m.sftp_write } else { &m.sftp_read };
                globs.iter().any(|g| g.is_match(path))
            }
            (RequestMatch::Ssh(m), Analysis::SshForward { kind, address }) => match kind {
                SshForward::Local => m.forward.iter().any(|g| g.is_match(address)),
                SshForward::Remote => m.remote_forward.iter().any(|g| g.is_match(address)),
                SshForward::Agent => m.agent,
                SshForward::X11 => m.x11,
            },
            (RequestMatch::Ssh(m), Analysis::SshEnv { name }) => {
                m.env.iter().any(|g| g.is_match(name))
            }
            (RequestMatch::Http(m), Analysis::Http { method, host, path }) => {
                (m.methods.is_empty() || m.methods.iter().any(|x| x == method))
                    && (m.hosts.is_empty() || m.hosts.iter().any(|g| g.is_match(host)))
                    && (m.paths.is_empty() || m.paths.iter().any(|g| g.is_match(path)))
            }
            (
                RequestMatch::Kube(m),
                Analysis::Kube {
                    verb,
                    group,
                    resource,
                    subresource,
                    namespace,
                    name,
                },
            ) => {
                m.matches(verb, resource, *subresource, *namespace, *name, polarity)
                    && m.matches_group(*group)
            }
            _ => false,
        }
    }
}

impl PolicySet {
    /// Whether a rule that restricts (deny, approve, mask) names SQL objects: only then can a
    /// table's kin ([`Classification::kin`]) change a decision.
    pub fn restricts_sql_objects(&self) -> bool {
        self.restricts_sql_objects
    }
}

impl SqlMatch {
    fn matches(&self, c: &Classification, polarity: Polarity) -> bool {
        let classes = match &self.classes {
            None => true,
            Some(set) => match polarity {
                Polarity::Cover => c.classes.iter().all(|k| set.contains(k)),
                Polarity::Touch => c.classes.iter().any(|k| set.contains(k)),
            },
        };
        let objects = self.objects.is_empty()
            || match polarity {
                Polarity::Cover => {
                    c.objects_complete && c.objects.iter().all(|o| self.covers_object(o))
                }
                Polarity::Touch => {
                    !c.objects_complete
                        || c.objects
                            .iter()
                            .chain(&c.kin)
                            .any(|o| self.objects.iter().any(|p| p.touches(o)))
                }
            };
        let functions = self.functions.is_empty()
            || match polarity {
                Polarity::Cover => {
                    c.objects_complete
                        && c.functions
                            .iter()
                            .all(|f| self.functions.iter().any(|g| g.is_match(f)))
                }
                Polarity::Touch => {
                    !c.objects_complete
                        || c.functions
                            .iter()
                            .any(|f| self.functions.iter().any(|g| g.is_match(f)))
                }
            };
        classes && objects && functions
    }
}

impl SqlMatch {
    /// Unqualified names resolve through the search path; a covering rule assumes the default
    /// (`public`), as the server does for a role without its own schema, after `pg_catalog`,
    /// which the server searches first: the rule must cover every schema the name may be in.
    fn covers_object(&self, object: &str) -> bool {
        let covered = |name: &str| self.objects.iter().any(|p| p.full.is_match(name));
        if object.contains('.') {
            return covered(object);
        }
        covered(object)
            || super::sql::unqualified_resolutions(object)
                .iter()
                .all(|schema| covered(&format!("{schema}.{object}")))
    }
}

impl ObjectPattern {
    /// An unqualified name might be in any schema on the search path: any table part match.
    fn touches(&self, object: &str) -> bool {
        self.full.is_match(object)
            || (!object.contains('.')
                && self.table_part.as_ref().is_some_and(|g| g.is_match(object)))
    }
}

fn analyze_ssh_forward<'a>(action: &Action<'a>) -> Analysis<'a> {
    let unknown = |why: String| Analysis::Unknown { sql: false, why };
    match *action {
        Action::SshForward { kind, host, port } => match forward_address(kind, host, port) {
            Ok(address) => Analysis::SshForward { kind, address },
            Err(why) => unknown(format!("SSH forwarding: {why}")),
        },
        Action::SshEnv { name } if !name.is_empty() && !name.contains(['=', '\0']) => {
            Analysis::SshEnv { name }
        }
        _ => unknown("an environment variable name that is empty or has `=` or NUL".into()),
    }
}

/// `host:port` as forwarding rules match it: the host lowercased, without a trailing dot, an
/// IPv6 address in brackets, an empty (any) listen address as `*`. A host the target's
/// resolver could read as an address other than the one written (`10.5`, `167772165`,
/// `0x0a.0.0.5`: `inet_aton` accepts them) or with characters no host name has is refused.
pub fn forward_address(kind: SshForward, host: &str, port: u32) -> Result<String, String> {
    if matches!(kind, SshForward::Agent | SshForward::X11) {
        return Ok(String::new());
    }
    let port = u16::try_from(port).map_err(|_| format!("port {port} out of range"))?;
    if kind == SshForward::Remote && (host.is_empty() || host == "*") {
        return Ok(format!("*:{port}"));
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        });
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let last = name.rsplit('.').next().unwrap_or_default();
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        || name.split('.').any(str::is_empty)
    {
        return Err(format!("{host:?} is not a host name or an address"));
    }
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "{host:?} reads as a numeric address in a form other than a.b.c.d"
        ));
    }
    Ok(format!("{name}:{port}"))
}

impl SshMatch {
    fn matches(&self, commands: &[Vec<String>], polarity: Polarity) -> bool {
        let one = |argv: &Vec<String>| {
            self.commands.iter().any(|p| p.is_match(argv)) || {
                let line = argv.join(" ");
                self.regexes.iter().any(|r| r.is_match(&line))
            }
        };
        match polarity {
            Polarity::Cover => commands.iter().all(one),
            Polarity::Touch => commands.iter().any(one),
        }
    }
}

impl HttpMatch {
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.hosts.is_empty() && self.paths.is_empty()
    }
}

impl KubeMatch {
    /// No groups named, or the request's group is one of them. A request with no group (not
    /// about a resource) is in none of them.
    fn matches_group(&self, group: Option<&str>) -> bool {
        self.groups.is_empty() || group.is_some_and(|g| self.groups.iter().any(|p| p.is_match(g)))
    }

    fn matches(
        &self,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
        polarity: Polarity,
    ) -> bool {
        // `None` namespace or name means "all of them": only `*`/`**` covers that.
        let all = |patterns: &[Glob], value: Option<&str>| {
            patterns.is_empty()
                || match value {
                    Some(v) => patterns.iter().any(|g| g.is_match(v)),
                    None => polarity == Polarity::Touch || patterns.iter().any(Glob::matches_all),
                }
        };
        (self.verbs.is_empty() || self.verbs.iter().any(|g| g.is_match(verb)))
            && (self.resources.is_empty() || self.resources.iter().any(|g| g.is_match(resource)))
            && (self.subresources.is_empty()
                || self
                    .subresources
                    .iter()
                    .any(|g| g.is_match(subresource.unwrap_or(""))))
            && all(&self.namespaces, namespace)
            && all(&self.names, name)
    }
}

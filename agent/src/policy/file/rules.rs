//! Building rules and target settings from the raw file shape, with an error per bad value.

use std::{ops::Range, sync::Arc};

use toml::Spanned;

use super::{Ctx, RawMask, RawRule, RawSql, RawTarget};
use crate::{
    policy::{
        mask::{ColumnPattern, Detector, MaskRule, MaskStyle},
        matchers::{ArgvPattern, Glob},
        Effect, HttpMatch, IdentityMatch, KubeMatch, Mode, ObjectPattern, RequestMatch, Rule,
        SqlClass, SqlMatch, SshMatch, TargetMatch, TargetSettings, Verdict,
        DEFAULT_APPROVAL_TIMEOUT,
    },
    protocol::Protocol,
};

impl Ctx<'_> {
    pub(super) fn target(&mut self, raw: &RawTarget, span: Range<usize>) -> Option<TargetSettings> {
        let before = self.errors.len();
        if raw.name.is_none() && raw.protocol.is_none() {
            self.error(
                &span,
                "a [[target]] needs `name`, `protocol` or both".into(),
                "name = \"orders-db\" (a pattern is fine) and/or protocol = \"postgres\""
                    .to_string(),
            );
        }
        let name = raw
            .name
            .as_ref()
            .and_then(|n| self.globs(&vec![n.clone()], None, false).pop());
        let protocol = raw.protocol.as_ref().and_then(|p| self.protocol(p));
        let mut settings = TargetSettings::fallback();
        if let Some(v) = raw.default.as_ref().and_then(|d| self.verdict(d, false)) {
            settings.default = v;
        }
        if let Some(v) = raw.on_unknown.as_ref().and_then(|d| self.verdict(d, false)) {
            settings.on_unknown = v;
        }
        if let Some(m) = &raw.mode {
            match m.get_ref().as_str() {
                "enforce" => settings.mode = Mode::Enforce,
                "observe" => settings.mode = Mode::Observe,
                other => self.error(
                    &m.span(),
                    format!("unknown mode {other:?}"),
                    "use enforce or observe".to_string(),
                ),
            }
        }
        settings.approval_timeout = raw
            .approval_timeout
            .as_ref()
            .and_then(|d| self.duration(d))
            .unwrap_or(DEFAULT_APPROVAL_TIMEOUT);
        settings.read_only_functions = self.globs(&raw.read_only_functions, Some('.'), false);
        settings.name = name;
        settings.protocol = protocol;
        settings.origin = Some(self.origin(&span));
        (self.errors.len() == before).then_some(settings)
    }

    pub(super) fn rule(&mut self, raw: &RawRule, span: Range<usize>) -> Option<Rule> {
        let before = self.errors.len();
        let id = raw.id.get_ref().clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.error(&raw.id.span(), format!("rule id {id:?} must be non-empty and use only letters, digits, '-', '_' and '.'"), None);
        }
        let is_mask = raw.verdict.get_ref() == "mask";
        let verdict = if is_mask {
            None
        } else {
            self.verdict(&raw.verdict, true)
        };
        let target = match &raw.target {
            Some(t) => TargetMatch {
                names: self.globs(&t.name, None, false),
                protocols: t.protocol.iter().filter_map(|p| self.protocol(p)).collect(),
            },
            None => TargetMatch::default(),
        };
        let identity = match &raw.identity {
            Some(i) => IdentityMatch {
                uids: i.uid.clone(),
                users: self.globs(&i.user, None, false),
                processes: self.globs(&i.process, None, false),
                exes: self.globs(&i.exe, Some('/'), false),
                ancestors: self.globs(&i.ancestor, Some('/'), false),
                cgroups: self.globs(&i.cgroup, Some('/'), false),
                units: self.globs(&i.unit, None, false),
            },
            None => IdentityMatch::default(),
        };
        let request = self.request(raw, &target);
        let effect = match verdict {
            Some(v) => {
                if let Some(m) = &raw.mask {
                    self.error(
                        &m.span(),
                        format!("[rule.mask] only belongs to verdict = \"mask\", not {v}"),
                        None,
                    );
                }
                Some(Effect::Verdict(v))
            }
            None if is_mask => {
                if let Some(m) = &raw.mask {
                    self.mask(&id, m)
                } else {
                    self.error(
                        &raw.verdict.span(),
                        "verdict = \"mask\" needs a [rule.mask] section".into(),
                        "[rule.mask] columns = [\"users.email\"], detectors = [\"email\"], style = \"redact\""
                            .to_string(),
                    );
                    None
                }
            }
            None => None,
        };
        if let Some(m) = &raw.message {
            if !matches!(effect, Some(Effect::Verdict(Verdict::Deny))) {
                self.error(
                    &m.span(),
                    "`message` is only shown for verdict = \"deny\"".into(),
                    None,
                );
            }
        }
        let approval_timeout = raw.approval_timeout.as_ref().and_then(|d| {
            if !matches!(effect, Some(Effect::Verdict(Verdict::Approve))) {
                self.error(
                    &d.span(),
                    "`approval_timeout` only applies to verdict = \"approve\"".into(),
                    None,
                );
            }
            self.duration(d)
        });
        if self.errors.len() != before {
            return None;
        }
        Some(Rule {
            id,
            origin: self.origin(&span),
            description: raw.description.clone(),
            effect: effect?,
            message: raw.message.as_ref().map(|m| m.get_ref().clone()),
            approval_timeout,
            target,
            identity,
            request,
        })
    }

    fn request(&mut self, raw: &RawRule, target: &TargetMatch) -> RequestMatch {
        let sections: Vec<(&str, Range<usize>, Protocol)> = [
            raw.sql
                .as_ref()
                .map(|s| ("sql", s.span(), Protocol::Postgres)),
            raw.ssh.as_ref().map(|s| ("ssh", s.span(), Protocol::Ssh)),
            raw.http
                .as_ref()
                .map(|s| ("http", s.span(), Protocol::Http)),
            raw.kube
                .as_ref()
                .map(|s| ("kube", s.span(), Protocol::Kubernetes)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if sections.len() > 1 {
            let names: Vec<String> = sections.iter().map(|s| format!("[rule.{}]", s.0)).collect();
            self.error(
                &sections[1].1,
                format!(
                    "a rule has one request section, this one has {}",
                    names.join(" and ")
                ),
                "split it into one rule per protocol".to_string(),
            );
        }
        if let Some((name, span, proto)) = sections.first() {
            if !target.protocols.is_empty() && !target.protocols.contains(proto) {
                self.error(span, format!("[rule.{name}] only matches {proto} requests, but the rule's targets are other protocols"), None);
            }
        }
        if let Some(s) = &raw.sql {
            return RequestMatch::Sql(self.sql_match(s.get_ref()));
        }
        if let Some(s) = &raw.ssh {
            let s = s.get_ref();
            let mut commands = Vec::new();
            for c in &s.command {
                match ArgvPattern::new(c.get_ref()) {
                    Ok(p) => commands.push(p),
                    Err(e) => self.error(
                        &c.span(),
                        format!("bad command pattern: {e}"),
                        "words are globs; a last word `**` matches any further arguments"
                            .to_string(),
                    ),
                }
            }
            let mut regexes = Vec::new();
            for r in &s.regex {
                match regex::Regex::new(r.get_ref()) {
                    Ok(re) => regexes.push(re),
                    Err(e) => self.error(&r.span(), format!("bad regex: {e}"), None),
                }
            }
            let (sftp_read, sftp_write) = match &s.sftp {
                Some(f) => (
                    self.globs(&f.read, Some('/'), false),
                    self.globs(&f.write, Some('/'), false),
                ),
                None => (Vec::new(), Vec::new()),
            };
            return RequestMatch::Ssh(SshMatch {
                commands,
                regexes,
                shell: s.shell,
                sftp_read,
                sftp_write,
                forward: self.globs(&s.forward, Some('.'), true),
                remote_forward: self.globs(&s.remote_forward, Some('.'), true),
                agent: s.agent,
                x11: s.x11,
                env: self.globs(&s.env, None, false),
            });
        }
        if let Some(h) = &raw.http {
            let h = h.get_ref();
            return RequestMatch::Http(HttpMatch {
                methods: h
                    .method
                    .iter()
                    .map(|m| m.get_ref().to_ascii_uppercase())
                    .collect(),
                hosts: self.globs(&h.host, Some('.'), true),
                paths: self.globs(&h.path, Some('/'), false),
            });
        }
        if let Some(k) = &raw.kube {
            let k = k.get_ref();
            return RequestMatch::Kube(KubeMatch {
                verbs: self.globs(&k.verb, None, true),
                groups: self.globs(&k.group, None, true),
                resources: self.globs(&k.resource, None, true),
                subresources: self.globs(&k.subresource, None, true),
                namespaces: self.globs(&k.namespace, None, false),
                names: self.globs(&k.name, None, false),
            });
        }
        RequestMatch::Any
    }

    fn sql_match(&mut self, s: &RawSql) -> SqlMatch {
        let classes = s.class.as_ref().map(|list| {
            let mut out = Vec::new();
            for c in list {
                if let Some(set) = SqlClass::parse_set(c.get_ref()) {
                    out.extend(set);
                } else {
                    let all: Vec<&str> = SqlClass::ALL.iter().map(|c| c.name()).collect();
                    self.error(
                        &c.span(),
                        format!("unknown SQL class {:?}", c.get_ref()),
                        format!(
                            "use one of {}, or a group: write, privileged, any",
                            all.join(", ")
                        ),
                    );
                }
            }
            out.sort();
            out.dedup();
            out
        });
        let objects = s
            .objects
            .iter()
            .filter_map(|o| {
                let full = self.globs(&vec![o.clone()], Some('.'), false).pop()?;
                let table_part = o
                    .get_ref()
                    .rsplit_once('.')
                    .and_then(|(_, t)| Glob::new(t, Some('.'), false).ok());
                Some(ObjectPattern { full, table_part })
            })
            .collect();
        SqlMatch {
            classes,
            objects,
            functions: self.globs(&s.functions, Some('.'), false),
        }
    }

    fn mask(&mut self, id: &str, m: &Spanned<RawMask>) -> Option<Effect> {
        let span = m.span();
        let m = m.get_ref();
        let before = self.errors.len();
        if m.columns.is_empty() && m.detectors.is_empty() {
            self.error(
                &span,
                "a mask needs `columns`, `detectors` or both".into(),
                None,
            );
        }
        let mut columns = Vec::new();
        for c in &m.columns {
            match ColumnPattern::new(c.get_ref()) {
                Ok(p) => columns.push(p),
                Err(e) => self.error(&c.span(), e, None),
            }
        }
        let mut detectors = Vec::new();
        for d in &m.detectors {
            match Detector::parse(d.get_ref()) {
                Some(x) => detectors.push(x),
                None => self.error(
                    &d.span(),
                    format!("unknown detector {:?}", d.get_ref()),
                    "use email, card, iban or token".to_string(),
                ),
            }
        }
        let style = MaskStyle::parse(m.style.get_ref(), m.salt.as_deref());
        if style.is_none() {
            self.error(
                &m.style.span(),
                format!("unknown mask style {:?}", m.style.get_ref()),
                "use redact, hash or keep-last-N (N up to 64)".to_string(),
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Effect::Mask(Arc::new(MaskRule {
            rule: id.to_string(),
            columns,
            detectors,
            style: style?,
        })))
    }
}

//! Policy files: TOML in a directory, every error with file, line and a hint.
//!
//! The shape is checked by serde with `deny_unknown_fields` (so a misspelt key is an error that
//! names it, never a silently ignored matcher); values that need more than a type check carry
//! their position (`toml::Spanned`) so the error can point at them.

use std::{
    collections::HashMap,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    mask::{ColumnPattern, Detector, MaskRule, MaskStyle},
    matchers::{ArgvPattern, Glob},
    Effect, HttpMatch, IdentityMatch, KubeMatch, Mode, ObjectPattern, Origin, PolicySet,
    RequestMatch, Rule, SqlClass, SqlMatch, SshMatch, TargetMatch, TargetSettings, Verdict,
    DEFAULT_APPROVAL_TIMEOUT,
};
use crate::config::Protocol;

/// Largest policy file read.
const MAX_FILE: u64 = 1024 * 1024;
/// Most policy files in a directory.
const MAX_FILES: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read policy directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", Located { path, line: *line, column: *column, message, hint: hint.as_deref() })]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        hint: Option<String>,
    },
}

struct Located<'a> {
    path: &'a Path,
    line: usize,
    column: usize,
    message: &'a str,
    hint: Option<&'a str>,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(h) = self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Loads every `*.toml` file in `dir` (sorted, hidden files skipped) into one set. All errors of
/// all files are returned, not just the first.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyFileError>> {
    let entries = std::fs::read_dir(dir).map_err(|source| {
        vec![PolicyFileError::ReadDir {
            path: dir.to_path_buf(),
            source,
        }]
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
                && p.is_file()
        })
        .collect();
    files.sort();
    if files.len() > MAX_FILES {
        return Err(vec![PolicyFileError::ReadDir {
            path: dir.to_path_buf(),
            source: std::io::Error::other(format!("more than {MAX_FILES} policy files")),
        }]);
    }
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for path in &files {
        let text = match read_bounded(path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match parse_file(path, &text) {
            Ok(p) => parsed.push(p),
            Err(mut e) => errors.append(&mut e),
        }
    }
    let set = combine(parsed, files, &mut errors);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(errors)
    }
}

fn read_bounded(path: &Path) -> Result<String, PolicyFileError> {
    let read_err = |source| PolicyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_FILE {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {MAX_FILE} bytes"
        ))));
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// The rules and target settings of one file.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub rules: Vec<Rule>,
    pub targets: Vec<TargetSettings>,
}

/// Joins files, checking what must be unique across them: rule ids and target selectors.
fn combine(
    parsed: Vec<ParsedFile>,
    files: Vec<PathBuf>,
    errors: &mut Vec<PolicyFileError>,
) -> PolicySet {
    let mut rules: Vec<Rule> = Vec::new();
    let mut targets: Vec<TargetSettings> = Vec::new();
    let mut ids: HashMap<String, Origin> = HashMap::new();
    for p in parsed {
        for r in p.rules {
            if let Some(first) = ids.get(&r.id) {
                errors.push(invalid_at(
                    &r.origin,
                    format!("rule id {:?} is already used at {first}", r.id),
                    "rule ids name the rule in decisions and records; make each one unique",
                ));
                continue;
            }
            ids.insert(r.id.clone(), r.origin.clone());
            rules.push(r);
        }
        for t in p.targets {
            let same = targets.iter().find(|o| {
                o.protocol == t.protocol
                    && o.name.as_ref().map(Glob::as_str) == t.name.as_ref().map(Glob::as_str)
            });
            if let (Some(first), Some(origin)) = (same, &t.origin) {
                let at = first
                    .origin
                    .as_ref()
                    .map_or_else(String::new, |o| format!(" at {o}"));
                errors.push(invalid_at(
                    origin,
                    format!("these target settings are already given{at}"),
                    "give each [[target]] (name, protocol) once, in one file",
                ));
                continue;
            }
            targets.push(t);
        }
    }
    PolicySet::new(rules, targets, files)
}

fn invalid_at(origin: &Origin, message: String, hint: &str) -> PolicyFileError {
    PolicyFileError::Invalid {
        path: origin.file.clone(),
        line: origin.line,
        column: 1,
        message,
        hint: Some(hint.to_string()),
    }
}

// The file's shape.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    on_unknown: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    approval_timeout: Option<Spanned<String>>,
    #[serde(default)]
    read_only_functions: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    description: Option<String>,
    verdict: Spanned<String>,
    message: Option<Spanned<String>>,
    approval_timeout: Option<Spanned<String>>,
    target: Option<RawTargetMatch>,
    identity: Option<RawIdentity>,
    sql: Option<Spanned<RawSql>>,
    ssh: Option<Spanned<RawSsh>>,
    http: Option<Spanned<RawHttp>>,
    kube: Option<Spanned<RawKube>>,
    mask: Option<Spanned<RawMask>>,
}

type Patterns = Vec<Spanned<String>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetMatch {
    #[serde(default)]
    name: Patterns,
    #[serde(default)]
    protocol: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    uid: Vec<u32>,
    #[serde(default)]
    user: Patterns,
    #[serde(default)]
    process: Patterns,
    #[serde(default)]
    exe: Patterns,
    #[serde(default)]
    ancestor: Patterns,
    #[serde(default)]
    cgroup: Patterns,
    #[serde(default)]
    unit: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSql {
    class: Option<Patterns>,
    #[serde(default)]
    objects: Patterns,
    #[serde(default)]
    functions: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    #[serde(default)]
    command: Patterns,
    #[serde(default)]
    regex: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    method: Patterns,
    #[serde(default)]
    host: Patterns,
    #[serde(default)]
    path: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKube {
    #[serde(default)]
    verb: Patterns,
    #[serde(default)]
    resource: Patterns,
    #[serde(default)]
    subresource: Patterns,
    #[serde(default)]
    namespace: Patterns,
    #[serde(default)]
    name: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    #[serde(default)]
    columns: Patterns,
    #[serde(default)]
    detectors: Patterns,
    style: Spanned<String>,
    salt: Option<String>,
}

/// Parses one file's text. `path` is used for positions and origins only.
pub fn parse_file(path: &Path, text: &str) -> Result<ParsedFile, Vec<PolicyFileError>> {
    let ctx = Ctx {
        path,
        text,
        errors: Vec::new(),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => return Err(vec![ctx.toml_error(&e)]),
    };
    let mut ctx = ctx;
    let mut out = ParsedFile::default();
    for t in raw.target {
        let span = t.span();
        if let Some(t) = ctx.target(t.into_inner(), span) {
            out.targets.push(t);
        }
    }
    for r in raw.rule {
        let span = r.span();
        if let Some(r) = ctx.rule(r.into_inner(), span) {
            out.rules.push(r);
        }
    }
    if ctx.errors.is_empty() {
        Ok(out)
    } else {
        Err(ctx.errors)
    }
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<PolicyFileError>,
}

impl Ctx<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    fn origin(&self, span: &Range<usize>) -> Origin {
        Origin {
            file: self.path.to_path_buf(),
            line: self.position(span.start).0,
        }
    }

    fn error(&mut self, span: &Range<usize>, message: String, hint: impl Into<Option<String>>) {
        let (line, column) = self.position(span.start);
        self.errors.push(PolicyFileError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
            hint: hint.into(),
        });
    }

    fn toml_error(&self, e: &toml::de::Error) -> PolicyFileError {
        let (line, column) = e.span().map_or((1, 1), |s| self.position(s.start));
        let message = e.message().trim().to_string();
        let hint = if message.contains("unknown field") {
            "remove or correct the key: unknown keys are errors so that a typo never drops a condition"
        } else if message.contains("missing field") {
            "every [[rule]] needs `id` and `verdict`; a [rule.mask] needs `style`"
        } else if message.contains("invalid type") {
            "lists are written as arrays, e.g. class = [\"read\"]"
        } else {
            "see policies/README.md for the format"
        };
        PolicyFileError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
            hint: Some(hint.to_string()),
        }
    }

    fn globs(&mut self, list: &Patterns, sep: Option<char>, ci: bool) -> Vec<Glob> {
        list.iter()
            .filter_map(|p| match Glob::new(p.get_ref(), sep, ci) {
                Ok(g) => Some(g),
                Err(e) => {
                    self.error(
                        &p.span(),
                        format!("bad pattern: {e}"),
                        "patterns use `*`, `**`, `?` and `\\` to escape".to_string(),
                    );
                    None
                }
            })
            .collect()
    }

    fn verdict(&mut self, s: &Spanned<String>, allow_mask: bool) -> Option<Option<Verdict>> {
        match s.get_ref().as_str() {
            "allow" => Some(Some(Verdict::Allow)),
            "deny" => Some(Some(Verdict::Deny)),
            "approve" => Some(Some(Verdict::Approve)),
            "mask" if allow_mask => Some(None),
            other => {
                let expected = if allow_mask {
                    "allow, deny, approve or mask"
                } else {
                    "allow, deny or approve"
                };
                self.error(
                    &s.span(),
                    format!("unknown verdict {other:?}"),
                    format!("use {expected}"),
                );
                None
            }
        }
    }

    fn duration(&mut self, s: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d > Duration::ZERO && d <= Duration::from_secs(24 * 3600) => Some(d),
            Ok(_) => {
                self.error(
                    &s.span(),
                    "approval timeout must be between 1s and 24h".into(),
                    None,
                );
                None
            }
            Err(e) => {
                self.error(
                    &s.span(),
                    format!("bad duration {:?}: {e}", s.get_ref()),
                    "write e.g. \"30s\", \"5m\", \"1h\"".to_string(),
                );
                None
            }
        }
    }

    fn protocol(&mut self, s: &Spanned<String>) -> Option<Protocol> {
        Some(match s.get_ref().as_str() {
            "tcp" => Protocol::Tcp,
            "postgres" => Protocol::Postgres,
            "ssh" => Protocol::Ssh,
            "http" => Protocol::Http,
            "kubernetes" => Protocol::Kubernetes,
            other => {
                self.error(
                    &s.span(),
                    format!("unknown protocol {other:?}"),
                    "use tcp, postgres, ssh, http or kubernetes".to_string(),
                );
                return None;
            }
        })
    }

    fn target(&mut self, raw: RawTarget, span: Range<usize>) -> Option<TargetSettings> {
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
        if let Some(v) = raw
            .default
            .as_ref()
            .and_then(|d| self.verdict(d, false))
            .flatten()
        {
            settings.default = v;
        }
        if let Some(v) = raw
            .on_unknown
            .as_ref()
            .and_then(|d| self.verdict(d, false))
            .flatten()
        {
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

    fn rule(&mut self, raw: RawRule, span: Range<usize>) -> Option<Rule> {
        let before = self.errors.len();
        let id = raw.id.get_ref().clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.error(&raw.id.span(), format!("rule id {id:?} must be non-empty and use only letters, digits, '-', '_' and '.'"), None);
        }
        let verdict = self.verdict(&raw.verdict, true);
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
        let request = self.request(&raw, &target);
        let effect = match verdict {
            Some(Some(v)) => {
                if let Some(m) = &raw.mask {
                    self.error(
                        &m.span(),
                        format!("[rule.mask] only belongs to verdict = \"mask\", not {v}"),
                        None,
                    );
                }
                Some(Effect::Verdict(v))
            }
            Some(None) => match &raw.mask {
                Some(m) => self.mask(&id, m),
                None => {
                    self.error(&raw.verdict.span(), "verdict = \"mask\" needs a [rule.mask] section".into(), "[rule.mask] columns = [\"users.email\"], detectors = [\"email\"], style = \"redact\"".to_string());
                    None
                }
            },
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
            description: raw.description,
            effect: effect?,
            message: raw.message.map(Spanned::into_inner),
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
            let s = s.get_ref();
            let classes = s.class.as_ref().map(|list| {
                let mut out = Vec::new();
                for c in list {
                    match SqlClass::parse_set(c.get_ref()) {
                        Some(set) => out.extend(set),
                        None => {
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
            return RequestMatch::Sql(SqlMatch {
                classes,
                objects,
                functions: self.globs(&s.functions, Some('.'), false),
            });
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
            return RequestMatch::Ssh(SshMatch { commands, regexes });
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
                resources: self.globs(&k.resource, None, true),
                subresources: self.globs(&k.subresource, None, true),
                namespaces: self.globs(&k.namespace, None, false),
                names: self.globs(&k.name, None, false),
            });
        }
        RequestMatch::Any
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

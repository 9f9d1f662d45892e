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
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

mod rules;

use super::{matchers::Glob, Origin, PolicySet, Rule, TargetSettings, Verdict};
use crate::protocol::Protocol;

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
    shell: bool,
    sftp: Option<RawSftp>,
    #[serde(default)]
    regex: Patterns,
    #[serde(default)]
    forward: Patterns,
    #[serde(default)]
    remote_forward: Patterns,
    #[serde(default)]
    agent: bool,
    #[serde(default)]
    x11: bool,
    #[serde(default)]
    env: Patterns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSftp {
    #[serde(default)]
    read: Patterns,
    #[serde(default)]
    write: Patterns,
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
    group: Patterns,
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
    let mut ctx = ctx;
    let mut out = ParsedFile::default();
    match toml::from_str::<RawFile>(text) {
        Ok(raw) => ctx.check(raw, &mut out),
        // The deserializer stops at the first error: parse each `[[...]]` section on its own
        // so that every section's first error (and every semantic error) is reported.
        Err(whole) => {
            let before = ctx.errors.len();
            for section in sections(text) {
                match toml::from_str::<RawFile>(&section) {
                    Ok(raw) => ctx.check(raw, &mut out),
                    Err(e) => {
                        let error = ctx.toml_error(&e);
                        ctx.errors.push(error);
                    }
                }
            }
            // Sections that each parse may still clash as a whole (a key defined twice).
            if ctx.errors.len() == before {
                let error = ctx.toml_error(&whole);
                ctx.errors.push(error);
            }
        }
    }
    if ctx.errors.is_empty() {
        Ok(out)
    } else {
        Err(ctx.errors)
    }
}

/// A deserializer message without the parser's own type names (`expected struct RawSql`).
fn readable(message: &str) -> String {
    match message.find("expected struct Raw") {
        Some(at) => {
            let rest = &message[at + "expected struct Raw".len()..];
            let name_end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            format!("{}expected a table{}", &message[..at], &rest[name_end..])
        }
        None => message.to_string(),
    }
}

/// The file cut at each line that opens an array-of-tables header (`[[rule]]`,
/// `[[target]]`), each section as the whole file's text with every byte outside it blanked
/// (newlines kept), so positions and spans in a section are those of the file.
fn sections(text: &str) -> Vec<String> {
    let mut starts = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > 0 && line.trim_start().starts_with("[[") {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts.push(text.len());
    starts
        .windows(2)
        .map(|w| {
            let blanked: Vec<u8> = text
                .bytes()
                .enumerate()
                .map(|(i, b)| {
                    if (w[0]..w[1]).contains(&i) || b == b'\n' {
                        b
                    } else {
                        b' '
                    }
                })
                .collect();
            // Only ASCII bytes were written outside the section, and the section is cut at
            // line starts, so the text stays valid UTF-8.
            String::from_utf8(blanked).unwrap_or_default()
        })
        .collect()
}

impl Ctx<'_> {
    /// The semantic checks of a parsed file (or section), its settings and rules added to `out`.
    fn check(&mut self, raw: RawFile, out: &mut ParsedFile) {
        for t in raw.target {
            let span = t.span();
            if let Some(t) = self.target(&t.into_inner(), span) {
                out.targets.push(t);
            }
        }
        for r in raw.rule {
            let span = r.span();
            if let Some(r) = self.rule(&r.into_inner(), span) {
                out.rules.push(r);
            }
        }
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
        let message = readable(e.message().trim());
        let hint = if message.contains("unknown field") {
            "remove or correct the key: unknown keys are errors so that a typo never drops a condition"
        } else if message.contains("missing field") {
            "every [[rule]] needs `id` and `verdict`; a [rule.mask] needs `style`"
        } else if message.contains("expected a table") {
            "write it as a table, e.g. target = { name = [\"orders-db\"] }"
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

    /// A verdict; `in_rule` only changes the hint (rules may also say "mask").
    fn verdict(&mut self, s: &Spanned<String>, in_rule: bool) -> Option<Verdict> {
        match s.get_ref().as_str() {
            "allow" => Some(Verdict::Allow),
            "deny" => Some(Verdict::Deny),
            "approve" => Some(Verdict::Approve),
            other => {
                let expected = if in_rule {
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
            Ok(d) if d > Duration::ZERO && d <= Duration::from_hours(24) => Some(d),
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
            "udp" => Protocol::Udp,
            other => {
                self.error(
                    &s.span(),
                    format!("unknown protocol {other:?}"),
                    "use tcp, postgres, ssh, http, kubernetes or udp".to_string(),
                );
                return None;
            }
        })
    }
}

//! The pieces rules match with: globs, SSH command lines split like a shell would, HTTP paths
//! normalized the way a server would resolve them.
//!
//! Each input that could be read two ways (a shell expansion, an encoded slash in a path) is
//! refused as *unknown* rather than guessed, so an allow rule never vouches for something the
//! target would interpret differently.

use std::fmt;

/// A glob: `*` matches within one segment (not across `sep`), `**` across segments, `?` one
/// character; `\` escapes the next character. Without a separator `*` and `**` are the same.
///
/// Matching is dynamic programming over (pattern, text): linear in their product, never
/// exponential, whatever the input.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Tok>,
    sep: Option<char>,
    case_insensitive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    One,
    Star,
    DeepStar,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Glob {
    pub fn new(pattern: &str, sep: Option<char>, case_insensitive: bool) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) => tokens.push(Tok::Lit(fold(n, case_insensitive))),
                    None => return Err(format!("{pattern:?} ends with a lone backslash")),
                },
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    if chars.peek() == Some(&'*') {
                        return Err(format!("{pattern:?} has `***`; use `*` or `**`"));
                    }
                    tokens.push(Tok::DeepStar);
                }
                '*' => tokens.push(Tok::Star),
                '?' => tokens.push(Tok::One),
                c => tokens.push(Tok::Lit(fold(c, case_insensitive))),
            }
        }
        Ok(Self {
            source: pattern.to_string(),
            tokens,
            sep,
            case_insensitive,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches everything (`*` without a separator, or `**`).
    pub fn matches_all(&self) -> bool {
        matches!(self.tokens.as_slice(), [Tok::DeepStar])
            || (self.sep.is_none() && self.tokens == [Tok::Star])
    }

    pub fn is_match(&self, text: &str) -> bool {
        let ci = self.case_insensitive;
        // Fast paths for the common shapes (`name`, `prefix*`, `*`), without allocating.
        match self.tokens.split_last() {
            None => return text.is_empty(),
            Some((Tok::DeepStar, prefix)) if prefix.iter().all(|t| matches!(t, Tok::Lit(_))) => {
                return literal_prefix(prefix, text, ci).is_some();
            }
            Some((Tok::Star, prefix)) if prefix.iter().all(|t| matches!(t, Tok::Lit(_))) => {
                return literal_prefix(prefix, text, ci)
                    .is_some_and(|rest| self.sep.is_none_or(|s| !rest.contains(s)));
            }
            Some((Tok::Lit(_), _)) if self.tokens.iter().all(|t| matches!(t, Tok::Lit(_))) => {
                return literal_prefix(&self.tokens, text, ci).is_some_and(str::is_empty);
            }
            Some(_) => {}
        }
        self.dp_match(text)
    }

    /// The general matcher (the fast paths above must agree with it; a test checks).
    fn dp_match(&self, text: &str) -> bool {
        let text: Vec<char> = text
            .chars()
            .map(|c| fold(c, self.case_insensitive))
            .collect();
        // reach[j]: the pattern so far can consume exactly text[..j].
        let mut reach = vec![false; text.len() + 1];
        let mut next = vec![false; text.len() + 1];
        reach[0] = true;
        for tok in &self.tokens {
            next.fill(false);
            match tok {
                Tok::Lit(l) => {
                    for j in 0..text.len() {
                        next[j + 1] = reach[j] && text[j] == *l;
                    }
                }
                Tok::One => {
                    for j in 0..text.len() {
                        next[j + 1] = reach[j] && Some(text[j]) != self.sep;
                    }
                }
                Tok::Star | Tok::DeepStar => {
                    let crosses = *tok == Tok::DeepStar || self.sep.is_none();
                    let mut run = false;
                    for j in 0..=text.len() {
                        run = reach[j]
                            || (run && j > 0 && (crosses || Some(text[j - 1]) != self.sep));
                        next[j] = run;
                    }
                }
            }
            std::mem::swap(&mut reach, &mut next);
            if !reach.iter().any(|r| *r) {
                return false;
            }
        }
        reach[text.len()]
    }
}

/// The rest of `text` after the literal tokens, if it starts with them.
fn literal_prefix<'t>(lits: &[Tok], text: &'t str, ci: bool) -> Option<&'t str> {
    let mut chars = text.char_indices();
    for t in lits {
        let Tok::Lit(l) = t else { return None };
        let (_, c) = chars.next()?;
        if fold(c, ci) != *l {
            return None;
        }
    }
    Some(chars.as_str())
}

fn fold(c: char, case_insensitive: bool) -> char {
    if case_insensitive {
        c.to_ascii_lowercase()
    } else {
        c
    }
}

/// Why an SSH command line cannot be judged word by word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellError {
    UnterminatedQuote,
    /// `$VAR`, `$(...)`, backticks, `{a,b}`, `<(...)`: the words are only known on the server.
    Expansion(char),
    /// `>` / `<`: files opened by the shell, outside any argv.
    Redirection(char),
}

impl fmt::Display for ShellError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShellError::UnterminatedQuote => f.write_str("unterminated quote"),
            ShellError::Expansion(c) => write!(
                f,
                "shell expansion `{c}` (the words are only known on the server)"
            ),
            ShellError::Redirection(c) => write!(f, "redirection `{c}`"),
        }
    }
}

/// Splits a command line into simple commands (at `;`, `&`, `|`, newlines) and each into words,
/// with POSIX quoting. Unquoted glob characters stay in the words as written.
pub fn split_command(line: &str) -> Result<Vec<Vec<String>>, ShellError> {
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let end_word = |words: &mut Vec<String>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(q) => word.push(q),
                        None => return Err(ShellError::UnterminatedQuote),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n @ ('"' | '\\' | '$' | '`')) => word.push(n),
                            Some('\n') => {}
                            Some(n) => {
                                word.push('\\');
                                word.push(n);
                            }
                            None => return Err(ShellError::UnterminatedQuote),
                        },
                        Some(e @ ('$' | '`')) => return Err(ShellError::Expansion(e)),
                        Some(q) => word.push(q),
                        None => return Err(ShellError::UnterminatedQuote),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(n) => {
                    in_word = true;
                    word.push(n);
                }
                None => return Err(ShellError::UnterminatedQuote),
            },
            '$' | '`' | '{' | '}' | '(' | ')' => return Err(ShellError::Expansion(c)),
            '>' | '<' => return Err(ShellError::Redirection(c)),
            ';' | '&' | '|' | '\n' => {
                end_word(&mut words, &mut word, &mut in_word);
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            c if c.is_whitespace() => end_word(&mut words, &mut word, &mut in_word),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut words, &mut word, &mut in_word);
    if !words.is_empty() {
        commands.push(words);
    }
    Ok(commands)
}

/// An argv pattern: words split like a command line, each a glob (`*` not crossing `/`); a last
/// word `**` matches any remaining arguments, including none.
#[derive(Debug, Clone)]
pub struct ArgvPattern {
    source: String,
    words: Vec<Glob>,
    rest: bool,
}

impl ArgvPattern {
    pub fn new(pattern: &str) -> Result<Self, String> {
        // Split on whitespace, honoring quotes, but keep glob escapes for Glob::new.
        let words = split_pattern_words(pattern)?;
        if words.is_empty() {
            return Err("an empty command pattern matches nothing".into());
        }
        let rest = words.last().is_some_and(|w| w == "**");
        let globs = words[..words.len() - usize::from(rest)]
            .iter()
            .map(|w| Glob::new(w, Some('/'), false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            source: pattern.to_string(),
            words: globs,
            rest,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, argv: &[String]) -> bool {
        if argv.len() < self.words.len() || (!self.rest && argv.len() != self.words.len()) {
            return false;
        }
        self.words.iter().zip(argv).all(|(g, w)| g.is_match(w))
    }
}

fn split_pattern_words(pattern: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in pattern.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("{pattern:?} has an unterminated quote"));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Why an HTTP path cannot be matched as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    /// `%2F`, `%5C`, `%25`, `%00` or a backslash: servers disagree on what they mean.
    AmbiguousEncoding,
    AboveRoot,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "path does not start with /",
            PathError::AmbiguousEncoding => "encoded slash, backslash, percent or NUL in the path",
            PathError::AboveRoot => "`..` above the root",
        })
    }
}

/// The path part of a request target, percent-decoded, with `.`/`..` resolved and repeated
/// slashes collapsed; the query string and fragment are dropped.
pub fn normalize_path(target: &str) -> Result<String, PathError> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::AmbiguousEncoding)?;
            if matches!(v, b'/' | b'\\' | b'%' | 0) {
                return Err(PathError::AmbiguousEncoding);
            }
            decoded.push(v);
            i += 3;
        } else if b == b'\\' || b == 0 {
            return Err(PathError::AmbiguousEncoding);
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::AmbiguousEncoding)?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// The host of a request without port or trailing dot, lowercased.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str, sep: Option<char>) -> Glob {
        Glob::new(p, sep, false).unwrap()
    }

    #[test]
    fn globs() {
        assert!(g("ls", None).is_match("ls"));
        assert!(!g("ls", None).is_match("lsx"));
        assert!(g("/var/log/*", Some('/')).is_match("/var/log/syslog"));
        assert!(!g("/var/log/*", Some('/')).is_match("/var/log/a/b"));
        assert!(
            !g("/var/log/*", Some('/')).is_match("/var/log/../x"),
            "* never crosses a separator"
        );
        assert!(g("/v1/**", Some('/')).is_match("/v1/a/b/c"));
        assert!(g("/v1/**", Some('/')).is_match("/v1/"));
        assert!(g("*.internal", Some('.')).is_match("api.internal"));
        assert!(!g("*.internal", Some('.')).is_match("evil.com.internal"));
        assert!(g("**.internal", Some('.')).is_match("a.b.internal"));
        assert!(g("a?c", None).is_match("abc"));
        assert!(g(r"a\*", None).is_match("a*"));
        assert!(!g(r"a\*", None).is_match("ab"));
        assert!(Glob::new("GET", None, true).unwrap().is_match("get"));
        assert!(Glob::new("a***", None, false).is_err());
        assert!(Glob::new("a\\", None, false).is_err());
        let long = "a".repeat(5000);
        assert!(
            !g("*a*a*a*a*a*a*a*b", None).is_match(&long),
            "no exponential blow-up"
        );
    }

    #[test]
    fn fast_paths_agree_with_the_general_matcher() {
        let patterns = [
            "", "ls", "prod-*", "/v1/**", "*", "**", "GET", "a\\*", "api.*",
        ];
        let texts = [
            "", "ls", "lsx", "prod-", "prod-a", "prod-a/b", "prod-a.b", "/v1/", "/v1/a/b", "/v2",
            "get", "GET", "a*", "ab", "api.x", "api.x.y",
        ];
        for p in patterns {
            for sep in [None, Some('/'), Some('.')] {
                for ci in [false, true] {
                    let g = Glob::new(p, sep, ci).unwrap();
                    for t in texts {
                        assert_eq!(
                            g.is_match(t),
                            g.dp_match(t),
                            "pattern {p:?} sep {sep:?} ci {ci} text {t:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shell_splitting() {
        assert_eq!(
            split_command("ls -la /tmp").unwrap(),
            vec![vec!["ls", "-la", "/tmp"]]
        );
        assert_eq!(
            split_command("echo 'a b' \"c d\" e\\ f").unwrap(),
            vec![vec!["echo", "a b", "c d", "e f"]]
        );
        assert_eq!(
            split_command("ls; rm -rf /").unwrap(),
            vec![vec!["ls"], vec!["rm", "-rf", "/"]]
        );
        assert_eq!(split_command("a && b || c | d & e").unwrap().len(), 5);
        assert_eq!(
            split_command("r'm' -rf /").unwrap(),
            vec![vec!["rm", "-rf", "/"]]
        );
        assert_eq!(split_command("echo $HOME"), Err(ShellError::Expansion('$')));
        assert_eq!(
            split_command("echo \"$(id)\""),
            Err(ShellError::Expansion('$'))
        );
        assert_eq!(split_command("echo `id`"), Err(ShellError::Expansion('`')));
        assert_eq!(split_command("{rm,-rf,/}"), Err(ShellError::Expansion('{')));
        assert_eq!(
            split_command("ls > /etc/x"),
            Err(ShellError::Redirection('>'))
        );
        assert_eq!(split_command("echo 'x"), Err(ShellError::UnterminatedQuote));
        assert_eq!(
            split_command("echo '$HOME'").unwrap(),
            vec![vec!["echo", "$HOME"]]
        );
        assert!(split_command("").unwrap().is_empty());
    }

    #[test]
    fn argv_patterns() {
        let p = ArgvPattern::new("systemctl status *").unwrap();
        let argv = |s: &str| split_command(s).unwrap().remove(0);
        assert!(p.is_match(&argv("systemctl status nginx")));
        assert!(!p.is_match(&argv("systemctl status")));
        assert!(!p.is_match(&argv("systemctl restart nginx")));
        assert!(!p.is_match(&argv("systemctl status nginx extra")));
        let p = ArgvPattern::new("ls **").unwrap();
        assert!(p.is_match(&argv("ls")));
        assert!(p.is_match(&argv("ls -la /tmp")));
        assert!(!p.is_match(&argv("lsblk")));
        let p = ArgvPattern::new("cat /var/log/*").unwrap();
        assert!(!p.is_match(&argv("cat /var/log/../../etc/shadow")));
        assert!(ArgvPattern::new("  ").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(normalize_path("/v1/users?x=1").unwrap(), "/v1/users");
        assert_eq!(normalize_path("/v1//a/./b/../c").unwrap(), "/v1/a/c");
        assert_eq!(normalize_path("/v1/%61dmin").unwrap(), "/v1/admin");
        assert_eq!(normalize_path("/v1/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/"), Ok("/".into()));
        assert_eq!(normalize_path("/a/"), Ok("/a/".into()));
        assert_eq!(normalize_path("/a%2Fb"), Err(PathError::AmbiguousEncoding));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::AmbiguousEncoding));
        assert_eq!(normalize_path("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_host("API.Example.com:8443"), "api.example.com");
        assert_eq!(normalize_host("[fd00::1]:443"), "fd00::1");
        assert_eq!(normalize_host("example.com."), "example.com");
    }
}

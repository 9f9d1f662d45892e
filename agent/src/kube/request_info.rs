//! What a Kubernetes API request does, read from its method, path and query exactly as the
//! apiserver reads it (`k8s.io/apiserver/pkg/endpoints/request.RequestInfoFactory.NewRequestInfo`),
//! so a rule judges the verb, resource and namespace the apiserver authorizes.
//!
//! The apiserver works on Go's decoded `URL.Path`; this reads the path the gateway forwards (its
//! normalised form) and decodes what is left the same way. What the two could read differently
//! is refused as unknown: an encoded slash, backslash, percent or NUL, an empty or dot segment,
//! a query with `;` (Go drops such pairs, other parsers do not) or a bad escape, a method the
//! apiserver has no verb for, and a special verb (`/watch/`, `/proxy/`) with nothing after it.

use std::borrow::Cow;

/// Why a request could not be read; the policy's `on_unknown` verdict applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KubeRequestError {
    #[error("path does not start with /")]
    NotAbsolute,
    #[error("encoded slash, backslash, percent or NUL, a bad escape or non-UTF-8 in the path")]
    PathEncoding,
    #[error("empty, `.` or `..` segment in the path")]
    PathSegment,
    #[error("`;` or a bad escape in the query")]
    QueryEncoding,
    #[error("no Kubernetes verb for this method")]
    Method,
    #[error("unable to determine kind and namespace from the URL")]
    SpecialVerb,
}

/// A request the apiserver authorizes as a resource request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRequest<'a> {
    /// get, list, watch, create, update, patch, delete, deletecollection, or proxy.
    pub verb: &'static str,
    /// `api` or `apis`.
    pub api_prefix: &'static str,
    /// Empty for the core group (`/api/v1`).
    pub api_group: Cow<'a, str>,
    pub api_version: Cow<'a, str>,
    /// `None`: cluster-scoped, or across all namespaces.
    pub namespace: Option<Cow<'a, str>>,
    pub resource: Cow<'a, str>,
    pub subresource: Option<Cow<'a, str>>,
    /// `None`: the whole collection. A list or watch whose field selector requires one
    /// `metadata.name` is about that name, as for the apiserver.
    pub name: Option<Cow<'a, str>>,
}

/// What the apiserver reads from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestInfo<'a> {
    Resource(ResourceRequest<'a>),
    /// Discovery (`/api`, `/apis`, `/apis/GROUP/VERSION`), `/version`, `/openapi/...`, health
    /// checks: judged by the lowercased method and the decoded path.
    NonResource {
        verb: &'static str,
        path: Cow<'a, str>,
    },
}

/// The policy's view of a Kubernetes request: the fields of [`crate::policy::Action::Kube`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeAction<'r> {
    pub verb: &'r str,
    /// `Some("")` for the core group; `None` for a non-resource request.
    pub group: Option<&'r str>,
    pub resource: &'r str,
    pub subresource: Option<&'r str>,
    pub namespace: Option<&'r str>,
    pub name: Option<&'r str>,
}

impl<'r> KubeAction<'r> {
    pub fn to_policy(self) -> crate::policy::Action<'r> {
        crate::policy::Action::Kube {
            verb: self.verb,
            group: self.group,
            resource: self.resource,
            subresource: self.subresource,
            namespace: self.namespace,
            name: self.name,
        }
    }
}

/// Subresources of pods that open a stream into the container: the apiserver authorizes their
/// WebSocket upgrade (a GET) as `create` too, and so does the policy, whatever the method.
pub const STREAM_SUBRESOURCES: [&str; 3] = ["exec", "attach", "portforward"];

impl RequestInfo<'_> {
    /// What the policy judges. A non-resource request is named by its path in `resource` (it
    /// starts with `/`, which no resource name does), with no namespace or name.
    pub fn action(&self) -> KubeAction<'_> {
        match self {
            RequestInfo::Resource(r) => {
                let stream = r.resource == "pods"
                    && r.subresource
                        .as_deref()
                        .is_some_and(|s| STREAM_SUBRESOURCES.contains(&s));
                KubeAction {
                    verb: if stream { "create" } else { r.verb },
                    group: Some(&r.api_group),
                    resource: &r.resource,
                    subresource: r.subresource.as_deref(),
                    namespace: r.namespace.as_deref(),
                    name: r.name.as_deref(),
                }
            }
            RequestInfo::NonResource { verb, path } => KubeAction {
                verb,
                group: None,
                resource: path,
                subresource: None,
                namespace: None,
                name: None,
            },
        }
    }

    pub fn into_owned(self) -> RequestInfo<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        match self {
            RequestInfo::Resource(r) => RequestInfo::Resource(ResourceRequest {
                verb: r.verb,
                api_prefix: r.api_prefix,
                api_group: own(r.api_group),
                api_version: own(r.api_version),
                namespace: r.namespace.map(own),
                resource: own(r.resource),
                subresource: r.subresource.map(own),
                name: r.name.map(own),
            }),
            RequestInfo::NonResource { verb, path } => RequestInfo::NonResource {
                verb,
                path: own(path),
            },
        }
    }
}

/// Reads a request: `method` as sent, `path` without the query, `query` without the `?`.
pub fn parse<'a>(
    method: &str,
    path: &'a str,
    query: Option<&'a str>,
) -> Result<RequestInfo<'a>, KubeRequestError> {
    if !path.starts_with('/') {
        return Err(KubeRequestError::NotAbsolute);
    }
    let query = query.unwrap_or("");
    if query
        .split('&')
        .any(|pair| pair.contains(';') || decode_form(pair).is_none())
    {
        return Err(KubeRequestError::QueryEncoding);
    }
    match decode_path(path)? {
        Cow::Borrowed(p) => parse_decoded(method, p, query),
        Cow::Owned(p) => parse_decoded(method, &p, query).map(RequestInfo::into_owned),
    }
}

/// The verb the apiserver gives a method on a resource (before list/watch/deletecollection).
fn resource_verb(method: &str) -> Option<&'static str> {
    Some(match method {
        "POST" => "create",
        "GET" | "HEAD" => "get",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return None,
    })
}

/// `strings.ToLower(method)` for the methods HTTP defines; others are refused.
fn lower_method(method: &str) -> Option<&'static str> {
    Some(match method {
        "GET" => "get",
        "HEAD" => "head",
        "POST" => "post",
        "PUT" => "put",
        "PATCH" => "patch",
        "DELETE" => "delete",
        "OPTIONS" => "options",
        _ => return None,
    })
}

fn parse_decoded<'p>(
    method: &str,
    path: &'p str,
    query: &'p str,
) -> Result<RequestInfo<'p>, KubeRequestError> {
    // splitPath: trim slashes at both ends, split on `/`.
    let trimmed = path.trim_matches('/');
    let mut parts: Vec<&'p str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    if parts.iter().any(|s| matches!(*s, "" | "." | "..")) {
        return Err(KubeRequestError::PathSegment);
    }
    let non_resource = || {
        lower_method(method)
            .map(|verb| RequestInfo::NonResource {
                verb,
                path: Cow::Borrowed(path),
            })
            .ok_or(KubeRequestError::Method)
    };
    let api_prefix = match parts.first() {
        Some(&"api") => "api",
        Some(&"apis") => "apis",
        _ => return non_resource(),
    };
    if parts.len() < 3 || (api_prefix == "apis" && parts.len() < 4) {
        return non_resource();
    }
    parts.remove(0);
    let api_group = if api_prefix == "apis" {
        parts.remove(0)
    } else {
        ""
    };
    let api_version = parts.remove(0);

    let special = matches!(parts[0], "proxy" | "watch");
    let mut verb = if special {
        if parts.len() < 2 {
            return Err(KubeRequestError::SpecialVerb);
        }
        let v = if parts[0] == "proxy" {
            "proxy"
        } else {
            "watch"
        };
        parts.remove(0);
        v
    } else {
        resource_verb(method).ok_or(KubeRequestError::Method)?
    };

    let mut namespace = None;
    let mut rest: &[&'p str] = &parts;
    if rest[0] == "namespaces" && rest.len() > 1 {
        namespace = Some(rest[1]);
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    let resource = rest[0];
    let mut name: Option<Cow<'p, str>> = rest.get(1).map(|n| Cow::Borrowed(*n));
    let subresource = if special { None } else { rest.get(2).copied() };

    if name.is_none() && verb == "get" {
        let watch = first_value(query, "watch")
            .is_some_and(|v| !(v.as_ref() == "0" || v.eq_ignore_ascii_case("false")));
        verb = if watch { "watch" } else { "list" };
        // A field selector that does not parse makes the apiserver's decoding fail: no name.
        if let Some(selector) = first_value(query, "fieldSelector") {
            name = field_selector_name(&selector)
                .filter(|n| valid_path_segment_name(n))
                .map(|n| Cow::Owned(n.into_owned()));
        }
    }
    if name.is_none() && verb == "delete" {
        verb = "deletecollection";
    }
    Ok(RequestInfo::Resource(ResourceRequest {
        verb,
        api_prefix,
        api_group: Cow::Borrowed(api_group),
        api_version: Cow::Borrowed(api_version),
        namespace: namespace.map(Cow::Borrowed),
        resource: Cow::Borrowed(resource),
        subresource: subresource.map(Cow::Borrowed),
        name,
    }))
}

/// `path.IsValidPathSegmentName`: what may name an object in a URL.
fn valid_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains(['/', '%'])
}

/// Percent-decodes a path as Go's `URL.Path`, refusing what servers read differently.
fn decode_path(path: &str) -> Result<Cow<'_, str>, KubeRequestError> {
    if path.contains('\\') || path.contains('\0') {
        return Err(KubeRequestError::PathEncoding);
    }
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let v = bytes
                .get(i + 1..i + 3)
                .and_then(hex_byte)
                .ok_or(KubeRequestError::PathEncoding)?;
            if matches!(v, b'/' | b'\\' | b'%' | 0) {
                return Err(KubeRequestError::PathEncoding);
            }
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| KubeRequestError::PathEncoding)
}

fn hex_byte(h: &[u8]) -> Option<u8> {
    let digit = |c: u8| char::from(c).to_digit(16);
    let (hi, lo) = (digit(*h.first()?)?, digit(*h.get(1)?)?);
    u8::try_from(hi * 16 + lo).ok()
}

/// `application/x-www-form-urlencoded` decoding of a key or value (`+` is a space), as Go's
/// `url.QueryUnescape`; `None` for a bad escape or non-UTF-8.
fn decode_form(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains(['%', '+']) {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(bytes.get(i + 1..i + 3).and_then(hex_byte)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The first value of `key` in a query (Go's `url.Values[key][0]`); a key without `=` has the
/// empty value.
fn first_value<'q>(query: &'q str, key: &str) -> Option<Cow<'q, str>> {
    query.split('&').filter(|p| !p.is_empty()).find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode_form(k)? == key).then(|| decode_form(v)).flatten()
    })
}

/// `fields.ParseSelector(s).RequiresExactMatch("metadata.name")`: the value of the first
/// `metadata.name=` or `metadata.name==` term; `None` when the selector does not parse.
fn field_selector_name(selector: &str) -> Option<Cow<'_, str>> {
    let mut found = None;
    for term in split_unescaped(selector, ',') {
        if term.is_empty() {
            continue;
        }
        let (field, op, value) = split_term(term)?;
        let value = unescape_selector_value(value)?;
        if found.is_none() && field == "metadata.name" && op != "!=" {
            found = Some(value);
        }
    }
    found
}

/// Splits at `sep` where it is not escaped by a backslash.
fn split_unescaped(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut escaped = false;
    let mut cuts = Vec::new();
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            cuts.push(&text[start..i]);
            start = i + 1;
        }
    }
    cuts.push(&text[start..]);
    cuts.into_iter()
}

/// A term at its first unescaped operator (`!=`, `==` or `=`).
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if c == '\\' {
            escaped = true;
            continue;
        }
        let rest = &term[i..];
        for op in ["!=", "==", "="] {
            if rest.starts_with(op) {
                return Some((&term[..i], op, &term[i + op.len()..]));
            }
        }
    }
    None
}

/// `fields.UnescapeValue`: `\\`, `\,` and `\=` are literal; any other escape, or a bare `,`
/// or `=`, is an error.
fn unescape_selector_value(value: &str) -> Option<Cow<'_, str>> {
    if !value.contains(['\\', ',', '=']) {
        return Some(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                e @ ('\\' | ',' | '=') => out.push(e),
                _ => return None,
            },
            ',' | '=' => return None,
            c => out.push(c),
        }
    }
    Some(Cow::Owned(out))
}

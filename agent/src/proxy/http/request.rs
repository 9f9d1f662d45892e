//! What a request means, read once, as the target will read it: plain code, tested without
//! sockets.
//!
//! [`normalise`] refuses what two readers could take differently (framing headers that
//! disagree, two Hosts, a Host that is not the `:authority` or the absolute-form URL's host, a
//! server name that is not the Host, method override headers) and puts the path in the one
//! form the gateway both judges and forwards: unreserved characters percent-decoded, other
//! escapes with upper-case hex, dot segments and empty segments resolved. An encoded slash,
//! backslash, NUL or percent, or a `;` path parameter, leaves the path as sent and makes the
//! request unknown (the policy's `on_unknown`), as the policy README says.

use hyper::{
    header::{self, HeaderMap, HeaderName},
    Method, Uri, Version,
};

/// Why a request is refused before it is judged (answered 400, or 421 for a name mismatch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguous {
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    #[error("Transfer-Encoding other than a single \"chunked\"")]
    TransferEncoding,
    #[error("conflicting {0} headers")]
    Duplicate(&'static str),
    #[error("no Host")]
    NoHost,
    #[error("the Host is not a host name or address")]
    BadHost,
    #[error("the Host header and the request's authority differ")]
    HostMismatch,
    #[error("the Host is not the TLS server name the client asked for")]
    NotServerName,
    #[error("method override header {0}: the server would run another method than the one judged")]
    MethodOverride(&'static str),
    #[error("{0} requests are not relayed")]
    Method(&'static str),
    #[error("the request target is not a path")]
    NotOrigin,
    #[error("the request path is too long")]
    TooLong,
}

impl Ambiguous {
    /// The status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            Ambiguous::NotServerName => 421,
            Ambiguous::TooLong => 414,
            _ => 400,
        }
    }
}

/// The longest request target (path and query) the gateway accepts.
pub const MAX_TARGET: usize = 8 * 1024;

/// Headers that must not appear twice with different values: each decides what the request is.
/// Names as `HeaderName` constants: a lookup by string parses the name every time.
static SINGLETONS: [(HeaderName, &str); 6] = [
    (header::HOST, "Host"),
    (header::CONTENT_LENGTH, "Content-Length"),
    (header::CONTENT_TYPE, "Content-Type"),
    (header::AUTHORIZATION, "Authorization"),
    (header::PROXY_AUTHORIZATION, "Proxy-Authorization"),
    (header::CONTENT_ENCODING, "Content-Encoding"),
];

/// Headers with which frameworks run another method than the request line's.
static METHOD_OVERRIDES: [(HeaderName, &str); 3] = [
    (
        HeaderName::from_static("x-http-method-override"),
        "x-http-method-override",
    ),
    (HeaderName::from_static("x-http-method"), "x-http-method"),
    (
        HeaderName::from_static("x-method-override"),
        "x-method-override",
    ),
];

/// A request as judged and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    pub method: Method,
    /// `https` when the client spoke TLS to the gateway.
    pub scheme: &'static str,
    /// `host[:port]`, lower-case, as the target gets it (Host, or `:authority` in HTTP/2).
    pub authority: String,
    /// The host without port or brackets (`api.internal`, `10.0.0.5`, `fd00::5`).
    pub host: String,
    /// The path and query forwarded (and judged): `/v1/x?y=1`.
    pub path_and_query: String,
    /// Why the path cannot be judged, when it cannot.
    pub unknown: Option<&'static str>,
}

impl Normalised {
    /// How the request is recorded and shown to an approver: `GET https://host/path?q`.
    pub fn text(&self) -> String {
        let method = self.method.as_str();
        let mut text = String::with_capacity(
            method.len() + 4 + self.scheme.len() + self.authority.len() + self.path_and_query.len(),
        );
        for part in [
            method,
            " ",
            self.scheme,
            "://",
            &self.authority,
            &self.path_and_query,
        ] {
            text.push_str(part);
        }
        text
    }
}

/// Reads a request's head. `server_name`: the SNI the client sent, when it spoke TLS.
pub fn normalise(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    tls: bool,
    server_name: Option<&str>,
) -> Result<Normalised, Ambiguous> {
    if *method == Method::CONNECT {
        return Err(Ambiguous::Method("CONNECT"));
    }
    framing(headers, version)?;
    for (name, label) in &SINGLETONS {
        let mut values = headers.get_all(name).iter();
        if let Some(first) = values.next() {
            if values.any(|v| v != first) {
                return Err(Ambiguous::Duplicate(label));
            }
        }
    }
    if let Some((_, name)) = METHOD_OVERRIDES
        .iter()
        .find(|(h, _)| headers.contains_key(h))
    {
        return Err(Ambiguous::MethodOverride(name));
    }

    let host_header = headers
        .get(header::HOST)
        .map(|v| v.to_str().map_err(|_| Ambiguous::BadHost))
        .transpose()?;
    let authority = match (uri.authority(), host_header) {
        (Some(a), Some(h)) => {
            if !a.as_str().eq_ignore_ascii_case(h.trim()) {
                return Err(Ambiguous::HostMismatch);
            }
            a.as_str()
        }
        (Some(a), None) => a.as_str(),
        (None, Some(h)) => h.trim(),
        (None, None) => return Err(Ambiguous::NoHost),
    };
    let authority = authority.to_ascii_lowercase();
    let host = host_of(&authority).ok_or(Ambiguous::BadHost)?;
    if let Some(sni) = server_name {
        if !sni.trim_end_matches('.').eq_ignore_ascii_case(&host) {
            return Err(Ambiguous::NotServerName);
        }
    }

    let path = uri.path();
    if !path.starts_with('/') {
        return Err(Ambiguous::NotOrigin);
    }
    if uri.path_and_query().map_or(0, |p| p.as_str().len()) > MAX_TARGET {
        return Err(Ambiguous::TooLong);
    }
    let (path, unknown) = match normalise_path(path) {
        Ok(p) => (p, None),
        Err(why) => (path.to_string(), Some(why)),
    };
    let mut path_and_query = path;
    if let Some(q) = uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    Ok(Normalised {
        method: method.clone(),
        scheme: if tls { "https" } else { "http" },
        authority,
        host,
        path_and_query,
        unknown,
    })
}

/// Content-Length and Transfer-Encoding: at most one of them, TE only `chunked`.
fn framing(headers: &HeaderMap, version: Version) -> Result<(), Ambiguous> {
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if te.is_empty() {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Ambiguous::LengthAndChunked);
    }
    let chunked_only = te.len() == 1
        && te[0]
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
    if !chunked_only || version == Version::HTTP_10 {
        return Err(Ambiguous::TransferEncoding);
    }
    Ok(())
}

/// `host[:port]` → the host: a DNS name (letters, digits, `-`, `.`, `_`), an IPv4 address, or
/// a bracketed IPv6 address; no user info.
fn host_of(authority: &str) -> Option<String> {
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    if !authority.starts_with('[')
        && (host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)))
    {
        return None;
    }
    Some(host.trim_end_matches('.').to_string())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// The path in its one form: unreserved escapes decoded, other escapes upper-case, `.` and
/// `..` segments resolved, empty segments dropped (a trailing slash kept). Errs where the
/// target could read the path otherwise than the gateway.
pub fn normalise_path(path: &str) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let v = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("a malformed percent escape")?;
                if matches!(v, b'/' | b'\\' | b'%' | 0) {
                    return Err("an encoded slash, backslash, percent or NUL in the path");
                }
                if v == b';' {
                    return Err("an encoded ';' in the path");
                }
                if is_unreserved(v) {
                    decoded.push(v);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(format!("{v:02X}").as_bytes());
                }
                i += 3;
            }
            b'\\' => return Err("a backslash in the path"),
            b';' => return Err("a ';' path parameter (servers differ on what it names)"),
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| "a path that is not UTF-8")?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("a path above the root");
                }
            }
            s => segments.push(s),
        }
    }
    let trailing = (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/.."))
        && !segments.is_empty();
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<Normalised, Ambiguous> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        normalise(
            &method.parse().unwrap(),
            &uri.parse().unwrap(),
            Version::HTTP_11,
            &map,
            false,
            None,
        )
    }

    #[test]
    fn paths_take_one_form_for_judging_and_forwarding() {
        for (sent, forwarded) in [
            ("/v1/x", "/v1/x"),
            ("/v1/%78/../admin", "/v1/admin"),
            ("/v1/./a//b/", "/v1/a/b/"),
            ("/v1/%2e%2E/admin", "/admin"),
            ("/a/%7euser", "/a/~user"),
            ("/a/%20b%2c", "/a/%20b%2C"),
            ("/a/b/..", "/a/"),
            ("/", "/"),
            ("//", "/"),
        ] {
            assert_eq!(normalise_path(sent).as_deref(), Ok(forwarded), "{sent}");
        }
        for unknown in [
            "/v1/a%2Fb",
            "/v1/a%2fb",
            "/a%5cb",
            "/a%00",
            "/a%25",
            "/a%zz",
            "/a%4",
            "/..",
            "/a/../..",
            "/admin;x=1/users",
            "/a%3b",
        ] {
            assert!(normalise_path(unknown).is_err(), "{unknown}");
        }
    }

    proptest::proptest! {
        /// The forwarded path is a fixed point (a target that normalises it again reads the
        /// path that was judged), and where the policy can read the path as sent it can read
        /// the forwarded one (normalising never makes a request unknown).
        #[test]
        fn the_forwarded_path_reads_the_same_again(
            segments in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::string::string_regex("[a-zA-Z0-9._~-]{0,4}").unwrap(),
                    proptest::string::string_regex("(%[0-9a-fA-F]{2}){1,2}").unwrap(),
                    proptest::prop_oneof![
                        proptest::strategy::Just(".".to_string()),
                        proptest::strategy::Just("..".to_string()),
                        proptest::strategy::Just("%2e%2E".to_string()),
                        proptest::strategy::Just(String::new()),
                    ],
                ],
                0..8,
            ),
            trailing in proptest::bool::ANY,
        ) {
            let mut path = String::new();
            for s in &segments {
                path.push('/');
                path.push_str(s);
            }
            if trailing || path.is_empty() {
                path.push('/');
            }
            if let Ok(once) = normalise_path(&path) {
                proptest::prop_assert_eq!(normalise_path(&once), Ok(once.clone()));
                let policy = |p: &str| crate::policy::matchers::normalize_path(p).ok();
                if policy(&path).is_some() {
                    proptest::prop_assert!(policy(&once).is_some());
                }
            }
        }
    }

    #[test]
    fn the_host_comes_from_host_or_authority_and_they_must_agree() {
        let n = req("GET", "/v1/x?y=%2F", &[("host", "API.internal:8080")]).unwrap();
        assert_eq!(n.authority, "api.internal:8080");
        assert_eq!(n.host, "api.internal");
        assert_eq!(n.path_and_query, "/v1/x?y=%2F");
        assert_eq!(n.text(), "GET http://api.internal:8080/v1/x?y=%2F");
        assert_eq!(n.unknown, None);
        let n = req("GET", "/a%2Fb", &[("host", "[fd00::5]:80")]).unwrap();
        assert_eq!(n.host, "fd00::5");
        assert!(n.unknown.is_some());
        assert_eq!(n.path_and_query, "/a%2Fb");
        assert_eq!(
            req("GET", "http://a.example/x", &[("host", "b.example")]),
            Err(Ambiguous::HostMismatch)
        );
        assert!(req("GET", "http://a.example/x", &[("host", "A.example")]).is_ok());
        assert!(req("GET", "http://a.example/x", &[]).is_ok());
        assert_eq!(req("GET", "/x", &[]), Err(Ambiguous::NoHost));
        for bad in ["a b", "u@h", "h:", "h:x", "[zz]", "h/x", ""] {
            assert_eq!(
                req("GET", "/x", &[("host", bad)]),
                Err(Ambiguous::BadHost),
                "{bad}"
            );
        }
    }

    #[test]
    fn ambiguous_framing_and_headers_are_refused() {
        let h = ("host", "a");
        assert_eq!(
            req(
                "POST",
                "/x",
                &[h, ("content-length", "3"), ("transfer-encoding", "chunked")]
            ),
            Err(Ambiguous::LengthAndChunked)
        );
        assert_eq!(
            req("POST", "/x", &[h, ("transfer-encoding", "gzip, chunked")]),
            Err(Ambiguous::TransferEncoding)
        );
        assert_eq!(
            req(
                "POST",
                "/x",
                &[
                    h,
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(Ambiguous::TransferEncoding)
        );
        assert!(req("POST", "/x", &[h, ("transfer-encoding", "Chunked")]).is_ok());
        assert_eq!(
            req("GET", "/x", &[h, ("host", "b")]),
            Err(Ambiguous::Duplicate("Host"))
        );
        assert!(req("GET", "/x", &[h, ("host", "a")]).is_ok());
        assert_eq!(
            req(
                "GET",
                "/x",
                &[h, ("authorization", "a"), ("authorization", "b")]
            ),
            Err(Ambiguous::Duplicate("Authorization"))
        );
        assert_eq!(
            req("POST", "/x", &[h, ("x-http-method-override", "DELETE")]),
            Err(Ambiguous::MethodOverride("x-http-method-override"))
        );
        assert_eq!(
            req("CONNECT", "a:443", &[h]),
            Err(Ambiguous::Method("CONNECT"))
        );
        assert_eq!(req("OPTIONS", "*", &[h]).unwrap_err(), Ambiguous::NotOrigin);
    }

    #[test]
    fn over_tls_the_host_is_the_server_name() {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("api.example:443"));
        let uri: Uri = "/x".parse().unwrap();
        let n = normalise(
            &Method::GET,
            &uri,
            Version::HTTP_11,
            &map,
            true,
            Some("API.example"),
        );
        assert_eq!(n.unwrap().scheme, "https");
        let n = normalise(
            &Method::GET,
            &uri,
            Version::HTTP_11,
            &map,
            true,
            Some("other.example"),
        );
        assert_eq!(n, Err(Ambiguous::NotServerName));
    }
}

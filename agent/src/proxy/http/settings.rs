//! An HTTP target's own settings (`[target.http]` in the configuration): TLS toward the client
//! and the target, and the headers the gateway sets from held credentials. The configuration
//! parses them; the gateway applies them.

use std::{path::PathBuf, time::Duration};

use hyper::http::HeaderName;
use serde::Deserialize;

use crate::credentials::CredentialRef;

/// `[target.http]`. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTarget {
    /// What the gateway does with a client's TLS: terminate it (a leaf minted by the local CA
    /// for the name the client asked for) or pass it through untouched, deciding the
    /// connection by the server name in the ClientHello.
    #[serde(default)]
    pub tls: ClientTls,
    /// The scheme toward the target: the client's own (TLS when the client spoke TLS), or
    /// always `http` / `https`.
    #[serde(default)]
    pub upstream: UpstreamScheme,
    /// Plain HTTP toward the target speaks HTTP/2 with prior knowledge (h2c) instead of
    /// HTTP/1.1. Over TLS, ALPN decides.
    #[serde(default)]
    pub h2c: bool,
    /// A CA (PEM) trusted for the target's certificate besides the system roots.
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM chain) and its key presented to the target.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Headers the gateway sets on every request, replacing what the client sent.
    #[serde(default)]
    pub inject: Vec<InjectHeader>,
    /// How long a client's HTTP/2 connection may stay with no request in flight before the
    /// gateway ends it (GOAWAY); humantime (`"90s"`), [`H2_IDLE_TIMEOUT`] when not given.
    #[serde(default, deserialize_with = "some_duration")]
    pub idle_timeout: Option<Duration>,
}

/// How long an idle client HTTP/2 connection is kept by default (nginx's `http2_idle_timeout`).
pub const H2_IDLE_TIMEOUT: Duration = Duration::from_mins(3);

fn some_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    #[default]
    Terminate,
    Passthrough,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamScheme {
    #[default]
    Same,
    Http,
    Https,
}

/// `{ header = "authorization", prefix = "Bearer ", credentials = { env = "API_TOKEN" } }`:
/// the header's value is `prefix` then the secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectHeader {
    pub header: String,
    #[serde(default)]
    pub prefix: String,
    pub credentials: CredentialRef,
}

/// Headers the gateway owns: never injected (they frame or route the request).
const NOT_INJECTABLE: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

impl HttpTarget {
    /// What is wrong with the settings, if anything: (key, problem).
    pub fn problem(&self) -> Option<(String, String)> {
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Some(("idle_timeout".into(), "must be longer than zero".into()));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Some((
                "client_cert".into(),
                "client_cert and client_key go together".into(),
            ));
        }
        for (i, h) in self.inject.iter().enumerate() {
            let Ok(name) = HeaderName::from_bytes(h.header.as_bytes()) else {
                return Some((
                    format!("inject[{i}].header"),
                    format!("{:?} is not a header name", h.header),
                ));
            };
            if NOT_INJECTABLE.contains(&name.as_str()) || name.as_str().starts_with(':') {
                return Some((
                    format!("inject[{i}].header"),
                    format!("{name} frames or routes the request; the gateway sets it itself"),
                ));
            }
            if self.inject[..i]
                .iter()
                .any(|o| o.header.eq_ignore_ascii_case(&h.header))
            {
                return Some((
                    format!("inject[{i}].header"),
                    format!("{name} is injected twice"),
                ));
            }
            if let Some((field, problem)) = h.credentials.problem() {
                return Some((format!("inject[{i}].credentials.{field}"), problem.into()));
            }
            if h.prefix.bytes().any(|b| b.is_ascii_control()) {
                return Some((
                    format!("inject[{i}].prefix"),
                    "control characters are not allowed".into(),
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HttpTarget {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn settings_parse_and_bad_ones_are_named() {
        let t = parse(
            "tls = \"passthrough\"\nupstream = \"https\"\nca = \"/etc/ca.pem\"\n\
             [[inject]]\nheader = \"Authorization\"\nprefix = \"Bearer \"\ncredentials = { env = \"T\" }\n",
        );
        assert_eq!(t.tls, ClientTls::Passthrough);
        assert_eq!(t.upstream, UpstreamScheme::Https);
        assert_eq!(t.inject[0].prefix, "Bearer ");
        assert!(t.problem().is_none());
        for (bad, key) in [
            ("client_cert = \"/c.pem\"\n", "client_cert"),
            (
                "[[inject]]\nheader = \"Host\"\ncredentials = { env = \"T\" }\n",
                "inject[0].header",
            ),
            (
                "[[inject]]\nheader = \"bad header\"\ncredentials = { env = \"T\" }\n",
                "inject[0].header",
            ),
            (
                "[[inject]]\nheader = \"x-a\"\ncredentials = { env = \"\" }\n",
                "inject[0].credentials.env",
            ),
            (
                "[[inject]]\nheader = \"x-a\"\ncredentials = { env = \"T\" }\n\
                 [[inject]]\nheader = \"X-A\"\ncredentials = { env = \"U\" }\n",
                "inject[1].header",
            ),
        ] {
            assert_eq!(
                parse(bad).problem().map(|p| p.0).as_deref(),
                Some(key),
                "{bad}"
            );
        }
        assert!(toml::from_str::<HttpTarget>("tls = \"maybe\"\n").is_err());
        assert_eq!(
            parse("idle_timeout = \"90s\"\n").idle_timeout,
            Some(Duration::from_secs(90))
        );
        assert!(toml::from_str::<HttpTarget>("idle_timeout = \"soon\"\n").is_err());
        assert_eq!(
            parse("idle_timeout = \"0s\"\n")
                .problem()
                .map(|p| p.0)
                .as_deref(),
            Some("idle_timeout")
        );
    }
}

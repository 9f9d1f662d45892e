//! The headers the gateway sets and strips: the held credentials' (injected in place of the
//! client's), the hop-by-hop ones (never forwarded either way), and the client's headers as
//! the target gets them.

use std::sync::Arc;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::settings::HttpTarget;

/// The headers set from held credentials, read once per session (a rotated secret applies to
/// the next session). An error names the header and where the secret was to come from, never
/// the secret.
pub(super) fn injected_headers(settings: &HttpTarget) -> Result<Injected, String> {
    let mut secrets = Vec::with_capacity(settings.inject.len());
    let headers = settings
        .inject
        .iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.header.as_bytes())
                .map_err(|_| format!("{:?} is not a header name", h.header))?;
            let secret = h
                .credentials
                .read_secret()
                .map_err(|e| format!("the credential for {name}: {e}"))?;
            let secret = secret.trim().to_string();
            let mut value = HeaderValue::from_str(&format!("{}{secret}", h.prefix))
                .map_err(|_| format!("the credential for {name} is not a valid header value"))?;
            value.set_sensitive(true);
            secrets.push(secret);
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Injected {
        headers,
        secrets: secrets.into(),
    })
}

/// Headers set from held credentials, and the secrets in them (blanked out of records).
pub(super) struct Injected {
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) secrets: Arc<[String]>,
}

/// Headers that belong to one connection (RFC 9110 7.6.1), never forwarded either way (as
/// `HeaderName` constants: a lookup by string parses the name every time).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (a few) finds the hop-by-hop ones among them: cheaper
    // than a hashed removal of each of the nine names, which are mostly absent.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Names listed in Connection go too (only when there is a Connection header).
    let named: Vec<HeaderName> = if present[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n))
            .collect()
    } else {
        Vec::new()
    };
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    for name in &named {
        headers.remove(name);
    }
}

/// The client's headers as the target gets them: hop-by-hop ones, Host (set from the judged
/// authority), `Expect` (the gateway answers it itself) and every injected name removed, then
/// the injected values set.
pub(super) fn forwarded_headers(
    mut headers: HeaderMap,
    injected: &[(HeaderName, HeaderValue)],
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::EXPECT);
    for (name, value) in injected {
        headers.insert(name.clone(), value.clone());
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped_from_answers_too() {
        let mut answer = HeaderMap::new();
        for (k, v) in [
            ("server", "nginx"),
            ("connection", "close, X-Trace"),
            ("connection", "te"),
            ("x-trace", "1"),
            ("te", "trailers"),
            ("content-length", "3"),
        ] {
            answer.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut answer);
        let names: Vec<&str> = answer.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["server", "content-length"], "{answer:?}");
        // None present: nothing removed.
        let mut plain = HeaderMap::new();
        plain.insert(header::SERVER, HeaderValue::from_static("nginx"));
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }

    #[test]
    fn forwarded_headers_drop_hop_by_hop_and_replace_injected_ones() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("host", "api"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("authorization", "Bearer dummy"),
            ("Authorization", "Bearer dummy"),
            ("accept", "*/*"),
            ("expect", "100-continue"),
            ("upgrade", "h2c"),
        ] {
            client.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let injected = vec![(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer real"),
        )];
        let out = forwarded_headers(client, &injected);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["authorization", "accept"], "{out:?}");
        assert_eq!(
            out.get_all(header::AUTHORIZATION)
                .iter()
                .collect::<Vec<_>>(),
            vec!["Bearer real"]
        );
    }
}

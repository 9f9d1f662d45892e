//! The HTTP gateway's reading of a request head never panics, and the path it forwards is a
//! fixed point: read again, it is the same path (what the target reads is what was judged).
#![no_main]

use bulkhead::proxy::http::request::{normalise, normalise_path};
use hyper::{header::HeaderValue, HeaderMap, Method, Uri, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (method.parse::<Method>(), uri.parse::<Uri>()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in parts.next().unwrap_or_default().lines() {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    if let Ok(n) = normalise(&method, &uri, Version::HTTP_11, &headers, false, None) {
        if n.unknown.is_none() {
            let path = n.path_and_query.split('?').next().unwrap_or_default();
            assert_eq!(normalise_path(path).as_deref(), Ok(path), "a fixed point");
        }
    }
});

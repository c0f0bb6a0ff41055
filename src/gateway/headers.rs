//! What the gateway reads from and writes to HTTP messages: the presented key, the limit headers,
//! and JSON error bodies.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header, request::Parts};

use super::{
    metrics::ErrorCode,
    proxy::ProxyBody,
    table::{RateView, SlotView},
};

/// Where a client may present its key, in the order they are looked at.
pub(super) fn presented_key(parts: &Parts) -> Option<Cow<'_, str>> {
    if let Some(v) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((scheme, token)) = v.trim().split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
        && !token.trim().is_empty()
    {
        return Some(Cow::Borrowed(token.trim()));
    }
    if let Some(v) = parts.headers.get(X_API_KEY).and_then(|v| v.to_str().ok())
        && !v.trim().is_empty()
    {
        return Some(Cow::Borrowed(v.trim()));
    }
    let query = parts.uri.query()?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(name, value)| *name == "apikey" && !value.is_empty())
        .map(|(_, value)| Cow::Owned(percent_decode(value)))
}

/// The query without any `apikey` parameter, or `None` when nothing is left.
pub(super) fn strip_apikey(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("apikey"))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward, plus the key carriers and the
/// headers the gateway itself sets for the upstream (so a client cannot forge them).
pub(super) fn strip_request_headers(headers: &mut HeaderMap) {
    // One look at each name first: most requests carry none of these but the key, and each
    // removal is a hash and a probe.
    let (mut ours, mut hop, mut bearer) = (false, false, false);
    for (name, value) in headers.iter() {
        if name == header::AUTHORIZATION {
            bearer |= value.to_str().is_ok_and(|v| {
                v.trim_start()
                    .get(..7)
                    .is_some_and(|s| s.eq_ignore_ascii_case("bearer "))
            });
        } else if name == X_API_KEY || name == KEY_ID || name == PLAN {
            ours = true;
        } else {
            hop |= is_hop_by_hop(name);
        }
    }
    if hop {
        strip_hop_by_hop(headers);
    }
    if bearer {
        headers.remove(header::AUTHORIZATION);
    }
    if ours {
        headers.remove(X_API_KEY);
        headers.remove(KEY_ID);
        headers.remove(PLAN);
    }
}

/// The hop-by-hop fields of RFC 9110 §7.6.1 that have a standard name (`Keep-Alive` has none).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str() == "keep-alive"
}

/// Removes the hop-by-hop headers, including those named in `Connection`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// Tells the upstream which key (by id, never the token) and plan a request came with.
pub(super) const KEY_ID: HeaderName = HeaderName::from_static("x-slotgate-key-id");
/// See [`KEY_ID`].
pub(super) const PLAN: HeaderName = HeaderName::from_static("x-slotgate-plan");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A header value made of a string known to be valid (digits and punctuation), without a copy.
fn text(s: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(s)).expect("a valid header value")
}

fn num(n: impl itoa::Integer) -> HeaderValue {
    let mut buf = itoa::Buffer::new();
    HeaderValue::from_str(buf.format(n)).expect("digits are a valid header value")
}

const X_CONCURRENT_LIMIT: HeaderName = HeaderName::from_static("x-concurrent-limit");
const X_CONCURRENT_CURRENT: HeaderName = HeaderName::from_static("x-concurrent-current");
const X_CONCURRENT_REMAINING: HeaderName = HeaderName::from_static("x-concurrent-remaining");
const CONCURRENCY_LIMIT: HeaderName = HeaderName::from_static("concurrency-limit");
const CONCURRENCY_REMAINING: HeaderName = HeaderName::from_static("concurrency-remaining");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Writes the limit headers: the de-facto `X-Concurrent-*` and `X-RateLimit-*` names, the
/// `Concurrency-*` names, and the IETF `RateLimit-Policy` / `RateLimit` fields.
/// Headers [`limit_headers`] may add.
pub(super) const LIMIT_HEADERS: usize = 10;

pub(super) fn limit_headers(h: &mut HeaderMap, slots: Option<SlotView>, rate: Option<RateView>) {
    if let Some(s) = slots {
        h.insert(X_CONCURRENT_LIMIT, num(s.limit));
        h.insert(X_CONCURRENT_CURRENT, num(s.current));
        h.insert(X_CONCURRENT_REMAINING, num(s.remaining));
        h.insert(CONCURRENCY_LIMIT, num(s.limit));
        h.insert(CONCURRENCY_REMAINING, num(s.remaining));
    }
    if let Some(r) = rate {
        h.insert(X_RATELIMIT_LIMIT, num(r.per_second));
        h.insert(X_RATELIMIT_REMAINING, num(r.remaining));
        // The bucket refills completely in burst/rate seconds: that is the policy's window.
        let window = u64::from(r.burst).div_ceil(u64::from(r.per_second.max(1))).max(1);
        let refill = u64::from(r.burst - r.remaining.min(r.burst)).div_ceil(u64::from(r.per_second.max(1)));
        h.insert(
            RATELIMIT_POLICY,
            text(concat_num("\"default\";q=", r.burst, ";w=", window)),
        );
        h.insert(
            RATELIMIT,
            text(concat_num("\"default\";r=", r.remaining, ";t=", refill)),
        );
        h.insert(X_RATELIMIT_RESET, num(refill));
    }
}

/// `{a}{x}{b}{y}` without the formatting machinery (this runs for every response).
fn concat_num(a: &str, x: impl itoa::Integer, b: &str, y: impl itoa::Integer) -> String {
    let (mut bx, mut by) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (x, y) = (bx.format(x), by.format(y));
    let mut s = String::with_capacity(a.len() + x.len() + b.len() + y.len());
    for part in [a, x, b, y] {
        s.push_str(part);
    }
    s
}

/// A machine-readable error: `{"error": {"code", "message", "limit"}}`.
pub(super) fn error_response(code: ErrorCode, message: &str, limit: Option<u64>) -> Response<ProxyBody> {
    // Written by hand: this is the refusal path, which must stay cheap under a flood.
    let mut body = String::with_capacity(96 + message.len());
    body.push_str("{\"error\":{\"code\":\"");
    body.push_str(code.as_str());
    body.push_str("\",\"message\":");
    push_json_string(&mut body, message);
    body.push_str(",\"limit\":");
    match limit {
        Some(n) => body.push_str(itoa::Buffer::new().format(n)),
        None => body.push_str("null"),
    }
    body.push_str("}}");
    let mut res = Response::new(super::proxy::full(Bytes::from(body)));
    *res.status_mut() = code.status();
    // Room for the limit headers, so that the map is not reallocated as they go in.
    res.headers_mut().reserve(LIMIT_HEADERS + 3);
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Appends `s` as a JSON string. The messages are the gateway's own, so the loop almost always
/// copies whole runs; serde's general escaper was a measurable share of the refusal path.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut run = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => {
                out.push_str(&s[run..i]);
                out.push_str(&format!("\\u{:04x}", c as u32));
                run = i + 1;
                continue;
            }
            _ => continue,
        };
        out.push_str(&s[run..i]);
        out.push_str(escape);
        run = i + c.len_utf8();
    }
    out.push_str(&s[run..]);
    out.push('"');
}

/// Sets `Retry-After` in whole seconds.
pub(super) fn retry_after(h: &mut HeaderMap, seconds: u64) {
    h.insert(header::RETRY_AFTER, num(seconds));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn keys_are_found_in_each_carrier() {
        assert_eq!(
            presented_key(&parts("/", &[("authorization", "Bearer abc")])).as_deref(),
            Some("abc")
        );
        assert_eq!(
            presented_key(&parts("/", &[("x-api-key", " abc ")])).as_deref(),
            Some("abc")
        );
        assert_eq!(
            presented_key(&parts("/v1?x=1&apikey=a%2Bb", &[])).as_deref(),
            Some("a+b")
        );
        assert_eq!(presented_key(&parts("/v1?apikey=", &[])), None);
        assert_eq!(
            presented_key(&parts("/", &[("authorization", "Basic Zm9v")])),
            None
        );
    }

    #[test]
    fn carriers_hop_by_hop_and_forged_headers_are_stripped_in_any_order() {
        let mut p = parts(
            "/",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("authorization", "Bearer abc"),
                ("x-slotgate-plan", "forged"),
                ("x-api-key", "k"),
                ("accept", "*/*"),
            ],
        );
        strip_request_headers(&mut p.headers);
        let left: Vec<_> = p.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["accept"]);
        // Nothing to strip: untouched, and a non-bearer Authorization is the upstream's own.
        let mut p = parts("/", &[("authorization", "Basic Zm9v"), ("accept", "*/*")]);
        strip_request_headers(&mut p.headers);
        assert_eq!(p.headers.len(), 2);
    }

    #[test]
    fn error_messages_are_valid_json_whatever_they_hold() {
        for message in [
            "plain",
            "quote \" and \\ back",
            "line\nbreak\ttab\u{1}",
            "é ✓ \u{7f}",
            "",
        ] {
            let mut out = String::new();
            push_json_string(&mut out, message);
            let back: String = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(back, message);
        }
    }

    #[test]
    fn apikey_is_stripped_from_the_query() {
        assert_eq!(strip_apikey("a=1&apikey=s&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_apikey("apikey=s"), None);
        assert_eq!(strip_apikey("apikeys=1").as_deref(), Some("apikeys=1"));
    }

    #[test]
    fn percent_decoding_survives_truncated_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
    }
}

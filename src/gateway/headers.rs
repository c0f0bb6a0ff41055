//! What the gateway reads from and writes to HTTP messages: the presented key, the limit headers,
//! and JSON error bodies.

use std::{borrow::Cow, cell::RefCell, sync::OnceLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header, request::Parts};

use super::{
    body::{ProxyBody, full},
    head::RequestHead,
    metrics::ErrorCode,
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

/// What the gateway adds to a request for the upstream.
pub(super) struct Added<'a> {
    /// The upstream's `Host`.
    pub host: &'a HeaderValue,
    /// The authority of the client's request target: an HTTP/2 client's `:authority`, or an
    /// HTTP/1.1 absolute-form target's. Either takes the place of `Host` (RFC 9113 §8.3.1,
    /// RFC 9112 §3.2.2).
    pub authority: Option<&'a str>,
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: Option<&'a HeaderValue>,
    /// The key's id and plan ([`KEY_ID`], [`PLAN`]): printable ASCII, which
    /// [`crate::config::GatewayConfig::check`] holds them to.
    pub key: Option<(&'a str, &'a str)>,
    /// A target's provider credential: written in place of whatever the client sent under that
    /// name.
    pub credential: Option<(&'a HeaderName, &'a HeaderValue)>,
}

/// Writes the client's fields for the upstream, less the hop-by-hop ones (RFC 9110 §7.6.1, and
/// any `Connection` names), the key carriers, and the ones the gateway sets itself (so that a
/// client cannot forge them); then the gateway's own. One look at each field, and no edit of
/// the header map: this runs for every forwarded request.
pub(super) fn forward_fields(headers: &HeaderMap, head: &mut RequestHead, added: Added<'_>) {
    let client_host = added
        .authority
        .map(str::as_bytes)
        .or(headers.get(header::HOST).map(HeaderValue::as_bytes));
    let listed: Vec<HeaderName> = match headers.contains_key(header::CONNECTION) {
        true => connection_names(headers),
        false => Vec::new(),
    };
    // Lists the gateway writes as one line each (no allocation unless the client sent some).
    let (mut forwarded_for, mut cookies): (Vec<&[u8]>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    for (name, value) in headers {
        match name.as_str() {
            "host" | "x-api-key" | KEY_ID | PLAN => {}
            "authorization" if is_bearer(value) => {}
            // The gateway's `X-Forwarded-Host` is the client's `Host` (or `:authority`).
            "x-forwarded-host" if client_host.is_some() => {}
            "x-forwarded-for" => forwarded_for.push(value.as_bytes()),
            // An HTTP/2 client may split its cookies over several fields; HTTP/1.1 wants one
            // (RFC 9113 §8.2.3).
            "cookie" => cookies.push(value.as_bytes()),
            _ if added.credential.is_some_and(|(c, _)| c == name) => {}
            n if is_hop_by_hop(name) || listed.iter().any(|l| l == n) => {}
            n => head.field(n, value.as_bytes()),
        }
    }
    head.field_list("cookie", cookies, b"; ");
    head.field("host", added.host.as_bytes());
    if let Some(h) = client_host {
        head.field("x-forwarded-host", h);
    }
    // The client's hops first, as nginx's `$proxy_add_x_forwarded_for` writes it.
    let client = added.client_ip.map(HeaderValue::as_bytes);
    head.field_list("x-forwarded-for", forwarded_for.into_iter().chain(client), b", ");
    if let Some((id, plan)) = added.key {
        head.field(KEY_ID, id.as_bytes());
        head.field(PLAN, plan.as_bytes());
    }
    if let Some((name, value)) = added.credential {
        head.field(name.as_str(), value.as_bytes());
    }
}

fn is_bearer(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.trim_start()
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer "))
    })
}

/// The field names a `Connection` header lists: hop-by-hop for this connection only.
fn connection_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
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
    for name in connection_names(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// Tells the upstream which key (by id, never the token) and plan a request came with.
const KEY_ID: &str = "x-slotgate-key-id";
/// See [`KEY_ID`].
const PLAN: &str = "x-slotgate-plan";
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A header value made of a string known to be valid (digits and punctuation), without a copy.
fn text(s: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(s)).expect("a valid header value")
}

/// Numbers below this have a header value made once (see [`num`]).
const SMALL: usize = 1024;

/// A number as a header value. Slot counts, small rates and seconds are what most responses
/// carry, and the value of a small one is a copy of a static string: no allocation.
fn num(n: impl itoa::Integer + TryInto<usize>) -> HeaderValue {
    static VALUES: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    let mut buf = itoa::Buffer::new();
    match n.try_into() {
        Ok(i) if i < SMALL => VALUES.get_or_init(small_values)[i].clone(),
        _ => HeaderValue::from_str(buf.format(n)).expect("digits are a valid header value"),
    }
}

fn small_values() -> Box<[HeaderValue]> {
    let mut buf = itoa::Buffer::new();
    let mut digits = String::new();
    let ends: Vec<usize> = (0..SMALL)
        .map(|i| {
            digits.push_str(buf.format(i));
            digits.len()
        })
        .collect();
    // Made once per process and kept for its life.
    let digits: &'static str = Box::leak(digits.into_boxed_str());
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let value = HeaderValue::from_static(&digits[start..end]);
            start = end;
            value
        })
        .collect()
}

/// The `RateLimit-Policy` value, `"default";q=<burst>;w=<window>`. A key's policy is the same
/// on every response, so the last one made is kept (per thread) and shared.
fn policy(burst: u32, window: u64) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(u32, u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((b, w, value)) if *b == burst && *w == window => value.clone(),
        _ => {
            let value = text(concat_num("\"default\";q=", burst, ";w=", window));
            *last = Some((burst, window, value.clone()));
            value
        }
    })
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
        h.insert(RATELIMIT_POLICY, policy(r.burst, window));
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
    finish_error(body, code, limit)
}

/// [`error_response`] of a message made of the gateway's own text pieces, none of which needs
/// escaping in JSON (a test holds that for the pieces in use): copied as they are.
pub(super) fn error_response_of(code: ErrorCode, pieces: &[&str], limit: Option<u64>) -> Response<ProxyBody> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut body = String::with_capacity(96 + len);
    body.push_str("{\"error\":{\"code\":\"");
    body.push_str(code.as_str());
    body.push_str("\",\"message\":\"");
    for p in pieces {
        debug_assert!(!p.contains(['"', '\\']) && !p.contains(|c: char| c.is_control()));
        body.push_str(p);
    }
    body.push('"');
    finish_error(body, code, limit)
}

fn finish_error(mut body: String, code: ErrorCode, limit: Option<u64>) -> Response<ProxyBody> {
    body.push_str(",\"limit\":");
    match limit {
        Some(n) => body.push_str(itoa::Buffer::new().format(n)),
        None => body.push_str("null"),
    }
    body.push_str("}}");
    let mut res = Response::new(full(Bytes::from(body)));
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

    fn forwarded(headers: &[(&str, &str)], key: Option<(&str, &str)>) -> String {
        let p = parts("/", headers);
        let mut head = RequestHead::new(&http::Method::GET, &["/v1"]);
        let host = HeaderValue::from_static("upstream:8000");
        let ip = HeaderValue::from_static("10.0.0.9");
        let added = Added {
            host: &host,
            authority: None,
            client_ip: Some(&ip),
            key,
            credential: None,
        };
        forward_fields(&p.headers, &mut head, added);
        String::from_utf8(head.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn carriers_hop_by_hop_and_forged_headers_are_stripped_in_any_order() {
        let key = ("default/acme", "startup");
        let head = forwarded(
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("authorization", "Bearer abc"),
                ("x-slotgate-plan", "forged"),
                ("x-api-key", "k"),
                ("te", "trailers"),
                ("content-length", "0"),
                ("x-forwarded-for", "1.2.3.4"),
                ("accept", "*/*"),
                ("host", "api.example.com"),
                ("x-forwarded-host", "forged"),
                ("x-forwarded-for", "5.6.7.8"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ],
            Some(key),
        );
        assert_eq!(
            head,
            "GET /v1 HTTP/1.1\r\naccept: */*\r\ncookie: a=1; b=2\r\nhost: upstream:8000\r\n\
             x-forwarded-host: api.example.com\r\n\
             x-forwarded-for: 1.2.3.4, 5.6.7.8, 10.0.0.9\r\n\
             x-slotgate-key-id: default/acme\r\nx-slotgate-plan: startup\r\n"
        );
        // A non-bearer Authorization is the upstream's own; without a `Host`, the client's
        // `X-Forwarded-Host` passes.
        let head = forwarded(
            &[("authorization", "Basic Zm9v"), ("x-forwarded-host", "edge")],
            None,
        );
        assert_eq!(
            head,
            "GET /v1 HTTP/1.1\r\nauthorization: Basic Zm9v\r\nx-forwarded-host: edge\r\n\
             host: upstream:8000\r\nx-forwarded-for: 10.0.0.9\r\n"
        );
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

#[cfg(test)]
#[path = "headers_fuzz.rs"]
mod fuzz;

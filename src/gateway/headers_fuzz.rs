//! Property tests of the key extraction and the query rewrite, run with every test run (256
//! cases each; `PROPTEST_CASES=100000 cargo nextest run headers::fuzz` for a longer campaign).

use proptest::{collection::vec, prelude::*};

use super::*;

fn request(uri: &str, headers: Vec<(&'static str, HeaderValue)>) -> Parts {
    let mut parts = http::Request::builder().uri(uri).body(()).unwrap().into_parts().0;
    for (name, value) in headers {
        parts.headers.append(name, value);
    }
    parts
}

/// Every byte percent-encoded, as a client library that escapes everything would send it.
fn escaped(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

proptest! {
    #[test]
    fn any_header_or_query_gives_an_answer_not_a_panic(
        auth in vec(any::<u8>(), 0..64),
        key in vec(any::<u8>(), 0..64),
        query in "[ -~]{0,64}",
    ) {
        let mut headers = Vec::new();
        if let Ok(v) = HeaderValue::from_bytes(&auth) {
            headers.push(("authorization", v));
        }
        if let Ok(v) = HeaderValue::from_bytes(&key) {
            headers.push(("x-api-key", v));
        }
        let query: String = query.chars().filter(|c| !" #".contains(*c)).collect();
        let uri = format!("/v1?{query}");
        if uri.parse::<http::Uri>().is_ok() {
            let parts = request(&uri, headers);
            if let Some(k) = presented_key(&parts) {
                prop_assert!(!k.is_empty());
            }
            if let Some(kept) = strip_apikey(&query) {
                prop_assert!(!kept.split('&').any(|p| p.split('=').next() == Some("apikey")));
            }
        }
    }

    #[test]
    fn a_key_comes_back_from_each_place_it_may_be_presented(
        token in "[A-Za-z0-9_.~-]{1,64}",
        spaces in " {0,3}",
        any_text in "\\PC{1,24}",
    ) {
        let bearer = HeaderValue::from_str(&format!("{spaces}Bearer {token}{spaces}")).unwrap();
        let parts = request("/v1", vec![("authorization", bearer)]);
        let got = presented_key(&parts);
        prop_assert_eq!(got.as_deref(), Some(token.as_str()));
        let header = HeaderValue::from_str(&format!("{spaces}{token}{spaces}")).unwrap();
        let parts = request("/v1", vec![("x-api-key", header)]);
        let got = presented_key(&parts);
        prop_assert_eq!(got.as_deref(), Some(token.as_str()));
        let parts = request(&format!("/v1?a=1&apikey={}", escaped(&any_text)), vec![]);
        let got = presented_key(&parts);
        prop_assert_eq!(got.as_deref(), Some(any_text.as_str()));
    }

    #[test]
    fn the_query_keeps_everything_but_the_key_in_order(
        pairs in vec(("apikey|[a-z]{1,6}", "[a-z0-9%]{0,5}"), 0..8),
    ) {
        let query: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let kept: Vec<String> = query.iter().filter(|p| !p.starts_with("apikey=")).cloned().collect();
        let got = strip_apikey(&query.join("&"));
        prop_assert_eq!(got, (!kept.is_empty()).then(|| kept.join("&")));
    }
}

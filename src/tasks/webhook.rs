//! Webhooks per the Standard Webhooks specification: signing, SSRF-safe connections, and the
//! retry schedule.
//!
//! A message is signed as `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`
//! with the key's secret (`whsec_` then base64). The address a webhook URL resolves to is checked
//! at every connect, not once at submission, so a name that first resolves to a public address and
//! later to 127.0.0.1 (DNS rebinding) is still refused.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine;
use hmac::{Hmac, Mac};
use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
use rustls::pki_types::CertificateDer;
use sha2::Sha256;

use crate::abuse::Cidrs;

/// Delays between delivery attempts after the first (the Standard Webhooks suggestion); each is
/// jittered by up to ±10%. Seven attempts in all over about 18 hours.
pub const SCHEDULE: [Duration; 6] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Longest wait for a receiver's answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a webhook secret or URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// Not `whsec_` followed by base64.
    #[error(
        "webhook secret is not `whsec_` followed by base64 (as the Standard Webhooks libraries generate)"
    )]
    Secret,
    /// Not an absolute http(s) URL with a host.
    #[error("webhook.url {0:?} must be an absolute http:// or https:// URL with a host")]
    Url(String),
    /// The extra CA bundle (`--webhook-ca`) could not be read.
    #[error("--webhook-ca {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The address is private, loopback, link-local or a metadata address.
    #[error(
        "webhook.url {url:?} points at {addr}, a private, loopback or link-local address; the gateway refuses those unless started with --allow-private-webhooks, or with --webhook-allow-cidrs naming a range that holds it"
    )]
    Private {
        /// The URL.
        url: String,
        /// The address refused.
        addr: IpAddr,
    },
}

/// A key's signing secret, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

/// A key's signing secrets: the one in force and, for a while after a rotation, the one before
/// it. Both signatures go in the header meanwhile (the spec allows several, space-separated), so a
/// receiver verifies whichever secret it has until it switches.
#[derive(Clone, Debug)]
pub struct Signing {
    current: Secret,
    previous: Option<(Secret, std::time::Instant)>,
}

impl Signing {
    /// Signing with one secret.
    pub fn new(current: Secret) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// Signing after `next` replaces the current secret: the current one still signs for
    /// `overlap`. The same secret again changes nothing.
    pub fn rotate(&self, next: Secret, overlap: Duration) -> Self {
        if next == self.current {
            return self.clone();
        }
        Self {
            previous: (!overlap.is_zero())
                .then(|| (self.current.clone(), std::time::Instant::now() + overlap)),
            current: next,
        }
    }

    /// The `webhook-signature` header of a message: the current secret's signature, then the
    /// previous one's while the overlap lasts.
    pub fn header(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut header = self.current.sign(msg_id, timestamp, body);
        if let Some((previous, until)) = &self.previous
            && std::time::Instant::now() < *until
        {
            header.push(' ');
            header.push_str(&previous.sign(msg_id, timestamp, body));
        }
        header
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (a bare base64 string is taken too, as the reference libraries do).
    pub fn parse(text: &str) -> Result<Self, WebhookError> {
        let b64 = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| WebhookError::Secret)?;
        if bytes.is_empty() {
            return Err(WebhookError::Secret);
        }
        Ok(Self(bytes))
    }

    /// Whether a `webhook-signature` header (space-separated `v1,<base64>` entries, as the spec
    /// allows several during a secret rotation) holds this secret's signature of the message.
    pub fn verify(&self, msg_id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let expected = self.sign(msg_id, timestamp, body);
        header.split(' ').any(|sig| {
            sig.len() == expected.len()
                && sig
                    .bytes()
                    .zip(expected.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }

    /// The `webhook-signature` header value of a message.
    pub fn sign(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Whether an address is one a webhook may never reach without `--allow-private-webhooks`:
/// loopback, private, shared (CGNAT), link-local (cloud metadata lives there), unspecified,
/// multicast, broadcast, documentation, and the IPv6 equivalents (IPv4-mapped ones included).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

/// Which addresses webhooks may reach: every public one, and of the private ones (see
/// [`is_private`]) none by default, all with `--allow-private-webhooks`, or those in the ranges
/// of `--webhook-allow-cidrs` (an in-cluster receiver's range, say, while the cloud's metadata
/// address and the rest of the cluster stay out of reach).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Every private address.
    pub all_private: bool,
    /// Private ranges allowed one by one.
    pub ranges: Cidrs,
}

impl Reach {
    /// Whether a webhook may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.all_private || !is_private(ip) || self.ranges.contains(ip)
    }
}

/// Checks a webhook URL as submitted: an absolute http URL with a host, and not an address
/// literal `reach` refuses (names are checked when they are resolved, at every connect).
pub fn check_url(url: &str, reach: &Reach) -> Result<http::Uri, WebhookError> {
    let bad = || WebhookError::Url(url.to_string());
    if url.len() > 2048 {
        return Err(bad());
    }
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad()),
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let addr = match literal.parse::<IpAddr>() {
        Ok(addr) => Some(addr),
        Err(_)
            if host.eq_ignore_ascii_case("localhost")
                || host.to_ascii_lowercase().ends_with(".localhost") =>
        {
            Some(IpAddr::from([127, 0, 0, 1]))
        }
        Err(_) => None,
    };
    if let Some(addr) = addr.filter(|a| !reach.allows(*a)) {
        return Err(WebhookError::Private {
            url: url.to_string(),
            addr,
        });
    }
    Ok(uri)
}

/// A resolver that drops the addresses a webhook may not reach: the connector only ever sees
/// allowed ones, whatever the name resolves to at that moment.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    reach: Arc<Reach>,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let reach = Arc::clone(&self.reach);
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| reach.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} resolves only to private or loopback addresses ({}); refused",
                    name.as_str(),
                    all.iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// The connector webhooks are sent through: http or https (the system's roots and `extra_roots`),
/// over the SSRF-guarded resolver either way.
pub type HookConnector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// Builds the webhook connector.
pub fn connector(reach: Arc<Reach>, extra_roots: &[CertificateDer<'static>]) -> HookConnector {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { reach });
    http.set_connect_timeout(Some(TIMEOUT));
    http.set_nodelay(true);
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    // A system without a CA bundle still delivers http webhooks and those under `extra_roots`.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra_roots.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Reads a PEM bundle of CA certificates webhook receivers may be signed by, beside the
/// system's (a private PKI, or a test's own CA).
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, WebhookError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: String| WebhookError::Ca {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The delay before attempt `attempt + 1` (attempts counted from 1), jittered, or `None` when
/// the schedule is used up.
pub fn next_delay(attempt: usize) -> Option<Duration> {
    let base = *SCHEDULE.get(attempt.checked_sub(1)?)?;
    Some(jitter(base, 0.1))
}

/// `base` scaled by a random factor in `[1 - spread, 1 + spread]`.
pub fn jitter(base: Duration, spread: f64) -> Duration {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source works");
    let unit = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    base.mul_f64(1.0 - spread + 2.0 * spread * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_signs_with_both_secrets_and_the_same_secret_again_changes_nothing() {
        let a = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = Secret::parse("whsec_c2xvdGdhdGUtdGVzdC1rZXktYi1zZWNyZXQ=").unwrap();
        let one = Signing::new(a.clone());
        assert_eq!(one.header("msg_1", 1, b"{}"), a.sign("msg_1", 1, b"{}"));
        let same = one.rotate(a.clone(), Duration::from_secs(60));
        assert_eq!(same.header("msg_1", 1, b"{}"), a.sign("msg_1", 1, b"{}"));
        let rotated = one.rotate(b.clone(), Duration::from_secs(60));
        let header = rotated.header("msg_1", 1, b"{}");
        assert_eq!(
            header,
            format!("{} {}", b.sign("msg_1", 1, b"{}"), a.sign("msg_1", 1, b"{}"))
        );
        assert!(a.verify("msg_1", 1, b"{}", &header) && b.verify("msg_1", 1, b"{}", &header));
        // No overlap: the new secret alone at once.
        let cut = one.rotate(b.clone(), Duration::ZERO);
        assert_eq!(cut.header("msg_1", 1, b"{}"), b.sign("msg_1", 1, b"{}"));
    }

    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        // The specification's example: secret, id, timestamp, payload and signature.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(Secret::parse("whsec_***").unwrap_err(), WebhookError::Secret);
    }

    #[test]
    fn private_and_metadata_addresses_are_refused_and_public_ones_pass() {
        let (none, all) = (
            Reach::default(),
            Reach {
                all_private: true,
                ..Reach::default()
            },
        );
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:80/",
            "http://[::ffff:192.168.0.1]/",
            "http://localhost:8080/",
            "http://100.64.0.1/",
        ] {
            assert!(
                matches!(check_url(url, &none), Err(WebhookError::Private { .. })),
                "{url}"
            );
            assert!(check_url(url, &all).is_ok(), "{url} with the flag");
        }
        assert!(check_url("http://hooks.example.com/x", &none).is_ok());
        assert!(check_url("http://93.184.216.34/x", &none).is_ok());
        for bad in ["ftp://example.com/", "/relative", "http://", "not a url"] {
            assert!(matches!(check_url(bad, &all), Err(WebhookError::Url(_))), "{bad}");
        }
    }

    #[test]
    fn listed_ranges_open_those_private_addresses_and_no_others() {
        let reach = Reach {
            all_private: false,
            ranges: "10.96.0.0/12, fd00:10::/32, 127.0.0.2".parse().unwrap(),
        };
        for url in [
            "http://10.96.0.10/hook",
            "http://10.111.255.1/hook",
            "http://[fd00:10::7]/hook",
            "http://127.0.0.2:8080/hook",
            "http://[::ffff:10.100.0.1]/hook",
            "http://93.184.216.34/x",
        ] {
            assert!(check_url(url, &reach).is_ok(), "{url}");
        }
        for url in [
            "http://10.112.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1/hook",
            "http://localhost/hook",
            "http://[fd00:11::1]/hook",
        ] {
            let e = check_url(url, &reach).unwrap_err();
            assert!(e.to_string().contains("--webhook-allow-cidrs"), "{url}: {e}");
        }
    }

    #[test]
    fn the_schedule_ends_after_seven_attempts() {
        assert!(next_delay(1).unwrap() >= Duration::from_millis(4500));
        assert!(next_delay(6).unwrap() >= Duration::from_secs(9 * 3600));
        assert_eq!(next_delay(7), None);
        assert_eq!(next_delay(0), None);
    }
}

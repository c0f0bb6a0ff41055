//! The upstream targets as the request path uses them: the routes of the configuration, and for
//! each target its connection pool (plain or TLS), its slots and rate bucket across every key,
//! and the provider credential written into its requests.
//!
//! A reload builds a new set but carries over, by target name, what requests in flight hold: the
//! slot pool and the bucket (an upgrade of a target's limit admits more at once, a downgrade cuts
//! nothing in flight), and the connection pool while the URL and TLS settings stay the same.
//!
//! Kept beside `upstream` rather than in a module of its own: it owns that client's pools. It
//! imports `upstream` and the limiter; `proxy` imports it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue, uri::Authority};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use super::upstream::{Pool, Tls};
use crate::{
    config::{
        GatewayConfig,
        targets::{CompiledTarget, Routes},
    },
    limiter::{
        Gcra, RateParams, RateRefusal, SlotGuard, SlotPool,
        shared::{BucketName, SharedRequest},
    },
};

/// One target, as requests on its paths reach it.
#[derive(Debug)]
pub(super) struct Target {
    /// The ApiUpstream's name.
    pub name: Arc<str>,
    pub compiled: CompiledTarget,
    pub pool: Arc<Pool>,
    /// `Host` of its requests.
    pub host: HeaderValue,
    slots: Arc<SlotPool>,
    bucket: Arc<Mutex<Gcra>>,
    /// The credential header, when the target injects one.
    pub credential: Option<(HeaderName, HeaderValue)>,
    /// Why the target cannot take requests (its credential is missing, its TLS settings are
    /// unusable): its paths answer 503 rather than reach it without them.
    pub unavailable: Option<String>,
    /// How TLS with the target last went: belongs with the connection pool, and is carried over
    /// a reload with it (a reload that changes another key or target does not forget a failure).
    health: Arc<TlsHealth>,
    /// Names the target's slots and bucket in the shared state: `target:<name>`, which no key id
    /// (`namespace/name`, no `:` in either) can be.
    scope: String,
}

/// The last TLS failure with a target, for the admin endpoint and the status the controller
/// writes; cleared by the next exchange that succeeds.
#[derive(Debug, Default)]
struct TlsHealth {
    last_error: Mutex<Option<String>>,
    /// Whether `last_error` is set: a successful exchange checks this, not the lock.
    failing: std::sync::atomic::AtomicBool,
}

/// Why a target refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TargetRefusal {
    /// See [`Target::unavailable`].
    Unavailable,
    /// Every slot of the target is in use.
    Slots {
        /// The target's slots.
        limit: u32,
    },
    /// The target's bucket is empty.
    Rate {
        /// Its rate.
        per_second: u32,
        /// Seconds until it admits one request.
        retry_after: u64,
    },
}

impl Target {
    /// Whether the target has limits of its own to decide.
    pub fn is_limited(&self) -> bool {
        self.compiled.concurrency.is_some() || self.compiled.rate_limit.is_some()
    }

    /// The target's admission in the shared state: its slots and its one bucket, under its own
    /// scope, with the same leases (renewed, released, reclaimed after a crash) as a key's.
    pub fn shared_request(&self) -> SharedRequest<'_> {
        SharedRequest {
            scope: &self.scope,
            slots: self.compiled.concurrency,
            rate: self.compiled.rate_limit.map(|r| {
                (
                    BucketName::Key,
                    RateParams {
                        per_second: r.per_second,
                        burst: r.burst,
                    },
                )
            }),
        }
    }

    /// Counts a request admitted through the shared state in this replica's pool too (without a
    /// limit), so that the local fallback knows what this replica has in flight if Redis goes.
    pub fn count_local(&self) -> Option<SlotGuard> {
        self.compiled
            .concurrency
            .and_then(|_| self.slots.try_acquire(u32::MAX).ok())
    }

    /// Takes the target's slot and a token of its bucket in this replica's memory, never waiting;
    /// a request refused for want of a slot costs no token. `share` divides the limits: 1 alone,
    /// the live replicas while the shared state is unreachable.
    pub fn admit(&self, epoch: Instant, share: u32) -> Result<Option<SlotGuard>, TargetRefusal> {
        if self.unavailable.is_some() {
            return Err(TargetRefusal::Unavailable);
        }
        let take = || match self.compiled.concurrency {
            Some(limit) => self
                .slots
                .try_acquire(super::table::share_of(limit, share))
                .map(Some)
                .map_err(|_| TargetRefusal::Slots { limit }),
            None => Ok(None),
        };
        let Some(rate) = self.compiled.rate_limit else {
            return take();
        };
        let params = RateParams {
            per_second: super::table::share_of(rate.per_second, share),
            burst: super::table::share_of(rate.burst, share),
        };
        let now = epoch.elapsed().as_nanos() as u64;
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        match bucket.admit_with(now, params, take) {
            Ok((guard, _)) => Ok(guard),
            Err(RateRefusal::Limited { retry_after_nanos }) => Err(TargetRefusal::Rate {
                per_second: rate.per_second,
                retry_after: retry_after_nanos.div_ceil(1_000_000_000).max(1),
            }),
            Err(RateRefusal::Other(r)) => Err(r),
        }
    }

    /// Records a failed TLS handshake with the target; `true` when it was not failing before.
    pub fn tls_failed(&self, error: String) -> bool {
        let h = &self.health;
        *h.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        !h.failing.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The target answered: a TLS failure seen before is over. `true` when one was.
    pub fn answered(&self) -> bool {
        let h = &self.health;
        if !h.failing.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        *h.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        h.failing.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// The last TLS failure with the target, while it lasts.
    pub fn tls_error(&self) -> Option<String> {
        self.health
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether every slot of the target is taken on this replica, without taking anything: a
    /// task waits on this before its key's admission spends a rate token for nothing.
    pub fn is_full(&self) -> bool {
        self.compiled
            .concurrency
            .is_some_and(|limit| self.slots.in_flight() >= limit)
    }

    /// Requests in flight to the target now.
    pub fn in_flight(&self) -> u32 {
        self.slots.in_flight()
    }

    /// The response timeout, or the gateway's.
    pub fn response_timeout(&self, default: Duration) -> Duration {
        self.compiled
            .response_timeout_ms
            .map_or(default, Duration::from_millis)
    }
}

/// Every target of one configuration, and which serves what.
#[derive(Debug, Default)]
pub(super) struct TargetSet {
    routes: Routes,
    targets: Vec<Arc<Target>>,
}

impl TargetSet {
    /// The target serving `path`, or `None` for the default upstream. Without targets this is
    /// one length check.
    pub fn route(&self, path: &str) -> Option<&Arc<Target>> {
        if self.targets.is_empty() {
            return None;
        }
        self.routes.find(path).map(|i| &self.targets[i])
    }

    /// The targets, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.targets.iter()
    }

    /// The targets of `config`, carrying over what `previous` holds for the same names, with the
    /// provider credentials by target name.
    pub fn build(
        config: &GatewayConfig,
        previous: &TargetSet,
        credentials: &BTreeMap<String, String>,
    ) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|(name, compiled)| {
                let old = previous.targets.iter().find(|t| &*t.name == name);
                Arc::new(build_target(
                    name,
                    compiled,
                    old.map(|t| &**t),
                    credentials.get(name),
                ))
            })
            .collect();
        Self {
            routes: Routes::new(&config.targets),
            targets,
        }
    }
}

fn build_target(
    name: &str,
    compiled: &CompiledTarget,
    old: Option<&Target>,
    credential: Option<&String>,
) -> Target {
    let mut unavailable = None;
    let same_connection = |o: &&Target| {
        let (a, b) = (&o.compiled, compiled);
        (
            &a.scheme,
            &a.authority,
            &a.ca_pem,
            a.insecure_skip_verify,
            a.connect_timeout_ms,
        ) == (
            &b.scheme,
            &b.authority,
            &b.ca_pem,
            b.insecure_skip_verify,
            b.connect_timeout_ms,
        )
    };
    // The configuration was checked: its authority parses.
    let authority: Authority = compiled
        .authority
        .parse()
        .unwrap_or_else(|_| Authority::from_static("invalid.invalid"));
    let (pool, health) = match old.filter(same_connection) {
        Some(o) => (Arc::clone(&o.pool), Arc::clone(&o.health)),
        None => {
            let tls = match compiled.is_https() {
                false => None,
                true => match tls_for(compiled, authority.host()) {
                    Ok(tls) => Some(tls),
                    Err(e) => {
                        unavailable = Some(format!("TLS settings: {e}"));
                        None
                    }
                },
            };
            let pool = Pool::with(
                authority.clone(),
                tls,
                Some(Duration::from_millis(compiled.connect_timeout_ms)),
            );
            (pool, Arc::default())
        }
    };
    let credential = match (&compiled.credential, credential) {
        (None, _) => None,
        (Some(c), Some(value)) => {
            let header = HeaderName::from_bytes(c.header.as_bytes()).ok();
            match header.zip(HeaderValue::try_from(c.value(value)).ok()) {
                Some((h, mut v)) => {
                    v.set_sensitive(true);
                    Some((h, v))
                }
                None => {
                    unavailable.get_or_insert_with(|| {
                        format!("the credential from {} is not a valid header value", c.source)
                    });
                    None
                }
            }
        }
        (Some(c), None) => {
            unavailable.get_or_insert_with(|| format!("credential {} is not available", c.source));
            None
        }
    };
    let params = compiled.rate_limit.map(|r| RateParams {
        per_second: r.per_second,
        burst: r.burst,
    });
    Target {
        name: name.into(),
        host: HeaderValue::try_from(compiled.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid.invalid")),
        pool,
        slots: old.map_or_else(Arc::default, |o| Arc::clone(&o.slots)),
        bucket: old.map_or_else(
            || {
                Arc::new(Mutex::new(Gcra::new(params.unwrap_or(RateParams {
                    per_second: 1,
                    burst: 1,
                }))))
            },
            |o| Arc::clone(&o.bucket),
        ),
        credential,
        unavailable,
        health,
        scope: format!("target:{name}"),
        compiled: compiled.clone(),
    }
}

/// The public roots of this system, read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The TLS client of an https target: the system's roots and the target's CA bundle, SNI and
/// the certificate check on the URL's host, ALPN `http/1.1` (the client speaks HTTP/1.1 only).
fn tls_for(target: &CompiledTarget, host: &str) -> Result<Tls, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if target.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(system_roots().iter().cloned());
        if let Some(pem) = &target.ca_pem {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the CA bundle does not parse: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err("the CA bundle holds no usable certificate".into());
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| format!("host {host:?}: {e}"))?;
    Ok(Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// `insecureSkipVerify`: any certificate is accepted, signatures are still checked so the
/// handshake is well-formed.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

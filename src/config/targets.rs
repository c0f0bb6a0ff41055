//! The upstream targets of a [`super::GatewayConfig`], compiled from `ApiUpstream` objects. Pure,
//! like the rest of `config`: the CA bundles are looked up by the caller, and credentials never
//! enter the configuration (only where they come from and how they are written).

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::api::{ApiUpstream, CaBundleRef, ConditionSpec, CredentialRef};

/// Longest wait for a connection to a target unless it says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// A target as the gateway forwards to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTarget {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`, as the URL wrote it (the TLS server name is its host).
    pub authority: String,
    /// Base path the request's path is appended to, without a trailing `/` (`""` for none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_path: String,
    /// Path patterns served (`/exact` or `/prefix*`).
    pub paths: Vec<String>,
    /// The provider credential added to each request; `None`: the request goes as it came, less
    /// the customer's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<TargetCredential>,
    /// Requests in flight to the target at once, across every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// One bucket for the whole target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<TargetRate>,
    /// Extra CA certificates (PEM) beside the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Accept any certificate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Longest wait for a connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for the response head; `None`: the gateway's `--upstream-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
}

impl CompiledTarget {
    /// Whether the target is reached over TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }

    /// The URL, for logs and reports.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// Where a target's credential comes from and how it is written; the value itself reaches the
/// gateway apart from the configuration (a mounted Secret).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetCredential {
    /// Lower-case header name.
    pub header: String,
    /// The value, with `{}` where the credential goes.
    pub format: String,
    /// `namespace/name/key` of the Secret entry, for messages.
    pub source: String,
}

impl TargetCredential {
    /// The header value for `credential`.
    pub fn value(&self, credential: &str) -> String {
        self.format.replacen("{}", credential, 1)
    }
}

/// A target's rate limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRate {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests a full bucket admits at once.
    pub burst: u32,
}

/// What compile found about one ApiUpstream, for its status conditions and `slotgate up`'s table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetReport {
    /// Why the target could not be compiled; `None`: it is in the configuration.
    pub invalid: Option<String>,
    /// Why the credential is not available; `None`: there is none to resolve, or it resolved.
    pub credential_missing: Option<String>,
    /// Why the TLS settings are unusable, or a warning (`insecureSkipVerify`).
    pub tls: Result<Option<String>, String>,
    /// The last TLS handshake failure a gateway reported with the target; `None`: none.
    pub handshake: Option<String>,
}

impl TargetReport {
    /// Ready: in the configuration, and every request on its paths can be forwarded.
    pub fn ready(&self) -> bool {
        self.invalid.is_none()
            && self.credential_missing.is_none()
            && self.tls.is_ok()
            && self.handshake.is_none()
    }

    /// The ApiUpstream's status conditions: `Ready`, `CredentialResolved`, `TLSValid`.
    pub fn conditions(&self, credential: bool) -> Vec<ConditionSpec> {
        let resolved = match (&self.credential_missing, credential) {
            (Some(why), _) => ConditionSpec::fail(
                "CredentialResolved",
                "SecretNotFound",
                format!("{why}: the target's paths answer 503 target_unavailable"),
            ),
            (None, true) => ConditionSpec::ok(
                "CredentialResolved",
                "Resolved",
                "The credential Secret entry is there.",
            ),
            (None, false) => ConditionSpec::ok(
                "CredentialResolved",
                "NotRequired",
                "No credentialRef: requests go on without the customer's key.",
            ),
        };
        let tls = match (&self.tls, &self.handshake) {
            (Err(why), _) => ConditionSpec::fail("TLSValid", "TLSConfigInvalid", why.clone()),
            (_, Some(why)) => ConditionSpec::fail(
                "TLSValid",
                "HandshakeFailed",
                format!("{why}: the target's paths answer 502 upstream_tls_error"),
            ),
            (Ok(Some(warning)), None) => ConditionSpec::ok("TLSValid", "InsecureSkipVerify", warning.clone()),
            (Ok(None), None) => ConditionSpec::ok(
                "TLSValid",
                "Valid",
                "Certificates are checked against the system's roots and the caBundleRef, for the URL's host.",
            ),
        };
        let ready = match (
            &self.invalid,
            &self.credential_missing,
            &self.tls,
            &self.handshake,
        ) {
            (Some(why), _, _, _) => ConditionSpec::fail("Ready", "Invalid", why.clone()),
            (_, Some(why), _, _) => ConditionSpec::fail("Ready", "CredentialNotFound", why.clone()),
            (_, _, Err(why), _) => ConditionSpec::fail("Ready", "TLSConfigInvalid", why.clone()),
            (_, _, _, Some(why)) => ConditionSpec::fail("Ready", "HandshakeFailed", why.clone()),
            _ => ConditionSpec::ok("Ready", "Routed", "Requests on the target's paths go to it."),
        };
        match &self.invalid {
            Some(_) => vec![ready],
            None => vec![ready, resolved, tls],
        }
    }
}

/// What the caller knows of the objects an ApiUpstream refers to.
pub trait TargetRefs {
    /// The PEM text of a CA bundle entry, or why it is not there.
    fn ca_bundle(&self, r: &CaBundleRef) -> Result<String, String>;
    /// Whether a credential Secret entry exists (and is not empty).
    fn has_credential(&self, r: &CredentialRef) -> bool;
}

/// Compiles the targets by object name, with a report for each object.
pub fn compile_targets<U: std::borrow::Borrow<ApiUpstream>>(
    upstreams: &[U],
    refs: &dyn TargetRefs,
) -> (BTreeMap<String, CompiledTarget>, BTreeMap<String, TargetReport>) {
    let mut out = BTreeMap::new();
    let mut reports = BTreeMap::new();
    for u in upstreams {
        let u = u.borrow();
        let name = u.name_any();
        let report = match compile_target(u, refs) {
            Ok((target, report)) => {
                out.insert(name.clone(), target);
                report
            }
            Err(reason) => TargetReport {
                invalid: Some(reason),
                credential_missing: None,
                tls: Ok(None),
                handshake: None,
            },
        };
        reports.insert(name, report);
    }
    (out, reports)
}

fn compile_target(u: &ApiUpstream, refs: &dyn TargetRefs) -> Result<(CompiledTarget, TargetReport), String> {
    let spec = &u.spec;
    let (scheme, rest) = spec
        .url
        .split_once("://")
        .ok_or_else(|| format!("url {:?} must start with http:// or https://", spec.url))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("url {:?} must start with http:// or https://", spec.url));
    }
    let (authority, base_path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let parsed: http::uri::Authority = authority
        .parse()
        .map_err(|_| format!("url {:?}: {authority:?} is not a host[:port]", spec.url))?;
    if parsed.host().is_empty() || authority.contains('@') || rest.contains(['?', '#']) {
        return Err(format!(
            "url {:?} must be a host with an optional port and path, no user info, query or fragment",
            spec.url
        ));
    }
    for p in &spec.paths {
        super::check_pattern(p)?;
    }
    if spec.paths.is_empty() {
        return Err("paths must name at least one path pattern".into());
    }
    let ms = |field: &str, v: &Option<String>| {
        v.as_deref()
            .map(|d| super::tasks::parse_duration_ms(d).map_err(|e| format!("{field}: {e}")))
            .transpose()
    };
    let connect_timeout_ms =
        ms("connectTimeout", &spec.connect_timeout)?.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
    let response_timeout_ms = ms("responseTimeout", &spec.response_timeout)?;
    if connect_timeout_ms == 0 || response_timeout_ms == Some(0) {
        return Err("timeouts must be longer than 0".into());
    }
    let credential = spec.credential_ref.as_ref().map(|c| {
        let header = c.header_name();
        (
            TargetCredential {
                format: c.value_format().to_string(),
                source: format!("{}/{}/{}", c.namespace, c.name, c.key),
                header,
            },
            c,
        )
    });
    if let Some((c, _)) = &credential {
        if !c.format.contains("{}") {
            return Err("credentialRef.format must contain {} where the credential goes".into());
        }
        if http::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
            return Err(format!(
                "credentialRef.header {:?} is not a header name",
                c.header
            ));
        }
        if matches!(
            c.header.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection"
        ) {
            return Err(format!("credentialRef.header cannot be {:?}", c.header));
        }
    }
    let credential_missing = credential.as_ref().and_then(|(c, r)| {
        (!refs.has_credential(r)).then(|| format!("Secret entry {} not found or empty", c.source))
    });
    let tls_spec = spec.tls.clone().unwrap_or_default();
    let mut ca_pem = None;
    let tls = if scheme == "http" {
        match (&tls_spec.ca_bundle_ref, tls_spec.insecure_skip_verify) {
            (None, false) => Ok(None),
            _ => Err("tls is set but the url is http://".to_string()),
        }
    } else {
        match &tls_spec.ca_bundle_ref {
            Some(r) => match refs.ca_bundle(r) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {
                    ca_pem = Some(pem);
                    Ok(None)
                }
                Ok(_) => Err(format!(
                    "caBundleRef {}/{}/{} holds no PEM certificate",
                    r.namespace, r.name, r.key
                )),
                Err(e) => Err(e),
            },
            None => Ok(None),
        }
        .map(|ok| {
            ok.or_else(|| {
                tls_spec
                    .insecure_skip_verify
                    .then(|| "insecureSkipVerify: the target's certificate is not checked".to_string())
            })
        })
    };
    let target = CompiledTarget {
        scheme: scheme.to_string(),
        authority: authority.to_string(),
        base_path: base_path.to_string(),
        paths: spec.paths.clone(),
        credential: credential.map(|(c, _)| c),
        concurrency: spec.concurrency.as_ref().map(|c| c.max_concurrent_requests),
        rate_limit: spec.rate_limit.as_ref().map(|r| TargetRate {
            per_second: r.requests_per_second,
            burst: r.burst.unwrap_or(r.requests_per_second),
        }),
        ca_pem,
        insecure_skip_verify: scheme == "https" && tls_spec.insecure_skip_verify,
        connect_timeout_ms,
        response_timeout_ms,
    };
    Ok((
        target,
        TargetReport {
            invalid: None,
            credential_missing,
            tls,
            handshake: None,
        },
    ))
}

/// Which target serves a path: the longest matching pattern wins, an exact pattern beats a
/// prefix of the same length, then the target name decides (so the choice does not depend on the
/// order objects were read in). Built once per configuration; a lookup walks the patterns from
/// the longest and stops at the first match.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// `(pattern without its *, exact, index of the target in name order)`, best first.
    entries: Vec<(String, bool, usize)>,
}

impl Routes {
    /// The routes of `targets`; indexes count in the map's (name) order.
    pub fn new(targets: &BTreeMap<String, CompiledTarget>) -> Self {
        let mut entries: Vec<(String, bool, usize)> = targets
            .values()
            .enumerate()
            .flat_map(|(i, t)| {
                t.paths.iter().map(move |p| match p.strip_suffix('*') {
                    Some(prefix) => (prefix.to_string(), false, i),
                    None => (p.clone(), true, i),
                })
            })
            .collect();
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        Self { entries }
    }

    /// Whether no target claims any path.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index of the target serving `path`; `None`: the default upstream.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|(p, exact, _)| {
                if *exact {
                    p == path
                } else {
                    path.starts_with(p.as_str())
                }
            })
            .map(|e| e.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiUpstreamSpec, TargetTls};

    struct Refs;
    impl TargetRefs for Refs {
        fn ca_bundle(&self, r: &CaBundleRef) -> Result<String, String> {
            match r.name.as_str() {
                "ca" => Ok("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into()),
                "empty" => Ok(String::new()),
                _ => Err(format!("ConfigMap {}/{} not found", r.namespace, r.name)),
            }
        }
        fn has_credential(&self, r: &CredentialRef) -> bool {
            r.name == "provider"
        }
    }

    fn upstream(name: &str, url: &str, paths: &[&str]) -> ApiUpstream {
        ApiUpstream::new(
            name,
            ApiUpstreamSpec {
                url: url.into(),
                paths: paths.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn credential(secret: &str) -> CredentialRef {
        CredentialRef {
            namespace: "default".into(),
            name: secret.into(),
            key: "key".into(),
            header: None,
            format: None,
        }
    }

    #[test]
    fn urls_split_into_scheme_authority_and_base_path() {
        let (t, r) = compile_targets(
            &[
                upstream("a", "https://api.example.com:8443/v2/", &["/v1/images/*"]),
                upstream("b", "http://10.0.0.1", &["/v1/search"]),
                upstream("c", "ftp://x", &["/"]),
                upstream("d", "http://u@x/", &["/"]),
                upstream("e", "http://x", &["v1"]),
            ],
            &Refs,
        );
        assert_eq!(t["a"].scheme, "https");
        assert_eq!(t["a"].authority, "api.example.com:8443");
        assert_eq!(t["a"].base_path, "/v2");
        assert_eq!(t["b"].url(), "http://10.0.0.1");
        assert_eq!(t["a"].connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS);
        for bad in ["c", "d", "e"] {
            assert!(!t.contains_key(bad), "{bad}");
            assert!(r[bad].invalid.is_some() && !r[bad].ready(), "{bad}: {:?}", r[bad]);
        }
    }

    #[test]
    fn credentials_and_ca_bundles_are_reported_not_refused() {
        let mut found = upstream("found", "https://x", &["/a*"]);
        found.spec.credential_ref = Some(credential("provider"));
        found.spec.tls = Some(TargetTls {
            ca_bundle_ref: Some(CaBundleRef {
                namespace: "default".into(),
                name: "ca".into(),
                key: "ca.crt".into(),
            }),
            insecure_skip_verify: false,
        });
        let mut missing = upstream("missing", "https://x", &["/b*"]);
        missing.spec.credential_ref = Some(credential("gone"));
        missing.spec.tls = Some(TargetTls {
            ca_bundle_ref: Some(CaBundleRef {
                namespace: "default".into(),
                name: "empty".into(),
                key: "ca.crt".into(),
            }),
            insecure_skip_verify: false,
        });
        let (t, r) = compile_targets(&[found, missing], &Refs);
        assert!(r["found"].ready(), "{:?}", r["found"]);
        assert!(t["found"].ca_pem.is_some());
        let c = t["found"].credential.as_ref().unwrap();
        assert_eq!(
            (c.header.as_str(), c.value("sk-1").as_str()),
            ("authorization", "Bearer sk-1")
        );
        // A target whose credential is missing stays in the configuration: its paths must not
        // fall through to the default upstream with the customer's request.
        assert!(t.contains_key("missing"));
        assert!(
            r["missing"]
                .credential_missing
                .as_deref()
                .unwrap()
                .contains("default/gone/key")
        );
        assert!(
            r["missing"]
                .tls
                .as_ref()
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(!r["missing"].ready());
    }

    #[test]
    fn the_longest_pattern_wins_and_exact_beats_prefix() {
        let (t, _) = compile_targets(
            &[
                upstream("wide", "http://a", &["/v1/*"]),
                upstream("narrow", "http://b", &["/v1/images/*"]),
                upstream("exact", "http://c", &["/v1/images/"]),
            ],
            &Refs,
        );
        let routes = Routes::new(&t);
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        let name = |p| routes.find(p).map(|i| names[i]);
        assert_eq!(name("/v1/search"), Some("wide"));
        assert_eq!(name("/v1/images/x"), Some("narrow"));
        assert_eq!(name("/v1/images/"), Some("exact"));
        assert_eq!(name("/v2"), None);
    }
}

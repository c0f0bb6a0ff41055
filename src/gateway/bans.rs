//! Where the request path meets [`crate::abuse`]: who the client is (its address, or the one
//! trusted proxies report), the ban check before any key is looked up in the limiter, and the
//! counting of refusals and invalid keys that starts bans.

use std::net::IpAddr;

use http::{HeaderMap, Request, request::Parts};

use crate::{
    abuse::{Ban, Cidrs, Guard, Policy, Reason, Subject, decode_shared, encode_shared},
    limiter::shared::unix_ms,
};

use super::{
    Gateway,
    headers::{error_response_of, limit_headers, presented_key, retry_after},
    metrics::ErrorCode,
    proxy::Answer,
    table::{self, KeyView},
};

/// Subjects the ban table tracks unless told otherwise: about 26 MiB at most.
pub const DEFAULT_TRACKED: usize = 1 << 18;

/// How the gateway protects itself and its upstream from clients that keep exceeding their
/// limits or guess keys. Each plan says when its clients are banned (`ApiPlan.spec.abuse`);
/// these are the gateway-wide parts.
#[derive(Clone, Debug)]
pub struct AbuseOptions {
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers name the client (load balancers,
    /// ingress controllers). From any other peer those headers change nothing: a client could
    /// write anything there.
    pub trusted_proxies: Cidrs,
    /// Client addresses that are never banned (monitoring, the provider's own services).
    pub allowlist: Cidrs,
    /// When an address that keeps sending unknown or revoked keys is banned; `None`: never.
    pub invalid_keys: Option<Policy>,
    /// Subjects (addresses and keys) tracked at once: the table's memory is bounded by this.
    pub tracked: usize,
}

impl Default for AbuseOptions {
    /// No trusted proxy, no allowlist, 20 invalid keys in a minute ban an address for 2 minutes
    /// (doubling for each repeat within an hour, up to an hour).
    fn default() -> Self {
        Self {
            trusted_proxies: Cidrs::default(),
            allowlist: Cidrs::default(),
            invalid_keys: Some(Policy {
                threshold: 20,
                window_ms: 60_000,
                ..Policy::default()
            }),
            tracked: DEFAULT_TRACKED,
        }
    }
}

/// The client address a request came from: the peer's, or, when the peer is a trusted proxy,
/// the first address from the right of `X-Forwarded-For` (else `Forwarded: for=`) that is not
/// a trusted proxy itself. Each proxy appends the address it saw, so everything left of the
/// first untrusted one was written by the client and proves nothing.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &Cidrs) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let xff = headers.get_all("x-forwarded-for");
    let from_xff = xff.iter().next().is_some();
    let values = if from_xff {
        xff
    } else {
        headers.get_all(http::header::FORWARDED)
    };
    let mut client = peer;
    // From the last address added: the last header line, each line from its end.
    let items = values
        .iter()
        .rev()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','));
    for item in items {
        let addr = if from_xff {
            parse_node(item)
        } else {
            item.split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.eq_ignore_ascii_case("for"))
                .and_then(|(_, v)| parse_node(v))
        };
        // Garbage (or `unknown`, or an obfuscated name) ends the walk: the last address read
        // is the best known.
        let Some(addr) = addr else { break };
        client = addr;
        if !trusted.contains(addr) {
            break;
        }
    }
    client
}

/// An address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally quoted.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

/// The name of a subject kind in metrics.
fn by(subject: &Subject) -> &'static str {
    match subject {
        Subject::Ip(_) => "ip",
        Subject::Key(_) => "key",
    }
}

impl Gateway {
    /// The ban table.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Milliseconds of the gateway's clock: the ban table's time.
    pub(super) fn abuse_now(&self) -> u64 {
        self.now() / 1_000_000
    }

    /// Who sent `req`, from the connection's peer.
    pub(super) fn client_of<B>(&self, req: &Request<B>, peer: Option<IpAddr>) -> Option<IpAddr> {
        peer.map(|p| client_address(req.headers(), p, &self.options.abuse.trusted_proxies))
    }

    /// The answer to a request from a banned address, if it is banned. The key it presents, if
    /// known, only adds its limit headers: nothing is admitted, counted against the key or sent
    /// upstream.
    pub(super) fn address_ban(&self, parts: &Parts, client: Option<IpAddr>) -> Option<Answer> {
        let ip = client?;
        if !self.guard.may_ban() {
            return None;
        }
        let now = self.abuse_now();
        let subject = Subject::ip(ip);
        let ban = self.guard.check(&subject, now)?;
        self.metrics.abuse.refused(ban.reason, "ip");
        let table = self.table.load();
        let entry = presented_key(parts).and_then(|token| {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            table.get(&digest)
        });
        if let Some(e) = &entry {
            e.metrics.refusal(ErrorCode::TemporarilyBlocked);
        }
        self.note_refusal(parts, entry.as_ref(), ErrorCode::TemporarilyBlocked, client);
        Some(banned(&ban, now, entry.as_ref(), parts.uri.path()))
    }

    /// The answer to a request with a banned key, if the key's plan bans keys and it is banned.
    pub(super) fn key_ban(&self, entry: &KeyView<'_>, path: &str) -> Option<Answer> {
        if !self.guard.may_ban() || !entry.abuse.is_some_and(|a| a.by_key) {
            return None;
        }
        let now = self.abuse_now();
        let ban = self.guard.check(&Subject::key(&entry.id), now)?;
        self.metrics.abuse.refused(ban.reason, "key");
        entry.metrics.refusal(ErrorCode::TemporarilyBlocked);
        Some(banned(&ban, now, Some(entry), path))
    }

    /// Counts a refusal by the key's limits against the key or the client, as its plan says.
    pub(super) fn count_refusal(&self, entry: &KeyView<'_>, client: Option<IpAddr>) {
        let Some(abuse) = entry.abuse else { return };
        let subject = if abuse.by_key {
            Subject::key(&entry.id)
        } else {
            match client.filter(|ip| !self.options.abuse.allowlist.contains(*ip)) {
                Some(ip) => Subject::ip(ip),
                None => return,
            }
        };
        self.record(&subject, Reason::Refusals, &abuse.policy, Some(&entry.id));
    }

    /// Counts an unknown or revoked key against the client's address.
    pub(super) fn count_invalid_key(&self, client: Option<IpAddr>) {
        let (Some(ip), Some(policy)) = (client, self.options.abuse.invalid_keys.as_ref()) else {
            return;
        };
        if self.options.abuse.allowlist.contains(ip) {
            return;
        }
        self.record(&Subject::ip(ip), Reason::InvalidKeys, policy, None);
    }

    fn record(&self, subject: &Subject, reason: Reason, policy: &Policy, key: Option<&str>) {
        let now = self.abuse_now();
        let Some(ban) = self.guard.record(subject, reason, policy, now) else {
            return;
        };
        self.ban_started(subject, &ban, key);
        if let Some(shared) = self.shared.clone() {
            // Off the request path: the other replicas learn of it on their next read.
            let until = unix_ms() + ban.remaining_ms(now);
            let member = encode_shared(subject, &ban, until);
            tokio::spawn(async move {
                if let Err(e) = shared.put_expiring(BANS, &member, until).await {
                    tracing::warn!(error = %e, "could not share a ban; it holds on this replica only");
                }
            });
        }
    }

    /// What follows a ban's start, whichever replica started it.
    fn ban_started(&self, subject: &Subject, ban: &Ban, key: Option<&str>) {
        self.metrics.abuse.started(ban.reason, by(subject));
        if matches!(subject, Subject::Key(_)) {
            // The controller shows it on the ApiKey: report now rather than at the next tick.
            self.report_soon.notify_one();
        }
        self.metrics.abuse.active.inc();
        tracing::warn!(
            subject = %subject,
            reason = ban.reason.as_str(),
            strike = ban.strike,
            seconds = (ban.until - ban.started).div_ceil(1_000),
            key,
            "ban started: requests are refused with temporarily_blocked until it ends"
        );
    }

    /// Lifts a ban (the admin endpoint), on every replica when bans are shared. Whether one was
    /// in force here.
    pub fn lift_ban(&self, subject: &Subject) -> bool {
        let lifted = self.lift_here(subject);
        if lifted {
            tracing::info!(subject = %subject, "ban lifted");
        }
        if let Some(shared) = self.shared.clone() {
            let subject = subject.clone();
            tokio::spawn(async move {
                let gone = shared.remove_where(BANS, |m| decode_shared(m).is_some_and(|d| d.0 == subject));
                if let Err(e) = gone.await {
                    tracing::warn!(error = %e, "could not lift a shared ban; it ends on its own on the other replicas");
                }
            });
        }
        lifted
    }

    fn lift_here(&self, subject: &Subject) -> bool {
        let lifted = self.guard.lift(subject, self.abuse_now());
        if lifted {
            self.metrics.abuse.active.dec();
        }
        lifted
    }

    /// Bans in force, with their time left in milliseconds, longest first.
    pub fn bans(&self) -> Vec<(Subject, Ban, u64)> {
        let now = self.abuse_now();
        let mut bans: Vec<_> = self
            .guard
            .active(now)
            .into_iter()
            .map(|(s, b)| (s, b, b.remaining_ms(now)))
            .collect();
        bans.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.to_string().cmp(&b.0.to_string())));
        bans
    }

    /// Forgets what no longer matters in the ban table and refreshes its gauges.
    pub fn sweep_bans(&self) {
        let active = self.guard.sweep(self.abuse_now());
        self.metrics.abuse.active.set(active as i64);
        self.metrics.abuse.table_bytes.set(self.guard.bytes() as i64);
    }
}

/// The shared expiring set of bans (`<prefix>:bans`).
const BANS: &str = "bans";

/// How often a replica reads the bans the others started: a ban holds everywhere within this
/// (plus one round trip).
const BAN_SYNC: std::time::Duration = std::time::Duration::from_millis(400);

/// Bans read from the shared state at most, per read (the longest first).
const BAN_SYNC_LIMIT: usize = 10_000;

/// Keeps this replica's bans in step with the others' through the shared state (Redis): takes
/// the bans they started, and lifts those an operator lifted on another replica.
pub(super) async fn share_bans(gateway: std::sync::Weak<Gateway>) {
    let mut tick = tokio::time::interval(BAN_SYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Subjects the last read found banned: one gone from the set before its end was lifted.
    let mut shared_before: std::collections::HashMap<Subject, u64> = Default::default();
    loop {
        tick.tick().await;
        let Some(gw) = gateway.upgrade() else { return };
        let Some(shared) = gw.shared.clone() else { return };
        let Ok(members) = shared.live(BANS, BAN_SYNC_LIMIT).await else {
            continue;
        };
        let (now, unix) = (gw.abuse_now(), unix_ms());
        let mut shared_now = std::collections::HashMap::with_capacity(members.len());
        for (member, _) in members {
            let Some((subject, reason, strike, until_unix)) = decode_shared(&member) else {
                continue;
            };
            let until = now + until_unix.saturating_sub(unix);
            let ban = Ban {
                reason,
                started: now,
                until,
                strike,
            };
            // The escalation window of the policy that started it is the other replica's to
            // know; an hour, the default, keeps repeats escalating here too.
            let banned_here = gw.guard.check(&subject, now).is_some();
            if gw.guard.impose(&subject, ban, until + 3_600_000, now) && !banned_here {
                gw.metrics.abuse.active.inc();
                tracing::info!(subject = %subject, reason = reason.as_str(), strike, "ban started on another replica");
            }
            let end = shared_now.get(&subject).copied().unwrap_or(0).max(until_unix);
            shared_now.insert(subject, end);
        }
        for (subject, until_unix) in shared_before.drain() {
            if until_unix > unix + 1_000 && !shared_now.contains_key(&subject) && gw.lift_here(&subject) {
                tracing::info!(subject = %subject, "ban lifted on another replica");
            }
        }
        shared_before = shared_now;
    }
}

/// 429 `temporarily_blocked` with the ban's time left, and the key's limits with nothing left.
fn banned(ban: &Ban, now: u64, entry: Option<&KeyView<'_>>, path: &str) -> Answer {
    let secs = ban.retry_after_secs(now);
    let mut n = itoa::Buffer::new();
    // The gateway's own text, copied without escaping or formatting: a banned client may be
    // flooding, and this answer must cost less than the refusal that started the ban.
    let pieces = [
        "Temporarily blocked for ",
        n.format(secs),
        match ban.reason {
            Reason::Refusals => " s: too many requests over the plan's limits. Repeated blocks last longer.",
            Reason::InvalidKeys => {
                " s: too many invalid API keys from this address. Repeated blocks last longer."
            }
        },
    ];
    let mut res = error_response_of(ErrorCode::TemporarilyBlocked, &pieces, None);
    if let Some(e) = entry {
        let (slots, rate) = table::exhausted(e, path);
        limit_headers(res.headers_mut(), slots, rate);
    }
    retry_after(res.headers_mut(), secs);
    (Some(ErrorCode::TemporarilyBlocked), res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let trusted: Cidrs = "10.0.0.0/8".parse().unwrap();
        let lb: IpAddr = "10.1.2.3".parse().unwrap();
        let outsider: IpAddr = "198.51.100.9".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.9.9.9")]);
        // The spoofed 1.1.1.1 is left of the first untrusted address: ignored.
        assert_eq!(client_address(&xff, lb, &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(&xff, outsider, &trusted), outsider);
        assert_eq!(client_address(&xff, lb, &Cidrs::default()), lb);
        let lines = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.1:80"),
        ]);
        assert_eq!(client_address(&lines, lb, &trusted), ip("203.0.113.7"));
        let fwd = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::7]:4711\"",
        )]);
        assert_eq!(client_address(&fwd, lb, &trusted), ip("2001:db8::7"));
        let unknown = headers(&[("x-forwarded-for", "unknown")]);
        assert_eq!(client_address(&unknown, lb, &trusted), lb);
        assert_eq!(client_address(&headers(&[]), lb, &trusted), lb);
    }
}

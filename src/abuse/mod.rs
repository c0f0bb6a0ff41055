//! Abuse protection: temporary bans of the clients that keep exceeding their limits or keep
//! guessing keys, escalating for repeat offenders, in a table of fixed size.
//!
//! The seeds' providers do this ("if you keep sending more and more requests exceeding your plan
//! concurrency limit in a short period of time, the service may temporarily block your IP
//! address"): a refusal is cheap, but a client that loops on 429s at full speed still costs the
//! whole request path, and one that sprays tokens can guess keys. A ban answers before the key
//! is looked up in the limiter and long before the upstream.
//!
//! Like the limiter, this module knows nothing of HTTP or Kubernetes: the gateway passes in who
//! a request came from ([`Subject`]), what happened ([`Reason`]), the plan's [`Policy`] and the
//! time, in milliseconds of its own monotonic clock, so tests drive it without sleeping.
//!
//! ```
//! use slotgate::abuse::{Guard, Policy, Reason, Subject};
//!
//! let guard = Guard::new(1024);
//! let policy = Policy { threshold: 3, window_ms: 10_000, ban_ms: 60_000, ..Policy::default() };
//! let ip = Subject::ip("127.0.0.1".parse().unwrap());
//! assert!(guard.record(&ip, Reason::Refusals, &policy, 0).is_none());
//! assert!(guard.record(&ip, Reason::Refusals, &policy, 1).is_none());
//! let ban = guard.record(&ip, Reason::Refusals, &policy, 2).expect("the third refusal bans");
//! assert_eq!(ban.until, 60_002);
//! assert!(guard.check(&ip, 30_000).is_some());
//! assert!(guard.check(&ip, 60_002).is_none());
//! ```

mod guard;

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

pub use guard::{Ban, Guard, SLOT_BYTES};

/// When a subject is banned and for how long. Times are milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Events within `window_ms` that start a ban (at least 1).
    pub threshold: u32,
    /// Length of the sliding window the events are counted in.
    pub window_ms: u64,
    /// The first ban's length.
    pub ban_ms: u64,
    /// A ban that starts within this long of the previous one's end is a repeat, and lasts
    /// `escalation_factor` times longer than that one.
    pub escalation_window_ms: u64,
    /// How much longer each repeat lasts (1: never longer).
    pub escalation_factor: u32,
    /// The longest ban (the "long-lasting block").
    pub max_ban_ms: u64,
}

impl Default for Policy {
    /// 200 refusals in 10 s ban for 2 minutes; each repeat within an hour doubles, up to an hour.
    fn default() -> Self {
        Self {
            threshold: 200,
            window_ms: 10_000,
            ban_ms: 120_000,
            escalation_window_ms: 3_600_000,
            escalation_factor: 2,
            max_ban_ms: 3_600_000,
        }
    }
}

impl Policy {
    /// The length of ban number `strike` in a row (1: the first).
    pub fn ban_for(&self, strike: u32) -> u64 {
        let max = self.max_ban_ms.max(self.ban_ms);
        let mut ms = self.ban_ms;
        for _ in 1..strike {
            if ms >= max {
                break;
            }
            ms = ms.saturating_mul(u64::from(self.escalation_factor.max(1)));
        }
        ms.min(max)
    }
}

/// Why a subject was banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Too many requests refused by the plan's limits (429) in the window.
    Refusals,
    /// Too many unknown or revoked keys from one address (someone guessing keys).
    InvalidKeys,
}

impl Reason {
    /// Every reason, for metric series that exist from the start.
    pub const ALL: [Reason; 2] = [Reason::Refusals, Reason::InvalidKeys];

    /// The reason as metrics, the admin endpoint and events name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refusals => "repeated_refusals",
            Self::InvalidKeys => "invalid_keys",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Who is counted and banned: a client address, or a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A client address. IPv6 addresses stand for their /64: a single host usually holds a whole
    /// /64 and can pick any address in it, so banning one address would ban nothing.
    Ip(IpAddr),
    /// A key, by `namespace/name` (never its token).
    Key(Arc<str>),
}

impl Subject {
    /// The subject of a client address: IPv4 as it is (also when mapped into IPv6), IPv6 as
    /// its /64 network.
    pub fn ip(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Ip(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Ip(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self::Ip(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }

    /// The subject of a key id (`namespace/name`).
    pub fn key(id: &Arc<str>) -> Self {
        Self::Key(Arc::clone(id))
    }
}

/// `ip:203.0.113.7`, `ip:2001:db8:1:2::/64` or `key:team-a/acme`: how the admin endpoint lists
/// a subject and takes it back to lift a ban.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V4(a)) => write!(f, "ip:{a}"),
            Self::Ip(IpAddr::V6(a)) => write!(f, "ip:{a}/64"),
            Self::Key(id) => write!(f, "key:{id}"),
        }
    }
}

/// Why a subject could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a subject: expected ip:<address> (such as ip:203.0.113.7) or key:<namespace>/<name>")]
pub struct SubjectError(pub String);

impl FromStr for Subject {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SubjectError(s.to_string());
        if let Some(addr) = s.strip_prefix("ip:") {
            let addr = addr.strip_suffix("/64").unwrap_or(addr);
            return addr.parse().map(Self::ip).map_err(|_| bad());
        }
        match s.strip_prefix("key:") {
            Some(id)
                if id
                    .split_once('/')
                    .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty()) =>
            {
                Ok(Self::Key(id.into()))
            }
            _ => Err(bad()),
        }
    }
}

/// A ban as replicas share it: `reason strike until_unix_ms subject`. Another replica's clock
/// differs from this one's monotonic clock, so a shared ban carries wall-clock time.
pub fn encode_shared(subject: &Subject, ban: &Ban, until_unix_ms: u64) -> String {
    format!("{} {} {until_unix_ms} {subject}", ban.reason.as_str(), ban.strike)
}

/// Reads [`encode_shared`]'s text back: the subject, reason, strike and end (Unix ms).
pub fn decode_shared(text: &str) -> Option<(Subject, Reason, u32, u64)> {
    let mut parts = text.splitn(4, ' ');
    let reason = Reason::from_str(parts.next()?)?;
    let strike = parts.next()?.parse().ok()?;
    let until = parts.next()?.parse().ok()?;
    let subject = parts.next()?.parse().ok()?;
    Some((subject, reason, strike, until))
}

/// A set of address ranges (`10.0.0.0/8`, `2001:db8::/32`, or single addresses): the trusted
/// proxies and the ban allowlist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cidrs(Vec<(IpAddr, u8)>);

/// Why an address range could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an address range such as 10.0.0.0/8, 2001:db8::/32 or 203.0.113.7")]
pub struct CidrError(pub String);

impl Cidrs {
    /// Whether no range is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `addr` lies in one of the ranges (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|&(net, bits)| match (net, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
            _ => false,
        })
    }
}

fn prefix_eq(net: &[u8], addr: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    net[..whole] == addr[..whole]
        && (rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            net[whole] & mask == addr[whole] & mask
        })
}

impl FromStr for Cidrs {
    type Err = CidrError;

    /// A comma-separated list; empty is the empty set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || CidrError(item.to_string());
            let (addr, bits) = match item.split_once('/') {
                Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
                None => (item, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = bits.unwrap_or(max);
            if bits > max {
                return Err(bad());
            }
            out.push((addr, bits));
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalation_multiplies_up_to_the_longest_ban() {
        let p = Policy {
            ban_ms: 1_000,
            escalation_factor: 3,
            max_ban_ms: 20_000,
            ..Policy::default()
        };
        let lengths: Vec<u64> = (1..=5).map(|s| p.ban_for(s)).collect();
        assert_eq!(lengths, vec![1_000, 3_000, 9_000, 20_000, 20_000]);
        assert_eq!(
            Policy {
                escalation_factor: 1,
                ..p
            }
            .ban_for(9),
            1_000
        );
    }

    #[test]
    fn ipv6_addresses_stand_for_their_64_and_mapped_ipv4_for_itself() {
        let a = Subject::ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Subject::ip("2001:db8:1:2:ffff::9".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "ip:2001:db8:1:2::/64");
        assert_eq!(a.to_string().parse::<Subject>().unwrap(), a);
        let mapped = Subject::ip("::ffff:203.0.113.7".parse().unwrap());
        assert_eq!(mapped, Subject::ip("203.0.113.7".parse().unwrap()));
        assert_eq!(
            "key:team-a/acme".parse::<Subject>().unwrap().to_string(),
            "key:team-a/acme"
        );
        for bad in ["acme", "ip:300.1.1.1", "key:acme", "key:/x"] {
            assert!(bad.parse::<Subject>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_match_by_prefix() {
        let c: Cidrs = "10.0.0.0/8, 192.168.1.7,2001:db8::/33".parse().unwrap();
        for yes in ["10.200.3.4", "192.168.1.7", "::ffff:10.1.1.1", "2001:db8:7fff::1"] {
            assert!(c.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.168.1.8", "2001:db8:8000::1", "127.0.0.1"] {
            assert!(!c.contains(no.parse().unwrap()), "{no}");
        }
        assert!("".parse::<Cidrs>().unwrap().is_empty());
        for bad in ["10.0.0.0/33", "ten", "::/129", "1.2.3.4/x"] {
            assert_eq!(bad.parse::<Cidrs>(), Err(CidrError(bad.to_string())));
        }
    }

    #[test]
    fn shared_bans_read_back() {
        let s = Subject::Key("team-a/acme".into());
        let ban = Ban {
            reason: Reason::Refusals,
            started: 5,
            until: 10,
            strike: 2,
        };
        let text = encode_shared(&s, &ban, 1_700_000_000_000);
        assert_eq!(
            decode_shared(&text),
            Some((s, Reason::Refusals, 2, 1_700_000_000_000))
        );
        assert_eq!(decode_shared("nonsense"), None);
    }
}

//! `Enforced`, derived only from what the gateways report they enforce, never from the controller
//! having written configuration. Pure: the caller passes the reports and the clock.

use k8s_openapi::jiff::Timestamp;

use crate::api::ConditionSpec;

/// Condition type: the gateways enforce the object's current state.
pub const ENFORCED: &str = "Enforced";
/// Every live gateway replica enforces it.
pub const ALL_REPLICAS: &str = "AllReplicas";
/// Some live replica is behind.
pub const PENDING: &str = "Pending";
/// No gateway replica reports at all.
pub const NO_GATEWAYS: &str = "NoGateways";

/// One gateway replica's report, as read from its Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Replica name.
    pub replica: String,
    /// Configuration version it enforces (`None`: none yet).
    pub version: Option<u64>,
    /// Last renewal.
    pub renewed: Option<Timestamp>,
    /// Seconds after the last renewal that the report stays valid.
    pub ttl_seconds: i64,
}

/// How many live replicas enforce at least a given version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enforcement {
    /// Replicas whose report is fresh.
    pub live: u32,
    /// Of those, replicas enforcing the version asked about or a later one.
    pub enforcing: u32,
}

impl Report {
    /// Whether the replica renewed its report within the report's TTL at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.renewed
            .is_some_and(|t| now.as_second() - t.as_second() <= self.ttl_seconds)
    }
}

impl Enforcement {
    /// Counts the live reports enforcing `version` or later.
    pub fn of(reports: &[Report], version: u64, now: Timestamp) -> Self {
        let live: Vec<&Report> = reports.iter().filter(|r| r.is_live(now)).collect();
        Self {
            live: live.len() as u32,
            enforcing: live
                .iter()
                .filter(|r| r.version.is_some_and(|v| v >= version))
                .count() as u32,
        }
    }

    /// The `Enforced` condition of an object whose current state is in configuration `version`.
    pub fn condition(self, version: u64) -> ConditionSpec {
        let Self { live, enforcing } = self;
        if live == 0 {
            ConditionSpec::fail(
                ENFORCED,
                NO_GATEWAYS,
                "No gateway replica reports what it enforces: check that the gateway pods are running and can reach the API server.",
            )
        } else if enforcing == live {
            ConditionSpec::ok(
                ENFORCED,
                ALL_REPLICAS,
                format!("{enforcing}/{live} gateway replicas enforce configuration {version}."),
            )
        } else {
            ConditionSpec::fail(
                ENFORCED,
                PENDING,
                format!(
                    "{enforcing}/{live} gateway replicas enforce configuration {version}; the others are still applying it."
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: Option<u64>, renewed: i64) -> Report {
        Report {
            replica: "r".into(),
            version,
            renewed: Some(Timestamp::from_second(renewed).unwrap()),
            ttl_seconds: 15,
        }
    }

    #[test]
    fn enforced_counts_only_fresh_reports_and_names_the_version() {
        let now = Timestamp::from_second(1000).unwrap();
        let reports = [
            report(Some(42), 995),
            report(Some(41), 999),
            report(Some(40), 900),
        ];
        let e = Enforcement::of(&reports, 42, now);
        assert_eq!(
            e,
            Enforcement {
                live: 2,
                enforcing: 1
            }
        );
        let c = e.condition(42);
        assert_eq!((c.status, c.reason), (false, PENDING));
        assert!(
            c.message
                .starts_with("1/2 gateway replicas enforce configuration 42")
        );
        let all = Enforcement::of(&reports, 41, now).condition(41);
        assert_eq!((all.status, all.reason), (true, ALL_REPLICAS));
        let none = Enforcement::of(&[], 41, now).condition(41);
        assert_eq!(none.reason, NO_GATEWAYS);
    }
}

//! Conditions in the `metav1.Condition` shape, computed without a clock and stamped by the caller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition as pure code decides it: no timestamp, no generation. The shell that writes status
/// turns it into a [`Condition`] with [`merge_conditions`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConditionSpec {
    /// Condition type, such as `Ready`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// One CamelCase word a person (or an alert) can act on, such as `PlanNotFound`.
    pub reason: &'static str,
    /// A sentence that says what is wrong and what to do. Shared: 100,000 keys on one plan say
    /// the same about it.
    pub message: std::sync::Arc<str>,
}

impl ConditionSpec {
    /// A condition that holds.
    pub fn ok(type_: &'static str, reason: &'static str, message: impl Into<std::sync::Arc<str>>) -> Self {
        Self {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn fail(type_: &'static str, reason: &'static str, message: impl Into<std::sync::Arc<str>>) -> Self {
        Self {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }

    /// `True` or `False`, as a Condition's `status` is written.
    pub fn status_str(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }
}

/// Turns desired conditions into `metav1.Condition`s, keeping each existing `lastTransitionTime`
/// unless that condition's status flipped: a timestamp that moves on every reconcile would make
/// every status write a change and hide when the state really changed.
pub fn merge_conditions(
    existing: &[Condition],
    desired: &[ConditionSpec],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let previous = existing.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == d.status_str() => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_string(),
                status: d.status_str().to_string(),
                reason: d.reason.to_string(),
                message: d.message.to_string(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge_conditions(
            &[],
            &[ConditionSpec::ok("Ready", "Admitted", "ok")],
            Some(1),
            &at(10),
        );
        assert_eq!(first[0].last_transition_time, at(10));

        // Same status, new reason and message: the transition time stays.
        let same = merge_conditions(
            &first,
            &[ConditionSpec::ok("Ready", "Other", "still ok")],
            Some(2),
            &at(20),
        );
        assert_eq!(same[0].last_transition_time, at(10));
        assert_eq!(same[0].observed_generation, Some(2));
        assert_eq!(same[0].reason, "Other");

        let flipped = merge_conditions(
            &same,
            &[ConditionSpec::fail("Ready", "PlanNotFound", "no")],
            Some(3),
            &at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped[0].status, "False");
    }
}

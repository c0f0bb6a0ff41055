//! Leader election through a `coordination.k8s.io` Lease: the holder renews it; another replica
//! takes it over once it has not been renewed for its duration. Every write carries the
//! resourceVersion it read, so two candidates cannot both win: the loser gets a conflict.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{PostParams, entry::Entry},
};
use tokio::sync::watch;

/// Who competes for which Lease.
#[derive(Clone, Debug)]
pub struct Election {
    /// Lease name.
    pub lease: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a leader stays leader without renewing.
    pub duration: Duration,
}

/// Tries to take or renew the Lease once; returns whether this replica leads afterwards.
pub async fn try_lead(api: &Api<Lease>, e: &Election) -> kube::Result<bool> {
    let now = Timestamp::now();
    let secs = e.duration.as_secs().max(1) as i32;
    match api.entry(&e.lease).await? {
        Entry::Vacant(v) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(e.lease.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(e.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match v.insert(lease).commit(&PostParams::default()).await {
                Ok(()) => Ok(true),
                Err(kube::api::entry::CommitError::Save(kube::Error::Api(s))) if s.code == 409 => Ok(false),
                Err(kube::api::entry::CommitError::Save(e)) => Err(e),
                Err(kube::api::entry::CommitError::Validate(_)) => Ok(false),
            }
        }
        Entry::Occupied(mut o) => {
            let spec = o.get().spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let expired = spec.renew_time.as_ref().is_none_or(|t| {
                now.as_second() - t.0.as_second() > i64::from(spec.lease_duration_seconds.unwrap_or(secs))
            });
            if holder != e.identity && !expired {
                return Ok(false);
            }
            let s = o.get_mut().spec.get_or_insert_with(Default::default);
            if holder != e.identity {
                s.acquire_time = Some(MicroTime(now));
                s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
                s.holder_identity = Some(e.identity.clone());
            }
            s.renew_time = Some(MicroTime(now));
            s.lease_duration_seconds = Some(secs);
            match o.commit(&PostParams::default()).await {
                Ok(()) => Ok(true),
                // Someone else wrote first: they lead (or will); try again next round.
                Err(kube::api::entry::CommitError::Save(kube::Error::Api(s))) if s.code == 409 => Ok(false),
                Err(kube::api::entry::CommitError::Save(e)) => Err(e),
                Err(kube::api::entry::CommitError::Validate(_)) => Ok(false),
            }
        }
    }
}

/// Runs the election forever, publishing whether this replica leads. A leader that cannot renew
/// steps down before its Lease expires, so two leaders never overlap.
pub async fn run(api: Api<Lease>, e: Election, leading: watch::Sender<bool>) {
    let every = e.duration / 3;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let outcome = try_lead(&api, &e).await;
        let failing = outcome.is_err();
        match outcome {
            Ok(lead) => {
                if lead {
                    last_renewed = tokio::time::Instant::now();
                }
                // Only a change is sent: every send wakes the controller's loop, and a renewal
                // that changes nothing must not cost a full pass.
                leading.send_if_modified(|l| {
                    let changed = *l != lead;
                    if changed {
                        tracing::info!(identity = e.identity, leading = lead, "leadership changed");
                        *l = lead;
                    }
                    changed
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "leader election: cannot reach the Lease");
                if *leading.borrow() && last_renewed.elapsed() > e.duration * 2 / 3 {
                    tracing::warn!("stepping down: the Lease could not be renewed in time");
                    leading.send_replace(false);
                }
            }
        }
        // While the Lease cannot be reached, try again within a second: leadership (and with it
        // the next change) comes back as soon as the API server does.
        let delay = if failing {
            every.min(Duration::from_secs(1))
        } else {
            every
        };
        tokio::time::sleep(delay).await;
    }
}

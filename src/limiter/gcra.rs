//! GCRA (generic cell rate algorithm): an exact token bucket kept as one timestamp, whose state can
//! be read without consuming quota, so responses can report `Remaining` and an honest
//! `Retry-After`.

/// Rate and burst of a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateParams {
    /// Sustained requests per second (at least 1).
    pub per_second: u32,
    /// Requests a full bucket admits at once (at least 1).
    pub burst: u32,
}

impl RateParams {
    /// Emission interval and burst tolerance, in nanoseconds, for one division: on the request
    /// path the divisions are most of the arithmetic.
    fn spacing(self) -> (u64, u64) {
        let interval = 1_000_000_000 / u64::from(self.per_second.max(1));
        (interval, interval * u64::from(self.burst.max(1)))
    }
}

/// Why [`Gcra::admit_with`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateRefusal<E> {
    /// The bucket is empty; it admits one request after `retry_after_nanos`.
    Limited {
        /// Nanoseconds until the bucket admits one request.
        retry_after_nanos: u64,
    },
    /// The bucket had a token but the follow-up check (such as taking a slot) failed.
    Other(E),
}

/// One rate bucket. Not synchronised: the caller serialises access (one lock per key, or one
/// over a key's map of endpoint buckets), so a request takes one lock, not two.
#[derive(Clone, Copy, Debug)]
pub struct Gcra {
    /// Theoretical arrival time: the bucket is full again at `tat`.
    tat: u64,
    params: RateParams,
}

impl Gcra {
    /// A full bucket.
    pub fn new(params: RateParams) -> Self {
        Self { tat: 0, params }
    }

    /// Whether the bucket is full at `now`: an idle bucket is indistinguishable from a new one, so
    /// it can be dropped without losing anything.
    pub fn is_idle(&self, now: u64) -> bool {
        self.tat <= now
    }

    /// Reads the bucket without consuming: requests it would admit now.
    pub fn remaining(&mut self, now: u64, params: RateParams) -> u32 {
        self.rescale(now, params);
        let (t, tau) = params.spacing();
        remaining_at(self.tat.max(now), now, t, tau, params.burst)
    }

    /// Admits one request if the bucket has a token *and* `then` succeeds; only then is the token
    /// consumed, so a request refused for another reason (no free slot) costs no quota. On success
    /// also returns the requests the bucket still admits at once.
    pub fn admit_with<T, E>(
        &mut self,
        now: u64,
        params: RateParams,
        then: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, u32), RateRefusal<E>> {
        self.rescale(now, params);
        let (t, tau) = params.spacing();
        let next = self.tat.max(now) + t;
        if next > now + tau {
            return Err(RateRefusal::Limited {
                retry_after_nanos: next - tau - now,
            });
        }
        let value = then().map_err(RateRefusal::Other)?;
        self.tat = next;
        Ok((value, remaining_at(next, now, t, tau, params.burst)))
    }

    /// A plan change keeps the fraction of the burst already used: neither a fresh full bucket nor
    /// the old plan's remaining count.
    fn rescale(&mut self, now: u64, params: RateParams) {
        if self.params == params {
            return;
        }
        let used = self.tat.saturating_sub(now) as f64 / self.params.spacing().1 as f64;
        self.tat = now + (used.min(1.0) * params.spacing().1 as f64) as u64;
        self.params = params;
    }
}

fn remaining_at(tat: u64, now: u64, interval: u64, tau: u64, burst: u32) -> u32 {
    let free = (now + tau).saturating_sub(tat);
    (free / interval).min(u64::from(burst)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[derive(Debug, PartialEq, Eq)]
    enum RateDecision {
        Allowed { remaining: u32 },
        Limited { retry_after_nanos: u64 },
    }
    const P: RateParams = RateParams {
        per_second: 10,
        burst: 5,
    };

    fn take(b: &mut Gcra, now: u64, p: RateParams) -> RateDecision {
        match b.admit_with(now, p, || Ok::<_, ()>(())) {
            Ok(((), remaining)) => RateDecision::Allowed { remaining },
            Err(RateRefusal::Limited { retry_after_nanos }) => RateDecision::Limited { retry_after_nanos },
            Err(RateRefusal::Other(())) => unreachable!(),
        }
    }

    #[test]
    fn burst_then_the_sustained_rate() {
        let mut b = Gcra::new(P);
        let now = 10 * SEC;
        for expected in (0..5).rev() {
            assert_eq!(
                take(&mut b, now, P),
                RateDecision::Allowed { remaining: expected }
            );
        }
        assert_eq!(
            take(&mut b, now, P),
            RateDecision::Limited {
                retry_after_nanos: SEC / 10
            }
        );
        assert_eq!(b.remaining(now, P), 0);
        // One interval later, exactly one more.
        assert!(matches!(
            take(&mut b, now + SEC / 10, P),
            RateDecision::Allowed { remaining: 0 }
        ));
        assert!(matches!(
            take(&mut b, now + SEC / 10, P),
            RateDecision::Limited { .. }
        ));
        assert!(b.is_idle(now + 2 * SEC));
    }

    #[test]
    fn a_refusal_for_another_reason_costs_no_quota() {
        let mut b = Gcra::new(P);
        for _ in 0..100 {
            assert!(matches!(
                b.admit_with(SEC, P, || Err::<(), _>("no slot")),
                Err(RateRefusal::Other("no slot"))
            ));
        }
        assert_eq!(b.remaining(SEC, P), 5);
    }

    #[test]
    fn a_plan_change_rescales_the_used_fraction() {
        let mut b = Gcra::new(P);
        let now = 10 * SEC;
        for _ in 0..3 {
            take(&mut b, now, P);
        }
        assert_eq!(b.remaining(now, P), 2);
        // Upgrade to burst 50: 60% used stays 60% used, so 20 remain (not 50, not 2).
        let up = RateParams {
            per_second: 100,
            burst: 50,
        };
        assert_eq!(b.remaining(now, up), 20);
    }
}

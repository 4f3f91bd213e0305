//! Leader election on a `coordination.k8s.io/v1` Lease: one replica acts, another takes over
//! within `duration` after the leader stops renewing (at once if it released the lease).
//!
//! No two clocks are compared: a standby judges expiry by how long *it* has seen the same
//! lease (its resourceVersion unchanged, on its own monotonic clock), as client-go does, so
//! a leader whose wall clock runs behind is not deposed early, nor one whose clock runs ahead
//! kept for ever. Every write replaces the object read, resourceVersion included, so of two
//! replicas racing only one wins; the other gets a conflict and stands by.

use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's lease as last seen: its resourceVersion, and since when (ours).
    seen: parking_lot::Mutex<Option<(String, Instant)>>,
}

/// Whether a standby may take a lease that another replica holds: only once it has seen the
/// same version of it, unrenewed, for longer than the lease lasts. A released lease (no
/// holder) is free at once.
pub fn may_take(holder_empty: bool, unchanged_for: Duration, duration: Duration) -> bool {
    holder_empty || unchanged_for > duration
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            seen: parking_lot::Mutex::new(None),
        }
    }

    fn spec(&self, now: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Takes or renews the lease; `Ok(true)` while we hold it. A conflict (someone else
    /// wrote first) is `Ok(false)`, not an error.
    pub async fn acquire_or_renew(&self) -> anyhow::Result<bool> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .context("reading the lease")?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e).context("creating the lease"),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours {
            let version = lease.metadata.resource_version.clone().unwrap_or_default();
            let unchanged_for = {
                let mut seen = self.seen.lock();
                match seen.as_ref() {
                    Some((v, since)) if *v == version => since.elapsed(),
                    _ => {
                        *seen = Some((version, Instant::now()));
                        Duration::ZERO
                    }
                }
            };
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
            )
            .max(self.duration);
            if !may_take(holder.is_empty(), unchanged_for, duration) {
                return Ok(false);
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, transitions, acquired));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e).context("renewing the lease"),
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&self) -> anyhow::Result<()> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                    spec.holder_identity = None;
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_takes_only_a_released_lease_or_one_it_saw_unrenewed_for_its_duration() {
        let d = Duration::from_secs(10);
        // (holder empty, unchanged for (s), may take)
        let cases = [
            (true, 0, true),
            (false, 0, false),
            (false, 9, false),
            (false, 10, false),
            (false, 11, true),
        ];
        for (empty, secs, want) in cases {
            assert_eq!(
                may_take(empty, Duration::from_secs(secs), d),
                want,
                "holder empty {empty}, unchanged for {secs}s"
            );
        }
    }
}

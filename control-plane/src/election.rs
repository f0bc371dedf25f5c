//! Leader election for singleton workers (the outbox relay, the CDN
//! prober, …): of all candidates campaigning for a name, one leads at a time,
//! under a lease; when it dies its lease expires and another takes over; when
//! it resigns the next takes over at once.
//!
//! The mechanism is a key per name (`/weir/v1/election/{name}` in etcd),
//! created only while absent and bound to the leader's lease. Candidates
//! that lose look at the key every [`POLL`] and try again once it is gone.
//! A leader that cannot refresh its lease for 60% of the lease's TTL steps
//! down by itself (each refresh is bounded to a quarter of the TTL, so this
//! happens before 85% of the TTL has passed): after the TTL another
//! candidate may be elected, and two leaders must never both believe they
//! lead.
//!
//! [`ElectionBackend`] is the small set of lease and key operations this
//! needs; both coordinators implement it ([`crate::LocalCoordinator`] for one
//! process, [`crate::EtcdCoordinator`] for clusters), and [`campaign`] runs
//! the same loop over either.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use weir_protocol::coordinator::{CoordError, LeaseId};

/// How often a follower looks whether the leader is gone.
pub const POLL: Duration = Duration::from_millis(250);
/// The election `weir control` replicas campaign in; its leader runs the
/// singleton workers.
pub const CONTROL_ELECTION: &str = "control";
/// The default lease of a candidate.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Lease and key operations an election needs from a coordinator.
#[async_trait]
pub trait ElectionBackend: Send + Sync + 'static {
    /// A new lease of `ttl` bound to nothing yet.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, CoordError>;
    /// Refreshes the lease (`LeaseExpired` when it is gone).
    async fn refresh_lease(&self, lease: LeaseId) -> Result<(), CoordError>;
    /// Revokes the lease and everything bound to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), CoordError>;
    /// Makes `candidate` the leader of `name` unless someone else is; returns the leader.
    async fn try_lead(
        &self,
        name: &str,
        candidate: &str,
        lease: LeaseId,
    ) -> Result<String, CoordError>;
    /// The leader of `name`, if any.
    async fn leader(&self, name: &str) -> Result<Option<String>, CoordError>;
    /// Gives up `name` if `candidate` leads it.
    async fn resign(&self, name: &str, candidate: &str) -> Result<(), CoordError>;
}

/// What a candidate knows of its election.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderState {
    /// The leader as last seen (`None`: none, or unknown).
    pub leader: Option<String>,
    /// Whether this candidate leads now.
    pub is_leader: bool,
}

/// One candidate's campaign, running until [`Candidacy::resign`] or drop.
#[derive(Debug)]
pub struct Candidacy {
    name: String,
    candidate: String,
    state: watch::Receiver<LeaderState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Candidacy {
    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().is_leader
    }

    /// The leader as last seen.
    pub fn leader(&self) -> Option<String> {
        self.state.borrow().leader.clone()
    }

    /// Leader changes as they are seen (a `watch`: the latest state wins).
    pub fn changes(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This candidate's id.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// Waits until this candidate leads.
    pub async fn elected(&mut self) {
        let _ = self.state.wait_for(|s| s.is_leader).await;
    }

    /// Stops campaigning; a leader gives the name up at once (the key is
    /// deleted and the lease revoked) so the next candidate takes over
    /// without waiting for the lease to expire.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        // Dropped without resigning: stop the loop; the lease expires.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Campaigns for `name` as `candidate` with a lease of `ttl` (at least 2 s:
/// etcd's smallest) in a background task; see the module docs.
pub fn campaign(
    backend: Arc<dyn ElectionBackend>,
    name: &str,
    candidate: &str,
    ttl: Duration,
) -> Candidacy {
    let (tx, rx) = watch::channel(LeaderState::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(run(
        backend,
        name.to_owned(),
        candidate.to_owned(),
        ttl.max(Duration::from_secs(2)),
        tx,
        stop_rx,
    ));
    Candidacy {
        name: name.to_owned(),
        candidate: candidate.to_owned(),
        state: rx,
        stop: Some(stop_tx),
        task: Some(task),
    }
}

fn publish(tx: &watch::Sender<LeaderState>, name: &str, state: LeaderState) {
    tx.send_if_modified(|current| {
        if *current == state {
            return false;
        }
        if state.is_leader != current.is_leader {
            tracing::info!(election = name, leader = ?state.leader, is_leader = state.is_leader, "leadership changed");
            metrics::gauge!("weir_election_leader", "election" => name.to_owned())
                .set(if state.is_leader { 1.0 } else { 0.0 });
        }
        *current = state;
        true
    });
}

async fn run(
    backend: Arc<dyn ElectionBackend>,
    name: String,
    candidate: String,
    ttl: Duration,
    tx: watch::Sender<LeaderState>,
    mut stop: oneshot::Receiver<()>,
) {
    // Step down when the lease could not be refreshed for this long.
    let step_down_after = ttl.mul_f64(0.6);
    let refresh_every = ttl / 4;
    let mut lease: Option<(LeaseId, Instant)> = None;
    loop {
        let tick = match lease {
            None => match backend.grant_lease(ttl).await {
                Ok(l) => {
                    lease = Some((l, Instant::now()));
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::debug!(election = %name, error = %e, "cannot get a lease");
                    publish(&tx, &name, LeaderState::default());
                    POLL
                }
            },
            Some((l, last_ok)) => {
                let leading = tx.borrow().is_leader;
                if leading {
                    // Bounded, so a hanging call cannot delay the step-down
                    // past the TTL: at worst 0.6 + 0.25 of it.
                    let refreshed = tokio::time::timeout(refresh_every, backend.refresh_lease(l))
                        .await
                        .unwrap_or_else(|_| {
                            Err(CoordError::Unavailable("lease refresh timed out".into()))
                        });
                    match refreshed {
                        Ok(()) => {
                            lease = Some((l, Instant::now()));
                            // Still ours? (Someone may have removed the key by hand.)
                            if let Ok(leader) = backend.try_lead(&name, &candidate, l).await {
                                let is_leader = leader == candidate;
                                publish(
                                    &tx,
                                    &name,
                                    LeaderState {
                                        leader: Some(leader),
                                        is_leader,
                                    },
                                );
                            }
                        }
                        Err(CoordError::LeaseExpired(_)) => {
                            lease = None;
                            publish(&tx, &name, LeaderState::default());
                        }
                        Err(e) => {
                            if last_ok.elapsed() >= step_down_after {
                                tracing::warn!(election = %name, error = %e, "cannot refresh the leader's lease; stepping down");
                                lease = None;
                                publish(&tx, &name, LeaderState::default());
                            }
                        }
                    }
                    refresh_every
                } else {
                    // Keep the lease alive while waiting, then try.
                    let refreshed = if last_ok.elapsed() >= refresh_every {
                        backend.refresh_lease(l).await
                    } else {
                        Ok(())
                    };
                    match refreshed {
                        Err(CoordError::LeaseExpired(_)) => lease = None,
                        Err(_) => {}
                        Ok(()) => {
                            if last_ok.elapsed() >= refresh_every {
                                lease = Some((l, Instant::now()));
                            }
                            match backend.try_lead(&name, &candidate, l).await {
                                Ok(leader) => {
                                    let is_leader = leader == candidate;
                                    publish(
                                        &tx,
                                        &name,
                                        LeaderState {
                                            leader: Some(leader),
                                            is_leader,
                                        },
                                    );
                                }
                                Err(CoordError::LeaseExpired(_)) => lease = None,
                                Err(e) => {
                                    tracing::debug!(election = %name, error = %e, "campaign attempt failed");
                                }
                            }
                        }
                    }
                    POLL
                }
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    // Resigning: give the name up and the lease back.
    if tx.borrow().is_leader
        && let Err(e) = backend.resign(&name, &candidate).await
    {
        tracing::warn!(election = %name, error = %e, "could not resign; the lease will expire");
    }
    if let Some((l, _)) = lease {
        let _ = backend.revoke_lease(l).await;
    }
    publish(&tx, &name, LeaderState::default());
}

/// A candidate id for this process: host name (if known) and process id.
pub fn default_candidate_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}-{}", std::process::id())
}

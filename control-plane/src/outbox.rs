//! The outbox relay: publishes every paid gift's event to the room bus
//! until the broker acknowledges it, then marks its outbox row published.
//!
//! It runs on one replica at a time, the leader of the control plane's
//! election (see [`crate::workers`]). It reads pending rows oldest first and
//! publishes them in that order, stopping at the first failure so a room's
//! gifts are never reordered, and marks the acknowledged ones of a pass in
//! one statement; while the bus is down it retries with a
//! backoff (from [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]). It polls every
//! [`POLL_EVERY`] and is woken at once when this replica commits a gift.
//!
//! Each event carries the gift id as its message id (`Nats-Msg-Id` on
//! JetStream), so a publish repeated after a lost ack, a crash between the
//! ack and the mark, or two leaders overlapping during a hand-over is
//! dropped by the broker within its duplicate window; consumers drop any
//! later copy by the gift id. So a gift is shown if and only if it was paid,
//! exactly once.
//!
//! Metrics: `weir_outbox_pending` (rows waiting), `weir_outbox_published_total`,
//! `weir_outbox_publish_errors_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use weir_protocol::bus::{BusError, BusPublisher};

use crate::store::{Store, StoreError};

/// How often the relay looks for pending rows when nothing wakes it.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// Rows read per pass.
pub const BATCH: u32 = 100;
/// First wait after a failed pass.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between failed passes.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest wait for one publish, whatever the bus (the NATS publisher
/// bounds its own calls more tightly).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay pass stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The bus did not take an event; it stays pending.
    #[error("publishing gift {gift_id}: {error}")]
    Bus { gift_id: String, error: BusError },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayPass {
    /// Rows published and marked.
    pub published: usize,
    /// Of those, how many the broker had already (acked as duplicates).
    pub duplicates: usize,
    /// Whether the pass read a full batch (more may be waiting).
    pub full_batch: bool,
}

/// Publishes up to [`BATCH`] pending rows, oldest first, stopping at the
/// first one the bus does not take.
pub async fn relay_pass(store: &Store, bus: &dyn BusPublisher) -> Result<RelayPass, RelayError> {
    let rows = store.pending_outbox(BATCH).await?;
    let mut pass = RelayPass {
        full_batch: rows.len() >= BATCH as usize,
        ..RelayPass::default()
    };
    // Marked together once the pass ends (or stops at a failure): one
    // commit per batch instead of one per event, which under a stream of
    // gifts is what lets the relay keep up. A crash before the mark
    // re-publishes the batch, and the broker drops the copies by gift id.
    let mut acked = Vec::with_capacity(rows.len());
    for row in rows {
        let published = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            bus.publish(&row.room, &row.event, Some(&row.gift_id)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BusError::Unavailable(format!(
                "no acknowledgement within {PUBLISH_TIMEOUT:?}"
            )))
        });
        match published {
            Ok(ack) => {
                acked.push(row.id);
                metrics::counter!("weir_outbox_published_total").increment(1);
                pass.published += 1;
                if ack.duplicate {
                    pass.duplicates += 1;
                }
                tracing::debug!(
                    gift_id = %row.gift_id,
                    room = %row.room,
                    offset = ack.offset,
                    duplicate = ack.duplicate,
                    "gift event published"
                );
            }
            Err(error) => {
                metrics::counter!("weir_outbox_publish_errors_total").increment(1);
                store.mark_outbox_published_all(&acked).await?;
                if let Err(e) = store
                    .record_outbox_failure(&row.id, &error.to_string())
                    .await
                {
                    tracing::debug!(error = %e, "cannot record the failed publish");
                }
                return Err(RelayError::Bus {
                    gift_id: row.gift_id,
                    error,
                });
            }
        }
    }
    store.mark_outbox_published_all(&acked).await?;
    Ok(pass)
}

async fn update_pending_gauge(store: &Store) {
    if let Ok(n) = store.outbox_pending_count().await {
        // A gauge is an f64; counts this large are not expected.
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("weir_outbox_pending").set(n as f64);
    }
}

/// Logged once per process: a control plane without a bus keeps gifts in the outbox.
static WARNED_NO_BUS: AtomicBool = AtomicBool::new(false);

/// Runs the relay forever (until the future is dropped, as the workers do
/// when leadership is lost). Without a bus, rows stay pending, the gauge
/// still counts them, and a warning is logged once.
pub async fn relay(store: Store, bus: Option<Arc<dyn BusPublisher>>, wake: Arc<Notify>) {
    let Some(bus) = bus else {
        if !WARNED_NO_BUS.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "no room bus configured (`weir control --nats URL`): paid gifts stay in the outbox \
                 and are not shown in rooms until a control plane with a bus publishes them"
            );
        }
        loop {
            update_pending_gauge(&store).await;
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    tracing::info!("outbox relay running");
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let result = relay_pass(&store, bus.as_ref()).await;
        update_pending_gauge(&store).await;
        match result {
            Ok(pass) => {
                if failing {
                    tracing::info!("outbox relay: the room bus takes events again");
                    failing = false;
                }
                backoff = BACKOFF_MIN;
                if pass.published > 0 {
                    tracing::debug!(
                        published = pass.published,
                        duplicates = pass.duplicates,
                        "outbox relay pass"
                    );
                }
                if pass.full_batch {
                    continue;
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(POLL_EVERY) => {}
                }
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, retry_in = ?backoff, "outbox relay still failing");
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay: publishing failed; retrying with backoff");
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

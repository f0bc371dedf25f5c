//! Like totals that survive the bus's retention and node deaths: every few
//! seconds the node sends the control plane ONE batch for the rooms it
//! carries (`POST /v1/room-stats/likes`, `weir_protocol::stats`), and shows
//! `stored total + the likes events it holds after the stored offset`.
//!
//! The stored row of a room says "`likes` counted through bus offset `X` of
//! epoch `E`". Every node carrying the room sees the same likes events in the
//! same order, so a node that holds every likes event after `X` claims the
//! range `(X, its newest offset]` with a compare-and-set on `(E, X)`: one
//! node wins each range, the others read where the row went, and no like is
//! counted twice. A node that does not hold everything after `X` (it opened
//! the room later) leaves the range to nodes that do; when the bus itself no
//! longer holds the event at `X` (retention) and the row has not moved for a
//! whole round, nobody can count what came between, and the node **rebases**
//! the row past it (counted in `weir_room_likes_rebased_total`). A row of an
//! older epoch (the bus was re-created) is rebased to the current one,
//! keeping its likes. Offsets stored are always offsets of real events of the
//! room, so "does the bus still hold `X`" is one exact question. Epochs only
//! move forward (a bus's epoch is its creation time): a node still on an
//! older bus never moves a row back.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use weir_protocol::stats::{
    LIKES_PATH, LikesBatchAnswer, LikesBatchRequest, LikesClaim, LikesMark, NodeSecret,
};

/// Longest wait for one batch.
pub const PERSIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most rooms in one batch (the control plane's limit).
pub const PERSIST_BATCH: usize = 1000;
/// Likes events a room's ledger holds before it forgets the oldest (which
/// then only nodes that still hold them can count).
pub const MAX_LEDGER: usize = 100_000;

/// Where like totals are persisted: the control plane.
#[async_trait]
pub trait LikeTotals: Send + Sync {
    /// Applies a batch of claims and reads (at most [`PERSIST_BATCH`] rooms).
    async fn batch(&self, request: &LikesBatchRequest) -> Result<LikesBatchAnswer, String>;
}

/// [`LikeTotals`] over the control plane's JSON gateway, with the node secret.
pub struct HttpLikeTotals {
    control: super::control::ControlClient,
}

impl HttpLikeTotals {
    /// Persists through the control plane at `control_url` (`http://…`).
    pub fn new(control_url: &str, secret: NodeSecret) -> Self {
        Self {
            control: super::control::ControlClient::new(control_url, Some(secret), PERSIST_TIMEOUT),
        }
    }
}

#[async_trait]
impl LikeTotals for HttpLikeTotals {
    async fn batch(&self, request: &LikesBatchRequest) -> Result<LikesBatchAnswer, String> {
        self.control.post_json(LIKES_PATH, request).await
    }
}

/// A stored row as the node last read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub likes: u64,
    pub mark: LikesMark,
}

/// What a room's ledger asks of the next batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Only read the row.
    Read,
    /// Claim a range (or create the row, or move it to this epoch).
    Claim {
        claim: LikesClaim,
        rebase: Option<&'static str>,
    },
    /// The node cannot count what comes right after the row's offset: if
    /// the bus no longer holds that event and the row has not moved since
    /// the last round, rebase with `claim`; else read.
    RebaseIfGone { after: u64, claim: LikesClaim },
}

/// A room's likes events as this node holds them, and the stored row.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Likes events taken in, oldest first: (offset, delta).
    deltas: VecDeque<(u64, u64)>,
    /// Every likes event with an offset above this is in `deltas`; `None`
    /// until the first event after a (re)load sets it to its offset - 1
    /// (what came before may be gone).
    complete_after: Option<u64>,
    /// Likes forgotten to [`MAX_LEDGER`] while no row was known (shown
    /// until one is).
    forgotten: u64,
    /// The row as last read; `read` says whether it was read at all.
    stored: Option<Stored>,
    read: bool,
    /// The row as the previous round found it while this node could not
    /// count after it (a rebase waits for it to stay put a whole round).
    stuck: Option<LikesMark>,
}

impl Ledger {
    /// Takes a bus event in (any kind: the first one after a reload fixes
    /// where the ledger is complete from); `likes` is its delta when it is
    /// a likes event.
    pub(crate) fn take(&mut self, offset: u64, likes: Option<u64>) {
        if self.complete_after.is_none() {
            self.complete_after = Some(offset.saturating_sub(1));
        }
        if let Some(delta) = likes {
            self.deltas.push_back((offset, delta));
            if self.deltas.len() > MAX_LEDGER
                && let Some((old, d)) = self.deltas.pop_front()
            {
                self.complete_after = Some(old);
                if self.stored.is_none() {
                    self.forgotten += d;
                }
            }
        }
    }

    /// The node's log lost contiguity (a gap, a new epoch): what it holds
    /// no longer counts for ranges.
    pub(crate) fn reset(&mut self) {
        self.deltas.clear();
        self.complete_after = None;
        self.forgotten = 0;
        self.stuck = None;
    }

    fn held_after(&self, after: u64) -> u64 {
        self.deltas
            .iter()
            .filter(|(o, _)| *o > after)
            .map(|(_, d)| d)
            .sum()
    }

    /// The room's like total as this node knows it (without likes not yet
    /// published).
    pub(crate) fn total(&self, epoch: u64) -> u64 {
        match self.stored {
            Some(s) if s.mark.epoch == epoch => s.likes + self.held_after(s.mark.through),
            // The next batch moves the row to this epoch with what is held.
            Some(s) if s.mark.epoch < epoch => s.likes + self.held_after(0),
            Some(s) => s.likes,
            None => self.forgotten + self.held_after(0),
        }
    }

    /// What the next batch should do for this room, whose log (of `epoch`)
    /// ends at `last_offset`.
    pub(crate) fn plan(&self, room: &str, epoch: u64, last_offset: u64) -> Plan {
        let Some(complete_after) = self.complete_after else {
            return Plan::Read;
        };
        if !self.read || epoch == 0 || last_offset == 0 {
            return Plan::Read;
        }
        let to = LikesMark {
            epoch,
            through: last_offset,
        };
        let claim = |expect: Option<LikesMark>, add: u64| LikesClaim {
            room: room.to_owned(),
            expect,
            to,
            add,
        };
        let Some(s) = self.stored else {
            // No row yet: everything this node holds starts it (whatever
            // was on the bus before its log began is not counted).
            return Plan::Claim {
                claim: claim(None, self.held_after(complete_after)),
                rebase: None,
            };
        };
        if s.mark.epoch > epoch {
            // A newer bus than this node's (it has not noticed yet): moving
            // the row back would count ranges twice.
            return Plan::Read;
        }
        if s.mark.epoch < epoch {
            return Plan::Claim {
                claim: claim(Some(s.mark), self.held_after(complete_after)),
                rebase: Some("epoch"),
            };
        }
        if s.mark.through >= last_offset {
            return Plan::Read;
        }
        if s.mark.through >= complete_after {
            let add = self.held_after(s.mark.through);
            return if add == 0 {
                // Nothing to count: chat and online events do not move it.
                Plan::Read
            } else {
                Plan::Claim {
                    claim: claim(Some(s.mark), add),
                    rebase: None,
                }
            };
        }
        Plan::RebaseIfGone {
            after: s.mark.through,
            claim: claim(Some(s.mark), self.held_after(complete_after)),
        }
    }

    /// Whether a rebase past `mark` may go ahead: the row stood there at
    /// the previous round too. Remembers `mark` for the next round.
    pub(crate) fn stuck_since_last_round(&mut self, mark: LikesMark) -> bool {
        let stuck = self.stuck == Some(mark);
        self.stuck = Some(mark);
        stuck
    }

    /// The row as the control plane answered it (`None`: no row); forgets
    /// the likes events it covers.
    pub(crate) fn stored(&mut self, row: Option<Stored>, epoch: u64) {
        self.read = true;
        self.stored = row;
        if let Some(s) = row {
            self.forgotten = 0;
            if s.mark.epoch == epoch {
                while self
                    .deltas
                    .front()
                    .is_some_and(|(o, _)| *o <= s.mark.through)
                {
                    self.deltas.pop_front();
                }
                if self.stuck.is_some_and(|m| m != s.mark) {
                    self.stuck = None;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mark(epoch: u64, through: u64) -> LikesMark {
        LikesMark { epoch, through }
    }

    fn stored(likes: u64, epoch: u64, through: u64) -> Option<Stored> {
        Some(Stored {
            likes,
            mark: mark(epoch, through),
        })
    }

    fn claimed(plan: Plan) -> (Option<LikesMark>, LikesMark, u64) {
        match plan {
            Plan::Claim { claim, .. } | Plan::RebaseIfGone { claim, .. } => {
                (claim.expect, claim.to, claim.add)
            }
            Plan::Read => panic!("read only"),
        }
    }

    /// A ledger that took events 10..=20 (likes of 2 at the even ones).
    fn ledger() -> Ledger {
        let mut l = Ledger::default();
        for o in 10..=20 {
            l.take(o, (o % 2 == 0).then_some(2));
        }
        l
    }

    #[test]
    fn a_room_without_a_row_is_started_with_what_the_node_holds() {
        let mut l = ledger();
        assert_eq!(l.plan("r", 7, 20), Plan::Read, "the row was never read");
        l.stored(None, 7);
        assert_eq!(l.total(7), 12);
        assert_eq!(claimed(l.plan("r", 7, 20)), (None, mark(7, 20), 12));
    }

    #[test]
    fn a_node_counts_after_the_row_when_it_holds_everything_after_it() {
        let mut l = ledger();
        l.stored(stored(100, 7, 14), 7);
        assert_eq!(l.total(7), 106, "100 stored + 16, 18, 20");
        assert_eq!(
            claimed(l.plan("r", 7, 20)),
            (Some(mark(7, 14)), mark(7, 20), 6)
        );
        // Another node won: the row moved past what this node has seen.
        l.stored(stored(106, 7, 21), 7);
        assert_eq!(l.total(7), 106, "nothing counted twice");
        assert_eq!(l.plan("r", 7, 20), Plan::Read);
        l.take(22, Some(5));
        assert_eq!(l.total(7), 111);
        assert_eq!(
            claimed(l.plan("r", 7, 22)),
            (Some(mark(7, 21)), mark(7, 22), 5)
        );
        // Only chat since the row: nothing to write.
        l.stored(stored(111, 7, 22), 7);
        l.take(23, None);
        assert_eq!(l.plan("r", 7, 23), Plan::Read);
    }

    #[test]
    fn a_node_that_opened_the_room_late_waits_then_rebases() {
        let mut l = ledger(); // complete after 9
        l.stored(stored(50, 7, 4), 7);
        assert_eq!(l.total(7), 62, "shown: stored plus what it holds");
        match l.plan("r", 7, 20) {
            Plan::RebaseIfGone { after, claim } => {
                assert_eq!(after, 4);
                assert_eq!(
                    (claim.expect, claim.to, claim.add),
                    (Some(mark(7, 4)), mark(7, 20), 12)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(!l.stuck_since_last_round(mark(7, 4)), "first sight");
        assert!(l.stuck_since_last_round(mark(7, 4)), "a round later");
        // Had the row moved meanwhile, it starts over.
        l.stored(stored(55, 7, 9), 7);
        assert!(!l.stuck_since_last_round(mark(7, 9)));
    }

    #[test]
    fn a_row_of_another_epoch_moves_to_this_one_keeping_its_likes() {
        let mut l = ledger();
        l.stored(stored(40, 3, 900), 7);
        assert_eq!(l.total(7), 52);
        match l.plan("r", 7, 20) {
            Plan::Claim { claim, rebase } => {
                assert_eq!(rebase, Some("epoch"));
                assert_eq!(
                    (claim.expect, claim.to, claim.add),
                    (Some(mark(3, 900)), mark(7, 20), 12)
                );
            }
            other => panic!("{other:?}"),
        }
        // Never backwards: a node on an older bus leaves a newer row alone.
        l.stored(stored(40, 9, 3), 7);
        assert_eq!(l.plan("r", 7, 20), Plan::Read);
        assert_eq!(l.total(7), 40);
    }

    #[test]
    fn after_a_gap_only_what_follows_counts() {
        let mut l = ledger();
        l.stored(stored(0, 7, 12), 7);
        l.reset();
        assert_eq!(
            l.plan("r", 7, 20),
            Plan::Read,
            "nothing held after the gap yet"
        );
        l.take(30, Some(1));
        assert!(matches!(
            l.plan("r", 7, 30),
            Plan::RebaseIfGone { after: 12, .. }
        ));
    }
}

//! Placement as a pure function: from a snapshot of the cluster (nodes with
//! their last load reports, room origins, the time) to a ranked list of nodes
//! for a viewer or a publisher of a room. No I/O, no clock: the caller reads
//! the coordinator and passes the snapshot in, so the rules are tested alone.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use weir_protocol::coordinator::{NodeFlags, NodeInfo};
use weir_protocol::{NodeId, RoomId};

use crate::rollout::RolloutWeights;

/// A load report older than this marks its node as unhealthy (the default of
/// the `scheduler.report_max_age_ms` config key).
pub const FRESH_REPORT_MS: u64 = 3_000;

/// What the scheduler decides from.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// Nodes whose lease is alive, with their last report.
    pub nodes: &'a [NodeInfo],
    /// Origin node of each placed room, sorted by room (looked up by binary search).
    pub origins: &'a [(RoomId, NodeId)],
    /// The operator's flags (cordoned or draining nodes get no new sessions).
    pub flags: &'a BTreeMap<NodeId, NodeFlags>,
    /// The time the snapshot is judged at, Unix milliseconds.
    pub now_ms: u64,
    /// Reports older than this make a node unhealthy.
    pub report_max_age_ms: u64,
    /// Share of a node's capacity to fill, in thousandths (1000: all of it).
    pub max_load_permille: u32,
    /// Weights per node version (empty: versions play no part).
    pub rollout: &'a RolloutWeights,
    /// Where this assignment falls on the rollout wheel (see
    /// [`crate::rollout`]): hashed from the client's id, or random.
    pub draw: u64,
}

/// No flags: what a snapshot without operator flags points at.
static NO_FLAGS: BTreeMap<NodeId, NodeFlags> = BTreeMap::new();
/// No rollout weights.
static NO_WEIGHTS: RolloutWeights = RolloutWeights::EMPTY;

impl<'a> Snapshot<'a> {
    /// A snapshot with no operator flags and the default limits.
    pub fn new(nodes: &'a [NodeInfo], origins: &'a [(RoomId, NodeId)], now_ms: u64) -> Self {
        Self {
            nodes,
            origins,
            flags: &NO_FLAGS,
            now_ms,
            report_max_age_ms: FRESH_REPORT_MS,
            max_load_permille: 1000,
            rollout: &NO_WEIGHTS,
            draw: 0,
        }
    }

    /// Whether the node reported recently, is not draining by itself, and is
    /// not cordoned or drained by the operator.
    pub fn is_healthy(&self, node: &NodeInfo) -> bool {
        // A report from too far in the future (clock skew) is no better than
        // an old one.
        !node.draining
            && !self.flags.get(&node.id).is_some_and(NodeFlags::excludes)
            && self.now_ms.abs_diff(node.load.reported_at_ms) <= self.report_max_age_ms
    }

    /// Whether the node has room for one more session under the load cap.
    fn has_room(&self, node: &NodeInfo) -> bool {
        // sessions < capacity * permille / 1000, exactly.
        u64::from(node.load.sessions) * 1000
            < u64::from(node.capacity) * u64::from(self.max_load_permille)
    }

    /// The room's origin, when it is a healthy node.
    fn live_origin(&self, room: &RoomId) -> Option<&'a NodeInfo> {
        let at = self.origins.binary_search_by(|(r, _)| r.cmp(room)).ok()?;
        let (_, origin) = &self.origins[at];
        self.nodes
            .iter()
            .find(|n| &n.id == origin)
            .filter(|n| self.is_healthy(n))
    }

    /// Healthy nodes with room for one more session, best first, honouring
    /// the rollout weights: the nodes of the version the draw picks (by
    /// weight, among the versions with such a node) come first, then those
    /// of the other versions with a weight above 0; versions of weight 0 are
    /// left out. Within a version, [`Snapshot::ranked_nodes`] decides. When
    /// only versions of weight 0 have a node left, those take the client
    /// (a viewer served by an unwanted version beats one turned away).
    fn ranked(&self, region: Option<&str>) -> Vec<&'a NodeInfo> {
        self.ranked_groups(region).0
    }

    /// [`Snapshot::ranked`], and how many of its nodes belong to the version
    /// the draw chose (all of them when versions play no part).
    fn ranked_groups(&self, region: Option<&str>) -> (Vec<&'a NodeInfo>, usize) {
        let nodes = self.ranked_nodes(region);
        if self.rollout.is_empty() {
            let n = nodes.len();
            return (nodes, n);
        }
        let mut versions: BTreeMap<&str, u32> = BTreeMap::new();
        for n in &nodes {
            versions
                .entry(n.version.as_str())
                .or_insert_with(|| self.rollout.weight(&n.version).unwrap_or(0));
        }
        let wheel: Vec<(&str, u32)> = versions.iter().map(|(v, w)| (*v, *w)).collect();
        let Some(chosen) = RolloutWeights::pick(&wheel, self.draw) else {
            let n = nodes.len();
            return (nodes, n);
        };
        let (mut first, rest): (Vec<&NodeInfo>, Vec<&NodeInfo>) =
            nodes.into_iter().partition(|n| n.version == chosen);
        let chosen_len = first.len();
        first.extend(
            rest.into_iter()
                .filter(|n| versions[n.version.as_str()] > 0),
        );
        (first, chosen_len)
    }

    /// Healthy nodes with room for one more session, best first: those in
    /// `region` (when given) before the others, then the least loaded, and
    /// among equally loaded ones an order drawn from the client's draw
    /// (rendezvous hashing): a burst of new rooms or viewers between two
    /// load reports spreads over the equally loaded nodes instead of piling
    /// onto one, while one client keeps its order.
    fn ranked_nodes(&self, region: Option<&str>) -> Vec<&'a NodeInfo> {
        let region = region.filter(|r| !r.is_empty());
        let mut nodes: Vec<&NodeInfo> = self
            .nodes
            .iter()
            .filter(|n| self.is_healthy(n) && self.has_room(n))
            .collect();
        nodes.sort_by(|a, b| {
            let in_region = |n: &NodeInfo| region.is_some_and(|r| n.region == r);
            in_region(b)
                .cmp(&in_region(a))
                .then_with(|| compare_load(a, b))
                .then_with(|| self.tie(a).cmp(&self.tie(b)))
                .then_with(|| a.id.cmp(&b.id))
        });
        nodes
    }
}

impl Snapshot<'_> {
    /// The node's place among equally loaded ones for this draw.
    fn tie(&self, node: &NodeInfo) -> u64 {
        crate::rollout::stable_draw(&format!("{}/{}", self.draw, node.id))
    }
}

/// Compares sessions / capacity of two nodes exactly, by cross-multiplying.
fn compare_load(a: &NodeInfo, b: &NodeInfo) -> Ordering {
    let lhs = u64::from(a.load.sessions) * u64::from(b.capacity);
    let rhs = u64::from(b.load.sessions) * u64::from(a.capacity);
    lhs.cmp(&rhs)
}

/// Nodes where a viewer of `room` can play, best first; empty when none can.
///
/// Any healthy node with room can serve a live room: a node other than the
/// origin pulls it over the relay when its first viewer arrives. So the
/// ranking is the usual one (rollout version, then region, then load), except
/// that within each version and region the nodes already carrying the room
/// come first — the origin, then the edges relaying it (nodes reporting
/// viewers of it) — while they have room: they add no relay link, and the
/// room's audience grows onto new nodes only as these fill up.
pub fn rank_for_viewer<'a>(
    snapshot: &Snapshot<'a>,
    room: &RoomId,
    region: Option<&str>,
) -> Vec<&'a NodeInfo> {
    let (mut nodes, chosen) = snapshot.ranked_groups(region);
    let origin = snapshot
        .origins
        .binary_search_by(|(r, _)| r.cmp(room))
        .ok()
        .map(|at| &snapshot.origins[at].1);
    let region = region.filter(|r| !r.is_empty());
    let carries = |n: &NodeInfo| -> u8 {
        if origin == Some(&n.id) {
            0
        } else if n
            .load
            .rooms
            .iter()
            .any(|r| &r.room == room && r.subscribers > 0)
        {
            1
        } else {
            2
        }
    };
    // A stable sort keeps the load and drawn order within each class.
    let mut keyed: Vec<(usize, &NodeInfo)> = nodes.drain(..).enumerate().collect();
    keyed.sort_by_key(|(i, n)| {
        let group = usize::from(*i >= chosen);
        let away = region.is_none_or(|r| n.region != r);
        (group, away, carries(n))
    });
    keyed.into_iter().map(|(_, n)| n).collect()
}

/// Whether `room` has a live origin on a healthy node (full or not).
pub fn has_live_origin(snapshot: &Snapshot<'_>, room: &RoomId) -> bool {
    snapshot.live_origin(room).is_some()
}

/// Nodes where a publisher of `room` should publish, best first: the room's
/// origin while it is live (even when full: the room lives there), otherwise
/// the healthy nodes by the viewer ranking.
pub fn rank_for_publisher<'a>(snapshot: &Snapshot<'a>, room: &RoomId) -> Vec<&'a NodeInfo> {
    if let Some(origin) = snapshot.live_origin(room) {
        return vec![origin];
    }
    snapshot.ranked(None)
}

/// One room as the cluster carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room: RoomId,
    /// Its origin node, if placed.
    pub origin_node: Option<NodeId>,
    /// Whether a publisher is live on some node.
    pub live: bool,
    /// Subscribers over all nodes.
    pub subscribers: u32,
}

/// Every room some node reports or some origin claim names, sorted by room.
pub fn room_summaries(nodes: &[NodeInfo], origins: &[(RoomId, NodeId)]) -> Vec<RoomSummary> {
    let mut rooms: BTreeMap<&RoomId, RoomSummary> = BTreeMap::new();
    for (room, node) in origins {
        rooms
            .entry(room)
            .or_insert_with(|| empty_summary(room))
            .origin_node = Some(node.clone());
    }
    for node in nodes {
        for load in &node.load.rooms {
            let summary = rooms
                .entry(&load.room)
                .or_insert_with(|| empty_summary(&load.room));
            summary.live |= load.live;
            summary.subscribers = summary.subscribers.saturating_add(load.subscribers);
        }
    }
    rooms.into_values().collect()
}

fn empty_summary(room: &RoomId) -> RoomSummary {
    RoomSummary {
        room: room.clone(),
        origin_node: None,
        live: false,
        subscribers: 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use weir_protocol::coordinator::{NodeLoad, RoomLoad};

    const NOW: u64 = 1_000_000;

    fn node(id: &str, region: &str, sessions: u32, capacity: u32) -> NodeInfo {
        NodeInfo {
            id: NodeId::parse(id).unwrap(),
            region: region.into(),
            zone: "z".into(),
            http_url: format!("http://{id}"),
            relay_addr: None,
            version: "1".into(),
            capacity,
            draining: false,
            load: NodeLoad {
                reported_at_ms: NOW - 500,
                sessions,
                egress_bps: 0,
                rooms: Vec::new(),
            },
        }
    }

    fn room(id: &str) -> RoomId {
        RoomId::parse(id).unwrap()
    }

    fn ids(nodes: &[&NodeInfo]) -> Vec<String> {
        nodes.iter().map(|n| n.id.to_string()).collect()
    }

    fn snap<'a>(nodes: &'a [NodeInfo], origins: &'a [(RoomId, NodeId)]) -> Snapshot<'a> {
        Snapshot::new(nodes, origins, NOW)
    }

    #[test]
    fn operator_flags_and_live_limits_apply() {
        let nodes = [
            node("a", "eu", 0, 10),
            node("b", "eu", 7, 10),
            node("c", "eu", 1, 10),
            node("d", "eu", 2, 10),
        ];
        let mut flags = BTreeMap::new();
        let cordon = NodeFlags {
            cordoned: true,
            ..NodeFlags::default()
        };
        let drain = NodeFlags {
            draining: true,
            ..NodeFlags::default()
        };
        flags.insert(NodeId::parse("a").unwrap(), cordon);
        flags.insert(NodeId::parse("c").unwrap(), drain);
        // Flags naming a node that is gone change nothing.
        flags.insert(NodeId::parse("gone").unwrap(), cordon);
        let mut s = snap(&nodes, &[]);
        s.flags = &flags;
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["d", "b"]);
        // A cap of 0.7: b (7 of 10) is full.
        s.max_load_permille = 700;
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["d"]);
        // A cordoned origin does not take the room's viewers either.
        let origins = [(room("r"), NodeId::parse("a").unwrap())];
        s.origins = &origins;
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["d"]);
        // Reports of 500 ms are too old under a 400 ms limit.
        s.report_max_age_ms = 400;
        assert!(rank_for_viewer(&s, &room("q"), None).is_empty());
    }

    #[test]
    fn nothing_healthy_gives_nothing() {
        assert!(rank_for_viewer(&snap(&[], &[]), &room("r"), None).is_empty());
        assert!(rank_for_publisher(&snap(&[], &[]), &room("r")).is_empty());
    }

    #[test]
    fn stale_draining_and_full_nodes_are_skipped() {
        let mut stale = node("stale", "eu", 0, 10);
        stale.load.reported_at_ms = NOW - FRESH_REPORT_MS - 1;
        let mut future = node("future", "eu", 0, 10);
        future.load.reported_at_ms = NOW + FRESH_REPORT_MS + 1;
        let mut draining = node("draining", "eu", 0, 10);
        draining.draining = true;
        let mut edge = node("edge", "eu", 0, 10);
        edge.load.reported_at_ms = NOW - FRESH_REPORT_MS;
        let nodes = [
            stale,
            future,
            draining,
            node("full", "eu", 10, 10),
            node("over", "eu", 11, 10),
            node("zero", "eu", 0, 0),
            node("ok", "eu", 9, 10),
            edge,
        ];
        let s = snap(&nodes, &[]);
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["edge", "ok"]);
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["edge", "ok"]);
    }

    #[test]
    fn region_first_then_load_ratio_then_a_drawn_order() {
        let nodes = [
            node("us-busy", "us", 50, 100),
            node("eu-busy", "eu", 90, 100),
            node("eu-idle", "eu", 1, 100),
            node("us-idle", "us", 1, 10),
            node("us-idle2", "us", 10, 1000),
            node("b-tie", "ap", 5, 10),
            node("a-tie", "ap", 5, 10),
        ];
        let mut s = snap(&nodes, &[]);
        // a-tie, b-tie and us-busy are all half full: their order is drawn.
        let tied = |v: &[String]| -> Vec<String> {
            let mut t = v.to_vec();
            t.sort();
            t
        };
        let eu = ids(&rank_for_viewer(&s, &room("r"), Some("eu")));
        assert_eq!(eu[..4], ["eu-idle", "eu-busy", "us-idle2", "us-idle"]);
        assert_eq!(tied(&eu[4..]), ["a-tie", "b-tie", "us-busy"]);
        // No region, or an empty one: load alone.
        let plain = ids(&rank_for_viewer(&s, &room("r"), None));
        assert_eq!(plain[..3], ["eu-idle", "us-idle2", "us-idle"]);
        assert_eq!(tied(&plain[3..6]), ["a-tie", "b-tie", "us-busy"]);
        assert_eq!(plain[6], "eu-busy");
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), Some(""))), plain);
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), plain);
        // One draw, one order; many draws spread the ties.
        let mut firsts = BTreeMap::new();
        for i in 0..300 {
            s.draw = crate::rollout::stable_draw(&format!("room-{i}"));
            let order = ids(&rank_for_viewer(&s, &room("r"), None));
            assert_eq!(order, ids(&rank_for_viewer(&s, &room("r"), None)));
            *firsts.entry(order[3].to_owned()).or_insert(0) += 1;
        }
        assert_eq!(
            firsts.len(),
            3,
            "every tied node comes first for some: {firsts:?}"
        );
        assert!(firsts.values().all(|n| *n >= 50), "{firsts:?}");
    }

    fn carrying(mut n: NodeInfo, r: &str, subscribers: u32) -> NodeInfo {
        n.load.rooms.push(RoomLoad {
            room: room(r),
            live: false,
            subscribers,
        });
        n
    }

    #[test]
    fn a_live_room_prefers_its_origin_then_its_edges_then_the_rest() {
        let nodes = [
            node("idle", "eu", 0, 100),
            node("origin", "us", 80, 100),
            carrying(node("edge", "us", 50, 100), "r", 3),
            // Carries another room only: no preference.
            carrying(node("other", "us", 10, 100), "q", 9),
        ];
        let origins = [(room("r"), NodeId::parse("origin").unwrap())];
        let s = snap(&nodes, &origins);
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), None)),
            ["origin", "edge", "idle", "other"]
        );
        // The viewer's region still comes first; within it and outside it
        // the nodes carrying the room lead.
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), Some("us"))),
            ["origin", "edge", "other", "idle"]
        );
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), Some("eu"))),
            ["idle", "origin", "edge", "other"]
        );
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["origin"]);
        // Other rooms are placed by load as usual.
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("z"), None)),
            ["idle", "other", "edge", "origin"]
        );
    }

    #[test]
    fn a_full_origin_sends_viewers_to_edges_but_keeps_its_publisher() {
        let nodes = [
            node("idle", "eu", 0, 100),
            node("origin", "us", 100, 100),
            carrying(node("edge", "eu", 60, 100), "r", 60),
        ];
        let origins = [(room("r"), NodeId::parse("origin").unwrap())];
        let s = snap(&nodes, &origins);
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), None)),
            ["edge", "idle"]
        );
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["origin"]);
        assert!(has_live_origin(&s, &room("r")));
        // A full edge gives way to the rest as well.
        let nodes = [
            node("idle", "eu", 0, 100),
            node("origin", "us", 100, 100),
            carrying(node("edge", "eu", 100, 100), "r", 100),
        ];
        let s = snap(&nodes, &origins);
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["idle"]);
    }

    #[test]
    fn rollout_weights_come_before_carrying_the_room() {
        let nodes = [
            versioned("origin", "v1", 50),
            versioned("b1", "v2", 10),
            carrying(versioned("b2", "v2", 20), "r", 5),
        ];
        let origins = [(room("r"), NodeId::parse("origin").unwrap())];
        let weights = RolloutWeights::parse("v1=0,v2=100").unwrap();
        let mut s = snap(&nodes, &origins);
        s.rollout = &weights;
        // v1 has weight 0: its origin is left out; within v2 the edge leads.
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["b2", "b1"]);
        let weights = RolloutWeights::parse("v1=100,v2=0").unwrap();
        s.rollout = &weights;
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["origin"]);
    }

    #[test]
    fn an_unhealthy_origin_does_not_count() {
        let mut origin = node("origin", "us", 0, 100);
        origin.draining = true;
        let nodes = [node("idle", "eu", 5, 100), origin];
        let origins = [
            (room("gone"), NodeId::parse("vanished").unwrap()),
            (room("r"), NodeId::parse("origin").unwrap()),
        ];
        let s = snap(&nodes, &origins);
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["idle"]);
        assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["idle"]);
        assert_eq!(ids(&rank_for_publisher(&s, &room("gone"))), ["idle"]);
    }

    fn versioned(id: &str, version: &str, sessions: u32) -> NodeInfo {
        NodeInfo {
            version: version.into(),
            ..node(id, "eu", sessions, 100)
        }
    }

    /// The version of the first node of each of `n` viewers' answers, counted.
    fn first_versions(s: &Snapshot<'_>, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let mut s = *s;
            s.draw = crate::rollout::stable_draw(&format!("viewer-{i}"));
            let ranked = rank_for_viewer(&s, &room("r"), None);
            *counts.entry(ranked[0].version.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn a_canary_gets_its_share_of_viewers() {
        let nodes = [
            versioned("a1", "v1", 0),
            versioned("a2", "v1", 3),
            versioned("b1", "v2", 1),
            versioned("b2", "v2", 0),
        ];
        let weights = RolloutWeights::parse("v1=90,v2=10").unwrap();
        let mut s = snap(&nodes, &[]);
        s.rollout = &weights;
        // Hashed viewer ids: the same counts on every run.
        let counts = first_versions(&s, 10_000);
        let canary = counts["v2"];
        assert!((900..=1100).contains(&canary), "{counts:?}");
        assert_eq!(counts["v1"] + canary, 10_000);

        // Within the chosen version the usual ranking applies, and the other
        // weighted version follows as a fallback.
        let v2_viewer = (0..)
            .map(|i| crate::rollout::stable_draw(&format!("viewer-{i}")))
            .find(|d| {
                let mut t = s;
                t.draw = *d;
                rank_for_viewer(&t, &room("r"), None)[0].version == "v2"
            })
            .unwrap();
        s.draw = v2_viewer;
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), None)),
            ["b2", "b1", "a1", "a2"]
        );
        // The same viewer gets the same answer again.
        assert_eq!(
            ids(&rank_for_viewer(&s, &room("r"), None)),
            ["b2", "b1", "a1", "a2"]
        );
    }

    #[test]
    fn blue_green_flips_and_versions_without_weight_get_nothing() {
        let nodes = [
            versioned("blue", "blue", 0),
            versioned("green", "green", 0),
            versioned("old", "v0", 0),
        ];
        let mut s = snap(&nodes, &[]);
        let blue = RolloutWeights::parse("blue=100,green=0").unwrap();
        s.rollout = &blue;
        let counts = first_versions(&s, 1000);
        assert_eq!(counts.get("blue"), Some(&1000), "{counts:?}");
        // Weight 0 (given or not) leaves a version out of the answer.
        for d in [0, u64::MAX / 2, u64::MAX] {
            s.draw = d;
            assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["blue"]);
            assert_eq!(ids(&rank_for_publisher(&s, &room("r"))), ["blue"]);
        }
        // The flip.
        let green = RolloutWeights::parse("blue=0,green=100").unwrap();
        s.rollout = &green;
        assert_eq!(first_versions(&s, 1000).get("green"), Some(&1000));
        // No weights: every version is equal, ranked by load (all equal
        // here: a drawn order).
        s.rollout = &NO_WEIGHTS;
        let mut all = ids(&rank_for_viewer(&s, &room("r"), None));
        all.sort();
        assert_eq!(all, ["blue", "green", "old"]);
    }

    #[test]
    fn only_unweighted_versions_left_still_take_clients() {
        let mut gone = versioned("blue", "blue", 0);
        gone.draining = true;
        let nodes = [gone, versioned("green", "green", 0)];
        let weights = RolloutWeights::parse("blue=100,green=0").unwrap();
        let mut s = snap(&nodes, &[]);
        s.rollout = &weights;
        assert_eq!(ids(&rank_for_viewer(&s, &room("r"), None)), ["green"]);
        // A weighted version whose nodes are all full does not count either.
        let nodes = [
            versioned("full", "v1", 100),
            versioned("b", "v2", 0),
            versioned("c", "v3", 0),
        ];
        let weights = RolloutWeights::parse("v1=50,v2=50").unwrap();
        let mut s = snap(&nodes, &[]);
        s.rollout = &weights;
        let counts = first_versions(&s, 100);
        assert_eq!(counts.get("v2"), Some(&100), "{counts:?}");
    }

    #[test]
    fn room_summaries_merge_reports_and_origins() {
        let mut a = node("a", "eu", 0, 10);
        a.load.rooms = vec![
            RoomLoad {
                room: room("r"),
                live: true,
                subscribers: 3,
            },
            RoomLoad {
                room: room("idle"),
                live: false,
                subscribers: 1,
            },
        ];
        let mut b = node("b", "eu", 0, 10);
        b.load.rooms = vec![RoomLoad {
            room: room("r"),
            live: false,
            subscribers: u32::MAX,
        }];
        let origins = [
            (room("r"), NodeId::parse("a").unwrap()),
            (room("placed"), NodeId::parse("b").unwrap()),
        ];
        let got = room_summaries(&[a, b], &origins);
        assert_eq!(
            got,
            vec![
                RoomSummary {
                    room: room("idle"),
                    origin_node: None,
                    live: false,
                    subscribers: 1
                },
                RoomSummary {
                    room: room("placed"),
                    origin_node: Some(NodeId::parse("b").unwrap()),
                    live: false,
                    subscribers: 0
                },
                RoomSummary {
                    room: room("r"),
                    origin_node: Some(NodeId::parse("a").unwrap()),
                    live: true,
                    subscribers: u32::MAX
                },
            ]
        );
    }
}

//! Moving viewers off a shard (a node being drained), driven in memory on a
//! virtual clock: batches end the oldest viewers first, each told in-band;
//! publishers, kept rooms and the viewers that stay are not disturbed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weir_sfu::sim::{Net, drive_publisher, room};
use weir_sfu::{CloseReason, Event, Role};

/// Sessions the SFU reported closed as moved, in order.
fn moved(net: &Net) -> Vec<weir_protocol::SessionId> {
    net.events
        .iter()
        .filter_map(|e| match e {
            Event::SessionClosed {
                session,
                role,
                reason: CloseReason::Moved,
                ..
            } => {
                assert_eq!(*role, Role::Subscriber, "only viewers are moved");
                Some(session.clone())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn viewers_move_in_batches_oldest_first_and_the_rest_keep_playing() {
    let mut net = Net::new();
    let (p, pub_id) = net.publish("live", "alice").unwrap();
    let mut viewers = Vec::new();
    for _ in 0..5 {
        viewers.push(net.subscribe("live"));
        // Distinct creation times, so "oldest first" is observable.
        net.now += Duration::from_millis(1);
    }
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive);
    for (s, _) in &viewers {
        assert!(net.peers[*s].connected, "viewer {s} connected");
        assert!(!net.video_received(*s).is_empty(), "viewer {s} plays");
    }
    assert_eq!(net.sfu.viewer_count(), 5);

    // A batch of two: the two oldest go, each told in-band.
    let first = net.sfu.move_viewers(2, |_| false);
    assert_eq!(first, vec![viewers[0].1.clone(), viewers[1].1.clone()]);
    net.drain_sfu();
    let t = net.now + Duration::from_millis(200);
    net.run_until(t, &mut drive);
    assert_eq!(moved(&net), first);
    for (s, _) in &viewers[..2] {
        assert!(net.peers[*s].closed, "moved viewer {s} got a DTLS close");
    }
    assert_eq!(net.sfu.viewer_count(), 3);
    assert_eq!(net.sfu.rooms()[0].subscribers, 3);

    // The others play on, undisturbed, from the same publisher.
    let before: Vec<usize> = viewers
        .iter()
        .map(|(s, _)| net.video_received(*s).len())
        .collect();
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive);
    for (i, (s, _)) in viewers.iter().enumerate() {
        let now = net.video_received(*s).len();
        if i < 2 {
            assert_eq!(now, before[i], "moved viewer {s} gets nothing more");
            assert!(!net.peers[*s].connected || net.peers[*s].closed);
        } else {
            assert!(now > before[i] + 30, "viewer {s} kept playing: {now}");
            assert!(!net.peers[*s].closed, "viewer {s} was not closed");
        }
    }

    // The next batch takes the rest; a further one finds nobody. The
    // publisher was never touched and is still live.
    let second = net.sfu.move_viewers(10, |_| false);
    assert_eq!(second.len(), 3);
    assert!(net.sfu.move_viewers(10, |_| false).is_empty());
    net.drain_sfu();
    assert_eq!(moved(&net).len(), 5);
    assert_eq!(net.sfu.viewer_count(), 0);
    let rooms = net.sfu.rooms();
    assert_eq!(rooms.len(), 1);
    assert!(rooms[0].live, "the publisher stays");
    assert_eq!(
        net.sfu.session(&pub_id),
        Some((&room("live"), Role::Publisher))
    );
    assert!(!net.events.iter().any(|e| matches!(e,
        Event::SessionClosed { session, .. } if *session == pub_id)));
}

#[test]
fn viewers_of_kept_rooms_stay() {
    let mut net = Net::new();
    let (p, _) = net.publish("kept", "alice").unwrap();
    let (kept, kept_id) = net.subscribe("kept");
    // Viewers of a room nobody publishes here (waiting for its stream).
    let (w1, _) = net.subscribe("elsewhere");
    let (w2, _) = net.subscribe("elsewhere");
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);

    let keep = |r: &weir_protocol::RoomId| *r == room("kept");
    let ended = net.sfu.move_viewers(100, keep);
    assert_eq!(ended.len(), 2);
    assert!(!ended.contains(&kept_id));
    assert!(net.sfu.move_viewers(100, keep).is_empty());
    net.drain_sfu();
    let before = net.video_received(kept).len();
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);
    assert!(net.video_received(kept).len() > before + 15);
    assert!(!net.peers[kept].closed);
    // The room nobody publishes and nobody watches any more is gone.
    let rooms: Vec<_> = net.sfu.rooms().into_iter().map(|r| r.room).collect();
    assert_eq!(rooms, vec![room("kept")]);
    assert!(net.peers[w1].closed && net.peers[w2].closed);
    // A batch of 0 ends nobody.
    assert!(net.sfu.move_viewers(0, |_| false).is_empty());
    assert_eq!(net.sfu.viewer_count(), 1);
}

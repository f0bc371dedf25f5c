//! The SFU driven in memory: str0m client peers (publishers and viewers)
//! connected through one `Sfu` over a simulated network with a virtual clock.
//! Nothing here opens a socket or sleeps.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use str0m::media::{Direction, MediaKind, MediaTime};
use weir_sfu::sim::{Net, SFU_ADDR, drive_publisher, room};
use weir_sfu::{CloseReason, Event, Input, Role, SfuConfig, SfuError};

#[test]
fn media_flows_from_publisher_to_every_subscriber() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let (s1, _) = net.subscribe("r1");
    let (s2, _) = net.subscribe("r1");
    let end = net.now + Duration::from_secs(3);
    net.run_until(end, drive_publisher(p));

    for s in [s1, s2] {
        let video = net.video_received(s);
        assert!(
            video.len() > 20,
            "subscriber {s} got {} video frames",
            video.len()
        );
        assert!(video[0], "video to a subscriber starts with a keyframe");
        assert!(
            net.audio_received(s) > 50,
            "subscriber {s} got {} audio frames",
            net.audio_received(s)
        );
    }
    let c = net.sfu.counters();
    assert!(c.frames_forwarded > 100 && c.bytes_forwarded > 0, "{c:?}");
    assert_eq!(c.codec_mismatches, 0);
    let connected = net
        .events
        .iter()
        .filter(|e| matches!(e, Event::SessionConnected { .. }))
        .count();
    assert_eq!(connected, 3);
    assert_eq!(
        net.events
            .iter()
            .filter(|e| matches!(e, Event::FirstFrame { .. }))
            .count(),
        2
    );
    let rooms = net.sfu.rooms();
    assert_eq!(rooms.len(), 1);
    assert!(rooms[0].live);
    assert_eq!(rooms[0].subscribers, 2);
}

#[test]
fn late_subscribers_start_from_the_gop_cache_without_asking_the_publisher() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive);

    let late: Vec<usize> = (0..3).map(|_| net.subscribe("r1").0).collect();
    let joined = net.now;
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);
    for &s in &late {
        let video = net.video_received(s);
        // The cached GOP: the keyframe sent at the start and the deltas since.
        assert!(
            video.len() > 60,
            "late subscriber {s} got {} frames",
            video.len()
        );
        assert!(video[0], "late subscriber {s} starts at a keyframe");
        let first = net.peers[s]
            .media
            .iter()
            .find(|m| m.0 == MediaKind::Video)
            .unwrap()
            .2;
        assert!(
            first - joined < Duration::from_millis(200),
            "picture at once: {:?}",
            first - joined
        );
    }
    assert_eq!(
        net.peers[p].keyframe_requests, 0,
        "no keyframe request reached the publisher"
    );
    assert_eq!(net.sfu.counters().gop_cache_starts, 3);
}

#[test]
fn without_a_cached_keyframe_late_joiners_share_one_keyframe_request() {
    let mut net = Net::with_config(SfuConfig {
        gop: weir_sfu::GopLimits {
            max_frames: 0,
            max_bytes: 0,
        },
        ..SfuConfig::default()
    });
    let (p, _) = net.publish("r1", "alice").unwrap();
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive);
    assert_eq!(
        net.peers[p].keyframe_requests, 0,
        "nobody asked for a keyframe yet"
    );

    // Three viewers join at once; one keyframe request reaches the publisher.
    let late: Vec<usize> = (0..3).map(|_| net.subscribe("r1").0).collect();
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive);
    for &s in &late {
        let video = net.video_received(s);
        assert!(!video.is_empty(), "late subscriber {s} got no video");
        assert!(video[0], "late subscriber {s} starts at a keyframe");
    }
    assert_eq!(
        net.peers[p].keyframe_requests, 1,
        "requests from 3 viewers were coalesced"
    );
}

#[test]
fn a_subscriber_leaving_does_not_disturb_the_others() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let (s1, id1) = net.subscribe("r1");
    let (s2, _) = net.subscribe("r1");
    let (s3, id3) = net.subscribe("r1");
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);

    // s1 leaves politely (DELETE), s3 vanishes without a word.
    assert_eq!(
        net.sfu.close_session(&room("r1"), &id1),
        Ok(Role::Subscriber)
    );
    net.drain_sfu();
    net.peers[s1].online = false;
    net.peers[s3].online = false;
    let before = net.video_received(s2).len();
    let t = net.now + Duration::from_secs(40);
    net.run_until(t, &mut drive);

    assert!(
        net.video_received(s2).len() > before + 100,
        "s2 kept receiving"
    );
    let closed: Vec<_> = net
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SessionClosed {
                session, reason, ..
            } => Some((session.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert!(
        closed.contains(&(id1.clone(), CloseReason::Requested)),
        "{closed:?}"
    );
    assert!(
        closed.contains(&(id3.clone(), CloseReason::Disconnected)),
        "{closed:?}"
    );
    assert_eq!(net.sfu.rooms()[0].subscribers, 1);
    assert_eq!(
        net.sfu.close_session(&room("r1"), &id1),
        Err(SfuError::UnknownSession)
    );
}

#[test]
fn publisher_leaving_keeps_viewers_and_the_same_owner_takes_over() {
    let mut net = Net::new();
    let (p1, id1) = net.publish("r1", "alice").unwrap();
    let (s, _) = net.subscribe("r1");
    let mut drive1 = drive_publisher(p1);
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive1);
    assert!(!net.video_received(s).is_empty());

    // Another streamer cannot take a live room.
    assert_eq!(
        net.publish("r1", "mallory").unwrap_err(),
        SfuError::RoomBusy(room("r1"))
    );

    // Alice's encoder reconnects: the new session replaces the stale one at once.
    net.peers[p1].online = false;
    let before = net.video_received(s).len();
    let (p2, id2) = net.publish("r1", "alice").unwrap();
    assert!(net.events.iter().any(|e| matches!(e,
        Event::SessionClosed { session, reason: CloseReason::Replaced, .. } if *session == id1)));
    let mut drive2 = drive_publisher(p2);
    let t = net.now + Duration::from_secs(2);
    net.run_until(t, &mut drive2);
    let video = net.video_received(s);
    assert!(
        video.len() > before + 20,
        "viewer resumed with the new publisher"
    );
    assert!(video[before], "viewer resumed at a keyframe");
    // What the viewer got is one stream: sequence numbers, RTP time and VP8
    // picture ids go on across the takeover (the new publisher's layer
    // counts its pictures from 0).
    assert!(net.peers[s].video_wire[0].3.is_some(), "VP8 picture ids");
    let breaks = net.video_breaks(s, 0);
    assert!(breaks.is_empty(), "{breaks:?}");

    // The publisher leaves; the viewer stays attached to the room.
    net.sfu.close_session(&room("r1"), &id2).unwrap();
    net.drain_sfu();
    let rooms = net.sfu.rooms();
    assert_eq!(rooms.len(), 1);
    assert!(!rooms[0].live);
    assert_eq!(rooms[0].subscribers, 1);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let (s, sid) = net.subscribe("r1");
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);
    let sessions = net.sfu.session_count();

    assert!(matches!(
        net.sfu
            .accept_publisher(net.now, room("r2"), "a", "not sdp at all"),
        Err(SfuError::InvalidOffer(_))
    ));
    // A viewer's offer (recvonly) is no publication.
    let (_, recv_offer, _) = net.client(Direction::RecvOnly);
    assert!(matches!(
        net.sfu
            .accept_publisher(net.now, room("r2"), "a", &recv_offer),
        Err(SfuError::NoUsableMedia(_))
    ));
    // A publisher's offer (sendonly) gives a viewer nothing to receive.
    let (_, send_offer, _) = net.client(Direction::SendOnly);
    assert!(matches!(
        net.sfu
            .accept_subscriber(net.now, room("r2"), "v", &send_offer),
        Err(SfuError::NoUsableMedia(_))
    ));
    assert_eq!(net.sfu.session_count(), sessions);
    assert_eq!(
        net.sfu.rooms().len(),
        1,
        "refused offers leave no room behind"
    );

    // Session ids are checked against the room.
    assert_eq!(
        net.sfu.close_session(&room("r2"), &sid),
        Err(SfuError::UnknownSession)
    );
    assert_eq!(
        net.sfu
            .add_remote_candidates(&room("r1"), &sid, "a=ice-ufrag:other\r\n"),
        Err(SfuError::IceRestartUnsupported)
    );
    assert!(matches!(
        net.sfu
            .add_remote_candidates(&room("r1"), &sid, "a=candidate:garbage\r\n"),
        Err(SfuError::InvalidCandidate(_))
    ));

    // Random datagrams, from strangers and from a known peer's address.
    let mut seed = 0x1234_5678u64;
    let from_known = net.peers[s].addr;
    for n in 0..2000 {
        let len = (n % 300) + 1;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let from = if n % 2 == 0 {
            from_known
        } else {
            "127.0.0.9:4444".parse().unwrap()
        };
        net.sfu.handle_input(Input::Receive {
            now: net.now,
            source: from,
            destination: SFU_ADDR.parse().unwrap(),
            contents: &bytes,
        });
        net.drain_sfu();
    }
    assert!(net.sfu.counters().datagrams_dropped > 0);
    let before = net.video_received(s).len();
    let t = net.now + Duration::from_secs(1);
    net.run_until(t, &mut drive);
    assert_eq!(
        net.sfu.session_count(),
        sessions,
        "no session was lost to garbage"
    );
    assert!(
        net.video_received(s).len() > before + 20,
        "media still flows"
    );
}

#[test]
fn a_source_without_webrtc_reaches_viewers_and_follows_the_takeover_rule() {
    let mut net = Net::new();
    let (s, _) = net.subscribe("live");
    let (source, replaced) = net.sfu.accept_source(room("live"), "streamer").unwrap();
    assert!(replaced.is_none());
    assert_eq!(
        net.sfu
            .accept_source(room("live"), "someone-else")
            .unwrap_err(),
        SfuError::RoomBusy(room("live"))
    );
    let mut frame_no = 0u64;
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, |net| {
        // 30 fps H.264 access units (Annex B): SPS+PPS+IDR every 30 frames.
        if !net.peers[s].connected {
            return;
        }
        let keyframe = frame_no.is_multiple_of(30);
        let frame = h264_frame(
            net.now,
            frame_no,
            keyframe,
            if keyframe { 4000 } else { 600 },
        );
        net.sfu.push_frame(net.now, &source, frame).unwrap();
        net.drain_sfu();
        frame_no += 1;
    });
    let video = net.video_received(s);
    assert!(
        video.len() > 30,
        "viewer got {} frames from the source",
        video.len()
    );
    assert!(video[0], "starting at a keyframe");
    assert!(net.sfu.rooms()[0].live);
    // The same owner reconnecting replaces the source at once.
    let (again, replaced) = net.sfu.accept_source(room("live"), "streamer").unwrap();
    assert_eq!(replaced, Some(source.clone()));
    assert!(
        net.sfu
            .push_frame(net.now, &source, dummy_audio(net.now))
            .is_err()
    );
    assert_eq!(
        net.sfu.close_session(&room("live"), &again),
        Ok(Role::Source)
    );
}

/// Frame `n` of a 30 fps H.264 source (Annex B): SPS, PPS and an IDR slice
/// when `keyframe`, else a P slice; `len` filler bytes of slice data.
fn h264_frame(now: Instant, n: u64, keyframe: bool, len: usize) -> weir_sfu::MediaFrame {
    let mut au = Vec::new();
    if keyframe {
        au.extend_from_slice(&[0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40]);
        au.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80]);
        au.extend_from_slice(&[0, 0, 0, 1, 0x65]);
    } else {
        au.extend_from_slice(&[0, 0, 0, 1, 0x41]);
    }
    au.extend(std::iter::repeat_n(0x5a, len));
    weir_sfu::MediaFrame {
        kind: MediaKind::Video,
        codec: weir_sfu::Codec::H264,
        params: None,
        time: MediaTime::from_90khz(n * 3000),
        network_time: now,
        keyframe,
        rid: None,
        capture_time: None,
        data: std::sync::Arc::from(au),
    }
}

fn dummy_audio(now: Instant) -> weir_sfu::MediaFrame {
    weir_sfu::MediaFrame {
        kind: MediaKind::Audio,
        codec: weir_sfu::Codec::Opus,
        params: None,
        time: MediaTime::from_millis(0),
        network_time: now,
        keyframe: false,
        rid: None,
        capture_time: None,
        data: std::sync::Arc::from(vec![0xfcu8; 40]),
    }
}

#[test]
fn nack_recovers_most_frames_under_five_percent_loss() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let (clean, _) = net.subscribe("r1");
    let (lossy, _) = net.subscribe("r1");
    net.peers[lossy].loss = 0.05;
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(10);
    net.run_until(t, &mut drive);

    let reference = net.video_received(clean).len();
    let got = net.video_received(lossy).len();
    assert!(
        net.peers[lossy].lost > 50,
        "the network lost {} datagrams",
        net.peers[lossy].lost
    );
    assert!(reference > 250, "the clean viewer got {reference} frames");
    // Each video frame spans one to three packets: without retransmission
    // about a tenth of them would be incomplete.
    assert!(
        got as f64 >= reference as f64 * 0.97,
        "with 5 % loss the viewer still got {got} of {reference} frames"
    );
    assert!(
        net.sfu.counters().nacks_received > 0,
        "the lossy viewer's NACKs were counted"
    );
    let reported = net
        .events
        .iter()
        .any(|e| matches!(e, Event::SubscriberStats { nacks, .. } if *nacks > 0));
    assert!(
        reported,
        "the viewer's NACKs reached the per-viewer stats events"
    );
}

#[test]
fn a_bandwidth_cap_moves_a_viewer_to_a_lower_simulcast_layer_and_back() {
    let mut net = Net::new();
    let (p, _) = net.publish_layers("sc", "alice", &["h", "l"]).unwrap();
    let (s, sid) = net.subscribe("sc");
    let (_, other_id) = net.subscribe("sc");
    let mut drive = drive_publisher(p);
    let t = net.now + Duration::from_secs(5);
    net.run_until(t, &mut drive);
    let layer = |net: &Net, id| net.sfu.subscriber_layer(id).flatten();
    assert_eq!(
        layer(&net, &sid).as_deref(),
        Some("h"),
        "an unconstrained viewer gets the top layer"
    );

    // The link to one viewer shrinks to 600 kbit/s: the ~1.3 Mbit/s layer cannot pass.
    net.peers[s].cap_bps = Some(600_000);
    let t = net.now + Duration::from_secs(20);
    net.run_until(t, &mut drive);
    assert_eq!(
        layer(&net, &sid).as_deref(),
        Some("l"),
        "the capped viewer moved down"
    );
    // The other viewer keeps (or, after a dip of its own estimate, soon
    // regains) the top layer. (Its estimate dips in about one run of five,
    // with str0m's random SSRCs and keys: noted to look into.)
    let mut other = layer(&net, &other_id);
    for _ in 0..10 {
        if other.as_deref() == Some("h") {
            break;
        }
        let t = net.now + Duration::from_secs(1);
        net.run_until(t, &mut drive);
        other = layer(&net, &other_id);
    }
    assert_eq!(
        other.as_deref(),
        Some("h"),
        "the other viewer is unaffected"
    );
    assert_eq!(
        layer(&net, &sid).as_deref(),
        Some("l"),
        "the capped viewer stays down while capped"
    );
    let frames_capped = net.video_received(s).len();

    // The cap lifts: the estimate grows back and the viewer returns to the top layer.
    net.peers[s].cap_bps = None;
    let mut switched_at = None;
    for _ in 0..40 {
        let t = net.now + Duration::from_secs(1);
        net.run_until(t, &mut drive);
        if switched_at.is_none() && layer(&net, &sid).as_deref() == Some("h") {
            switched_at = Some(net.video_received(s).len());
        }
    }
    let switched_at = switched_at.expect("the viewer moved back up");
    assert_eq!(
        layer(&net, &sid).as_deref(),
        Some("h"),
        "the viewer stays up"
    );
    // It never stopped getting pictures through the switches.
    assert!(
        net.video_received(s).len() > frames_capped + 900,
        "frames kept flowing"
    );
    // The switch up is seamless on the wire: sequence numbers, RTP time and
    // VP8 picture ids go on. (From a second after the cap lifted: frames
    // lost to the cap end there.)
    eprintln!("cap lifted at frame {frames_capped}, top layer by frame {switched_at}");
    assert!(
        switched_at > frames_capped + 60,
        "the switch is in the checked stretch"
    );
    let breaks = net.video_breaks(s, frames_capped + 30);
    assert!(breaks.is_empty(), "{breaks:?}");
}

#[test]
fn a_viewers_data_channel_carries_messages_both_ways_and_closes_with_the_session() {
    let mut net = Net::new();
    let (p, _) = net.publish("r1", "alice").unwrap();
    let (v, session) = net.subscribe_with_channel("r1", "weir-events?format=json");
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, drive_publisher(p));

    let opened: Vec<_> = net
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelOpened {
                session: s,
                role,
                owner,
                label,
                ..
            } => Some((s.clone(), *role, owner.clone(), label.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        opened,
        vec![(
            session.clone(),
            Role::Subscriber,
            "viewer".to_owned(),
            "weir-events?format=json".to_owned()
        )]
    );
    assert!(
        net.peers[v].channel.is_some(),
        "the viewer saw its channel open"
    );
    // Media still flows beside the channel.
    assert!(net.video_received(v).len() > 10);

    // Node → viewer, in order.
    let now = net.now;
    let written = net
        .sfu
        .send_channel(
            now,
            &session,
            "weir-events?format=json",
            false,
            &[b"one", b"two"],
        )
        .unwrap();
    assert_eq!(written, 2);
    net.drain_sfu();
    // Viewer → node.
    assert!(net.peer_send(v, false, b"{\"t\":\"ping\"}"));
    let end = net.now + Duration::from_millis(500);
    net.run_until(end, |_| {});
    let got: Vec<_> = net.peers[v].channel_messages.clone();
    assert_eq!(
        got,
        vec![(false, b"one".to_vec()), (false, b"two".to_vec())]
    );
    assert!(net.events.iter().any(|e| matches!(e,
        Event::ChannelMessage { session: s, binary: false, data, .. }
            if *s == session && data == b"{\"t\":\"ping\"}")));

    // Refusals change nothing.
    let now = net.now;
    assert_eq!(
        net.sfu.send_channel(now, &session, "other", true, &[b"x"]),
        Err(SfuError::NoChannel("other".into()))
    );
    assert_eq!(
        net.sfu.send_channel(
            now,
            &weir_protocol::SessionId::random(),
            "weir-events",
            true,
            &[b"x"]
        ),
        Err(SfuError::UnknownSession)
    );
    // A peer that does not keep up fills the channel's buffer: the SFU
    // writes what fits and says how much.
    let big = vec![7u8; 16 * 1024];
    let many: Vec<&[u8]> = (0..1000).map(|_| big.as_slice()).collect();
    let written = net
        .sfu
        .send_channel(now, &session, "weir-events?format=json", true, &many)
        .unwrap();
    assert!(written > 0 && written < many.len(), "wrote {written}");

    // Ending the session closes its channel first.
    net.sfu.close_session(&room("r1"), &session).unwrap();
    net.drain_sfu();
    let tail: Vec<_> = net
        .events
        .iter()
        .filter(|e| {
            matches!(e, Event::ChannelClosed { session: s, .. } | Event::SessionClosed { session: s, .. } if *s == session)
        })
        .collect();
    assert!(
        matches!(tail.as_slice(), [Event::ChannelClosed { label, .. }, Event::SessionClosed { .. }] if label == "weir-events?format=json"),
        "{tail:?}"
    );
}

/// A source (SRT ingest) with a transcoder's renditions: each rendition is
/// a layer; a viewer may cap the layer it gets, and lifting the cap takes
/// it back to the source at the next keyframe.
#[test]
fn a_sources_renditions_are_layers_a_viewer_can_cap() {
    use weir_sfu::MediaFrame;

    let mut net = Net::new();
    let (free, free_id) = net.subscribe("show");
    let (capped, capped_id) = net.subscribe("show");
    let now = net.now;
    net.sfu
        .set_max_layer(now, &capped_id, Some("360p"))
        .unwrap();
    let (source, _) = net.sfu.accept_source(room("show"), "streamer").unwrap();
    let mut frame_no = 0u64;
    // How late the 360p rendition's frames are (a transcoder falling behind).
    let lag = std::rc::Rc::new(std::cell::Cell::new(Duration::ZERO));
    let rendition_lag = lag.clone();
    let mut push = move |net: &mut Net| {
        if !net.peers[free].connected || !net.peers[capped].connected {
            return;
        }
        let keyframe = frame_no.is_multiple_of(30);
        // The source and one smaller rendition, keyframes aligned.
        for (rid, key_size, size) in [(None, 6000, 900), (Some("360p"), 1500, 200)] {
            let len = if keyframe { key_size } else { size };
            let frame = MediaFrame {
                network_time: if rid.is_some() {
                    net.now - rendition_lag.get()
                } else {
                    net.now
                },
                rid: rid.map(str0m::media::Rid::from),
                ..h264_frame(net.now, frame_no, keyframe, len)
            };
            net.sfu.push_frame(net.now, &source, frame).unwrap();
        }
        net.drain_sfu();
        frame_no += 1;
    };
    let end = net.now + Duration::from_secs(3);
    net.run_until(end, &mut push);
    assert_eq!(net.sfu.subscriber_layer(&free_id), Some(None), "the source");
    assert_eq!(
        net.sfu.subscriber_layer(&capped_id),
        Some(Some("360p".to_owned()))
    );
    let before = net.video_received(capped).len();
    assert!(before > 30, "the capped viewer plays: {before} frames");

    // Lifted: back to the source at its next keyframe, without a freeze.
    let now = net.now;
    net.sfu.set_max_layer(now, &capped_id, None).unwrap();
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, &mut push);
    assert_eq!(net.sfu.subscriber_layer(&capped_id), Some(None));
    assert!(net.video_received(capped).len() > before + 40);
    assert!(net.sfu.counters().layer_switches >= 1);

    // Capped again, then the rendition falls a second behind the source:
    // the viewer is moved to the layer that keeps pace.
    let now = net.now;
    net.sfu
        .set_max_layer(now, &capped_id, Some("360p"))
        .unwrap();
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, &mut push);
    assert_eq!(
        net.sfu.subscriber_layer(&capped_id),
        Some(Some("360p".to_owned()))
    );
    lag.set(Duration::from_secs(1));
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, &mut push);
    assert_eq!(
        net.sfu.subscriber_layer(&capped_id),
        Some(None),
        "off the layer that fell behind"
    );

    // Bad names and unknown sessions are refused and change nothing.
    let now = net.now;
    for bad in ["", "much-too-long", "3 60p"] {
        assert_eq!(
            net.sfu.set_max_layer(now, &capped_id, Some(bad)),
            Err(SfuError::BadLayer(bad.to_owned()))
        );
    }
    assert_eq!(
        net.sfu
            .set_max_layer(now, &weir_protocol::SessionId::random(), Some("360p")),
        Err(SfuError::UnknownSession)
    );
    assert_eq!(net.sfu.subscriber_layer(&capped_id), Some(None));
}

#[test]
fn a_frame_for_many_viewers_goes_out_as_it_is_made_not_after_the_last_copy() {
    const VIEWERS: usize = 60;
    let mut net = Net::new();
    let (p, subs) = net.live_room("r1", VIEWERS);
    assert!(subs.iter().all(|s| net.peers[*s].connected));
    let got_before: Vec<usize> = subs.iter().map(|s| net.video_received(*s).len()).collect();

    // The publisher sends a keyframe (several packets for each viewer); the
    // SFU is fed its datagrams without anything being taken from it.
    let to_sfu = net.frame_to_sfu(p, 3_000, true);
    assert!(to_sfu.len() >= 3, "a keyframe is several packets");
    let before = net.sfu.counters().datagrams_out;
    for (_, from, to, bytes) in &to_sfu {
        net.sfu.handle_input(Input::Receive {
            now: net.now,
            source: *from,
            destination: *to,
            contents: bytes,
        });
    }
    let made_before_taking = net.sfu.counters().datagrams_out - before;
    net.drain_sfu();
    let made = net.sfu.counters().datagrams_out - before;
    // Every viewer's copy is made, but only a first chunk of them before
    // the caller starts taking datagrams out to send.
    assert!(made >= 3 * VIEWERS as u64, "made {made}");
    assert!(
        made_before_taking < made / 2,
        "{made_before_taking} of {made} datagrams were made before any was taken"
    );
    // And every viewer gets the keyframe.
    let end = net.now + Duration::from_millis(100);
    net.run_until(end, |_| {});
    for (s, before) in subs.iter().zip(got_before) {
        let video = net.video_received(*s);
        assert!(
            video.len() > before && video[before..].contains(&true),
            "viewer {s}"
        );
    }
}

#[test]
fn no_viewer_is_always_served_last() {
    const VIEWERS: usize = 4;
    let mut net = Net::new();
    let (p, subs) = net.live_room("r1", VIEWERS);
    let viewers: Vec<std::net::SocketAddr> = subs.iter().map(|s| net.peers[*s].addr).collect();
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    for n in 0..2 * VIEWERS as u64 {
        // A video frame (and its audio) from the publisher, into the SFU.
        for (_, from, to, bytes) in &net.frame_to_sfu(p, 3_000 + 3 * n, false) {
            net.deliver(*from, *to, bytes);
        }
        // The order the viewers' video copies left in (audio is the small one).
        let order: Vec<_> = net
            .wire
            .iter()
            .filter(|w| viewers.contains(&w.2) && w.3.len() > 300)
            .map(|w| w.2)
            .collect();
        assert_eq!(order.len(), VIEWERS, "one video packet each");
        firsts.push(order[0]);
        lasts.push(order[VIEWERS - 1]);
        let t = net.now + Duration::from_millis(100);
        net.run_until(t, |_| {});
    }
    for v in &viewers {
        assert!(lasts.contains(v), "{v} was never served last: {lasts:?}");
        assert!(firsts.contains(v), "{v} was never served first: {firsts:?}");
    }
}

#[test]
fn a_frames_packets_to_a_viewer_are_equally_long_so_they_can_leave_in_one_gso_send() {
    use std::time::SystemTime;
    use str0m::rtp::AbsCaptureTime;
    use weir_sfu::MediaFrame;

    // A source with capture times (as SRT ingest and the load test give):
    // the capture time must not make one packet of a frame longer than the
    // others, or GSO (equal segments) cuts the viewer's copy in two.
    fn frame(now: Instant, n: u64, keyframe: bool, len: usize) -> MediaFrame {
        MediaFrame {
            capture_time: Some(AbsCaptureTime {
                capture_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + n),
                clock_offset: None,
            }),
            ..h264_frame(now, n, keyframe, len)
        }
    }

    let mut net = Net::new();
    let (s, _) = net.subscribe("live");
    let (source, _) = net.sfu.accept_source(room("live"), "streamer").unwrap();
    let mut n = 0u64;
    let end = net.now + Duration::from_secs(2);
    net.run_until(end, |net| {
        if !net.peers[s].connected {
            return;
        }
        let f = frame(net.now, n, n.is_multiple_of(30), 600);
        net.sfu.push_frame(net.now, &source, f).unwrap();
        net.drain_sfu();
        n += 1;
    });
    assert!(
        net.video_received(s).len() > 10,
        "the viewer plays before the frame under test"
    );

    net.wire.clear();
    let f = frame(net.now, n, false, 4000);
    net.sfu.push_frame(net.now, &source, f).unwrap();
    net.drain_sfu();
    let viewer = net.peers[s].addr;
    // Media only (RTCP is far shorter than a full packet).
    let lens: Vec<usize> = net
        .wire
        .iter()
        .filter(|w| w.2 == viewer && w.3.len() > 200)
        .map(|w| w.3.len())
        .collect();
    assert!(lens.len() >= 4, "4000 bytes in full packets: {lens:?}");
    let (last, full) = lens.split_last().unwrap();
    assert!(
        full.iter().all(|l| *l == full[0]) && *last <= full[0],
        "every packet but the last as long as the first: {lens:?}"
    );
}

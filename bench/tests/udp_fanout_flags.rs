//! `udp_fanout` refuses bad flags with a message naming the flag, before it
//! binds a socket or sends anything.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_udp_fanout"))
        .args(args)
        .output()
        .expect("udp_fanout runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    for (args, flag) in [
        (&["--fanout", "0"][..], "--fanout"),
        (&["--burst", "0"], "--burst"),
        (&["--burst", "65"], "--burst"),
        (&["--keyframe-burst", "0"], "--keyframe-burst"),
        (&["--keyframe-burst", "65"], "--keyframe-burst"),
        (&["--size", "4"], "--size"),
        (&["--size", "5000"], "--size"),
        (&["--seconds", "0"], "--seconds"),
        (&["--keyframe-every", "x"], "--keyframe-every"),
        (&["--gso", "on"], "--gso"),
        (&["--audio-pps", "200"], "--audio-pps"),
        (&["--audio-size", "4"], "--audio-size"),
        (&["--audio-size", "5000"], "--audio-size"),
    ] {
        let (ok, stderr) = run(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

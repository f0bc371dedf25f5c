// Weir publish page: camera + microphone -> WHIP.
//
// Query parameters:
//   ?autostart=1        start publishing at once, without a click
//   ?codec=h264|vp8     video codec preference (also vp9, av1)
//
// window.weir (read by automated tests, refreshed every second):
//   { page: 'publish', room, state, error, codec, connectionState, endpoint, session, rttMs,
//     stats: { video: { framesSent, packetsSent, bytesSent, framesPerSecond,
//                       frameWidth, frameHeight, bitrateKbps, codec, qualityLimitationReason },
//              audio: { packetsSent, bytesSent, codec } } }
//   state: 'idle' | 'connecting' | 'connected' | 'disconnected' | 'reconnecting' | 'failed'
(function () {
  'use strict';
  const W = window.WeirClient;

  /** Seconds of 'failed'/'disconnected' before we set up a fresh session. */
  const RECONNECT_GRACE_MS = 5000;
  /** Pause between failed reconnection attempts. */
  const RETRY_MS = 3000;
  const CODECS = { h264: 'video/H264', vp8: 'video/VP8', vp9: 'video/VP9', av1: 'video/AV1' };

  const $ = (id) => document.getElementById(id);
  const ui = {
    room: $('room'), playLink: $('play-link'), preview: $('preview'),
    start: $('start'), stop: $('stop'), status: $('status'), stats: $('stats'),
  };

  const room = W.roomFromPath();
  const wantedCodec = (W.param('codec') || '').trim().toLowerCase() || null;

  function emptyStats() {
    return {
      video: {
        framesSent: 0, packetsSent: 0, bytesSent: 0, framesPerSecond: null, frameWidth: null,
        frameHeight: null, bitrateKbps: null, codec: null, qualityLimitationReason: null,
      },
      audio: { packetsSent: 0, bytesSent: 0, codec: null },
    };
  }

  const weir = {
    page: 'publish',
    room,
    state: 'idle',
    error: null,
    codec: wantedCodec,
    connectionState: null,
    endpoint: null,
    session: null,
    rttMs: null,
    stats: emptyStats(),
  };
  window.weir = weir;

  // The current session. `gen` increments on every start/stop so that async
  // work from a superseded attempt can notice and give up.
  let gen = 0;
  let live = false;          // the user wants to be on air
  let stream = null;         // MediaStream from getUserMedia, kept across reconnects
  let pc = null;
  let token = null;
  let unwatch = null;
  const rate = new W.RateMeter();

  function setState(state, detail) {
    weir.state = state;
    W.renderStatus(ui.status, state, detail, weir.error);
    ui.start.disabled = live;
    ui.stop.disabled = !live;
  }

  function fail(message) {
    weir.error = message;
    setState('failed');
  }

  /** Put the wanted codec first on the video transceiver; keep RTX/RED/FEC. */
  function applyCodecPreference(transceiver, wanted) {
    const mime = CODECS[wanted];
    if (!mime) throw new W.WeirError(`unknown codec "${wanted}" (use h264, vp8, vp9 or av1)`);
    if (!('setCodecPreferences' in transceiver) || !RTCRtpSender.getCapabilities) {
      throw new W.WeirError('this browser cannot choose a codec (no setCodecPreferences)');
    }
    const caps = RTCRtpSender.getCapabilities('video').codecs;
    const preferred = caps.filter((c) => c.mimeType.toLowerCase() === mime.toLowerCase());
    if (preferred.length === 0) throw new W.WeirError(`this browser cannot send ${mime}`);
    if (mime === 'video/H264') {
      // Constrained baseline with packetization-mode=1 is what everyone decodes.
      const score = (c) => {
        const f = c.sdpFmtpLine || '';
        return (f.includes('packetization-mode=1') ? 0 : 2) + (/profile-level-id=42e0/i.test(f) ? 0 : 1);
      };
      preferred.sort((a, b) => score(a) - score(b));
    }
    const helpers = caps.filter((c) => /\/(rtx|red|ulpfec|flexfec-03)$/i.test(c.mimeType));
    transceiver.setCodecPreferences([...preferred, ...helpers]);
  }

  async function getMedia() {
    if (stream && stream.getTracks().every((t) => t.readyState === 'live')) return stream;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new W.WeirError('camera access is unavailable (page must be served over https or from localhost)');
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      });
    } catch (e) {
      throw new W.WeirError(`camera/microphone: ${e.name}: ${e.message}`);
    }
    ui.preview.srcObject = stream;
    ui.preview.play().catch(() => {});
    return stream;
  }

  /** Close the current peer connection and DELETE its session. */
  function teardown() {
    if (unwatch) { unwatch(); unwatch = null; }
    if (weir.session) W.deleteSession(weir.session, token);
    weir.session = null;
    weir.endpoint = null;
    if (pc) { pc.close(); pc = null; }
    weir.connectionState = null;
    weir.rttMs = null;
    // Counters belong to one peer connection: start again from zero.
    weir.stats = emptyStats();
    rate.reset();
  }

  /** One publishing attempt (used by Start and by automatic reconnection). */
  async function connect(reconnecting) {
    const my = ++gen;
    const stale = () => my !== gen;
    teardown();
    weir.error = null;
    setState(reconnecting ? 'reconnecting' : 'connecting', 'opening camera');
    try {
      if (!room) throw new W.WeirError('no room in the URL (expected /publish/ROOM)');
      const media = await getMedia();
      if (stale()) return;

      setState(weir.state, 'asking the control plane for a node');
      const assignment = await W.assign('publisher', room);
      if (stale()) return;
      token = assignment.token;

      const conn = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
      pc = conn;
      for (const track of media.getTracks()) {
        const tr = conn.addTransceiver(track, { direction: 'sendonly', streams: [media] });
        if (track.kind === 'video' && wantedCodec) applyCodecPreference(tr, wantedCodec);
      }
      conn.addEventListener('connectionstatechange', () => {
        if (stale()) return;
        weir.connectionState = conn.connectionState;
        const s = conn.connectionState;
        if (s === 'connected') setState('connected', `on air via ${weir.endpoint ? weir.endpoint.node_id || weir.endpoint.url : 'node'}`);
        else if (s === 'disconnected') setState('disconnected', 'connection interrupted, waiting for it to recover');
        else if (s === 'failed') setState('failed', 'connection failed, will retry');
      });

      setState(weir.state, 'sending offer (WHIP)');
      const res = await W.negotiate(conn, assignment, 'whip', stale);
      if (stale()) { W.deleteSession(res.location, token); return; }
      weir.endpoint = res.endpoint;
      weir.session = res.location;
      setState(weir.state, `ICE/DTLS with ${res.endpoint.node_id || res.endpoint.url}`);

      // A connection lost for a while gets a brand-new session (new token too).
      unwatch = W.watchConnection(conn, RECONNECT_GRACE_MS, () => {
        if (!stale() && live) connect(true);
      });
    } catch (e) {
      if (stale()) return;
      console.error('weir publish:', e);
      teardown();
      if (reconnecting && live) {
        // We were on air before: keep trying until the user presses Stop.
        weir.error = e.message;
        setState('reconnecting', `retrying in ${RETRY_MS / 1000} s`);
        setTimeout(() => { if (!stale() && live) connect(true); }, RETRY_MS);
        return;
      }
      live = false;
      fail(e.message);
    }
  }

  function start() {
    if (live) return;
    live = true;
    connect(false);
  }

  function stop() {
    live = false;
    gen++;
    teardown();
    if (stream) {
      for (const t of stream.getTracks()) t.stop();
      stream = null;
      ui.preview.srcObject = null;
    }
    weir.error = null;
    setState('idle', 'stopped');
  }

  // ---- stats ------------------------------------------------------------

  async function pollStats() {
    const conn = pc;
    if (!conn) { renderStats(); return; }
    let report;
    try {
      report = await conn.getStats();
    } catch (_) {
      return;
    }
    if (conn !== pc) return;
    const v = W.findStat(report, 'outbound-rtp', 'video');
    const a = W.findStat(report, 'outbound-rtp', 'audio');
    const sv = weir.stats.video;
    const sa = weir.stats.audio;
    if (v) {
      sv.framesSent = v.framesSent || 0;
      sv.packetsSent = v.packetsSent || 0;
      sv.bytesSent = v.bytesSent || 0;
      sv.framesPerSecond = v.framesPerSecond ?? null;
      sv.frameWidth = v.frameWidth ?? null;
      sv.frameHeight = v.frameHeight ?? null;
      sv.bitrateKbps = rate.sample(v.bytesSent, v.timestamp);
      sv.codec = W.codecName(report, v.codecId);
      sv.qualityLimitationReason = v.qualityLimitationReason ?? null;
    }
    if (a) {
      sa.packetsSent = a.packetsSent || 0;
      sa.bytesSent = a.bytesSent || 0;
      sa.codec = W.codecName(report, a.codecId);
    }
    const pair = W.selectedPair(report);
    weir.rttMs = pair && pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null;
    renderStats();
  }

  function renderStats() {
    const sv = weir.stats.video;
    const sa = weir.stats.audio;
    const f = W.fmt;
    W.renderStats(ui.stats, [
      { title: 'Connection', rows: [
        ['state', weir.connectionState || weir.state],
        ['node', weir.endpoint ? weir.endpoint.node_id || weir.endpoint.url : null],
        ['RTT', f.ms(weir.rttMs)],
      ] },
      { title: 'Video out', rows: [
        ['codec', sv.codec],
        ['bitrate', f.kbps(sv.bitrateKbps)],
        ['fps', f.num(sv.framesPerSecond)],
        ['resolution', f.res(sv.frameWidth, sv.frameHeight)],
        ['frames sent', sv.framesSent],
        ['packets sent', sv.packetsSent],
        ['limited by', sv.qualityLimitationReason],
      ] },
      { title: 'Audio out', rows: [
        ['codec', sa.codec],
        ['packets sent', sa.packetsSent],
      ] },
    ]);
  }

  // ---- wiring -----------------------------------------------------------

  ui.room.textContent = room ? `room: ${room}` : 'no room';
  if (room) {
    ui.playLink.href = `/play/${encodeURIComponent(room)}`;
  } else {
    ui.playLink.hidden = true;
  }
  ui.start.addEventListener('click', start);
  ui.stop.addEventListener('click', stop);
  // Best effort: tell the server the session is over when the tab goes away.
  window.addEventListener('pagehide', () => {
    live = false;
    gen++;
    teardown();
  });
  setInterval(pollStats, 1000);
  renderStats();

  if (!room) {
    fail('no room in the URL (expected /publish/ROOM)');
    ui.start.disabled = true;
  } else if (W.param('autostart') === '1' || W.param('autostart') === 'true') {
    start();
  } else {
    setState('idle', 'press Start to go live');
  }
})();

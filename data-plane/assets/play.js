// Weir play page: WHEP -> <video>, or HLS.
//
// Connects on load; reconnects by itself when the connection stays 'failed' or
// 'disconnected' for RECONNECT_GRACE_MS, when it never comes up, or (with
// back-off) when an attempt fails, e.g. because the room is not live yet.
//
// HLS: `?protocol=hls` plays the room's HLS (`/hls/ROOM/master.m3u8`, or the
// `hls` endpoint the control plane names) instead of WebRTC; `?protocol=webrtc`
// never leaves WebRTC. By default (`auto`) the page falls back to HLS when the
// browser has no WebRTC, or when a WebRTC attempt fails while the room has
// HLS; the Reconnect button tries WebRTC again. HLS plays through hls.js
// (vendored under /assets, Apache-2.0, loaded only when needed) wherever Media
// Source Extensions exist, natively otherwise (iOS Safari), or natively when
// asked with `&hls_player=native`.
//
// window.weir (read by automated tests, refreshed every second):
//   { page: 'play', room, state, error, ttffMs, attempts, connectionState,
//     endpoint, session, muted, rttMs,
//     stats: { video: { framesDecoded, framesPerSecond, frameWidth, frameHeight,
//                       packetsReceived, packetsLost, bytesReceived, bitrateKbps,
//                       jitter, freezeCount, nackCount, pliCount, keyFramesDecoded, codec,
//                       framesReceived, framesDropped },
//              audio: { packetsReceived, packetsLost, jitter, concealmentRatio, codec } } }
//   protocol: 'webrtc' | 'hls' (what plays now); fallback: why HLS replaced
//   WebRTC (null unless it did); hls: { url, player: 'native'|'hls.js',
//   level, levels: [{width, height, bitrate}], latencyS } while on HLS
//   (framesDecoded, fps and size then come from the <video> element).
//   state: 'idle' | 'connecting' | 'connected' | 'disconnected' | 'reconnecting' | 'failed'
//   ttffMs: ms from the start of the current attempt (assign-viewer call) to the
//           first video frame presented; null until then. Counters belong to the
//           current attempt's peer connection and restart from 0 on reconnect.
(function () {
  'use strict';
  const W = window.WeirClient;

  const RECONNECT_GRACE_MS = 5000;
  /** An attempt that has not reached 'connected' by then is abandoned. */
  const CONNECT_TIMEOUT_MS = 15000;
  const RETRY_MIN_MS = 2000;
  const RETRY_MAX_MS = 15000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    room: $('room'), publishLink: $('publish-link'), video: $('video'),
    unmute: $('unmute'), reconnect: $('reconnect'), status: $('status'), stats: $('stats'),
  };

  const room = W.roomFromPath();

  function emptyStats() {
    return {
      video: {
        framesDecoded: 0, framesPerSecond: null, frameWidth: null, frameHeight: null,
        packetsReceived: 0, packetsLost: 0, bytesReceived: 0, bitrateKbps: null,
        jitter: null, freezeCount: 0, nackCount: 0, pliCount: 0, keyFramesDecoded: 0, codec: null,
        framesReceived: 0, framesDropped: 0,
      },
      audio: { packetsReceived: 0, packetsLost: 0, jitter: null, concealmentRatio: null, codec: null },
    };
  }

  const weir = {
    page: 'play',
    room,
    state: 'idle',
    error: null,
    ttffMs: null,
    attempts: 0,
    connectionState: null,
    endpoint: null,
    session: null,
    muted: true,
    rttMs: null,
    protocol: 'webrtc',
    fallback: null,
    hls: null,
    stats: emptyStats(),
  };
  window.weir = weir;

  /** 'auto' | 'webrtc' | 'hls', from ?protocol=. */
  const wanted = (() => {
    const p = (W.param('protocol') || 'auto').toLowerCase();
    return p === 'hls' || p === 'webrtc' ? p : 'auto';
  })();
  let hlsPlayer = null;     // hls.js instance while on HLS (non-native)
  let lastFrames = null;    // {frames, at} for the HLS fps estimate

  let gen = 0;              // bumps on every attempt; stale async work checks it
  let pc = null;
  let token = null;
  let unwatch = null;
  let t0 = 0;               // performance.now() at the start of the current attempt
  let frameCb = null;       // pending requestVideoFrameCallback handle
  let retryTimer = null;
  let connectTimer = null;
  let retryDelay = RETRY_MIN_MS;
  const rate = new W.RateMeter();

  function setState(state, detail) {
    weir.state = state;
    W.renderStatus(ui.status, state, detail, weir.error);
  }

  function clearTimers() {
    if (retryTimer !== null) { clearTimeout(retryTimer); retryTimer = null; }
    if (connectTimer !== null) { clearTimeout(connectTimer); connectTimer = null; }
  }

  /** Close the current peer connection and DELETE its session; stop HLS. */
  function teardown() {
    clearTimers();
    stopHls();
    if (unwatch) { unwatch(); unwatch = null; }
    if (frameCb !== null && 'cancelVideoFrameCallback' in ui.video) ui.video.cancelVideoFrameCallback(frameCb);
    frameCb = null;
    if (weir.session) W.deleteSession(weir.session, token);
    weir.session = null;
    weir.endpoint = null;
    if (pc) { pc.close(); pc = null; }
    weir.connectionState = null;
  }

  /** Schedule another attempt with exponential back-off. */
  function scheduleRetry(my) {
    const delay = retryDelay;
    retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
    setState(weir.state, `retrying in ${Math.round(delay / 1000)} s`);
    retryTimer = setTimeout(() => {
      retryTimer = null;
      if (my === gen) connect(true);
    }, delay);
  }

  /** Arrange for ttffMs to be set when the first frame of this attempt is shown. */
  function watchFirstFrame(my) {
    const mark = () => {
      if (my !== gen || weir.ttffMs !== null) return;
      weir.ttffMs = Math.round(performance.now() - t0);
      console.log(`weir play: first frame after ${weir.ttffMs} ms`);
      renderStats();
    };
    if ('requestVideoFrameCallback' in ui.video) {
      frameCb = ui.video.requestVideoFrameCallback(() => { frameCb = null; mark(); });
    } else {
      ui.video.addEventListener('loadeddata', mark, { once: true });
    }
  }

  async function connect(reconnecting) {
    if (wanted === 'hls' || (wanted === 'auto' && typeof RTCPeerConnection === 'undefined')) {
      if (wanted !== 'hls') weir.fallback = 'this browser has no WebRTC';
      playHls(reconnecting);
      return;
    }
    const my = ++gen;
    const stale = () => my !== gen;
    teardown();
    weir.protocol = 'webrtc';
    weir.hls = null;
    weir.attempts += 1;
    weir.error = null;
    weir.ttffMs = null;
    weir.stats = emptyStats();
    weir.rttMs = null;
    rate.reset();
    t0 = performance.now();
    setState(reconnecting ? 'reconnecting' : 'connecting', 'asking the control plane for a node');

    try {
      if (!room) throw new W.WeirError('no room in the URL (expected /play/ROOM)');
      const assignment = await W.assign('viewer', room);
      if (stale()) return;
      token = assignment.token;

      const conn = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
      pc = conn;
      conn.addTransceiver('video', { direction: 'recvonly' });
      conn.addTransceiver('audio', { direction: 'recvonly' });

      // Our own MediaStream: the answer may carry no msid, so event.streams can be empty.
      const media = new MediaStream();
      conn.addEventListener('track', (ev) => {
        if (stale()) return;
        media.addTrack(ev.track);
        if (ui.video.srcObject !== media) {
          ui.video.srcObject = media;
          watchFirstFrame(my);
        }
        ui.video.play().catch((e) => {
          // Only happens if autoplay is blocked despite muted playback.
          console.warn('weir play: autoplay blocked:', e.message);
          setState(weir.state, 'click the video to start playback');
        });
      });

      conn.addEventListener('connectionstatechange', () => {
        if (stale()) return;
        const s = conn.connectionState;
        weir.connectionState = s;
        if (s === 'connected') {
          if (connectTimer !== null) { clearTimeout(connectTimer); connectTimer = null; }
          retryDelay = RETRY_MIN_MS;
          setState('connected', `playing from ${weir.endpoint ? weir.endpoint.node_id || weir.endpoint.url : 'node'}`);
        } else if (s === 'disconnected') {
          setState('disconnected', 'connection interrupted, waiting for it to recover');
        } else if (s === 'failed') {
          setState('failed', 'connection failed, reconnecting soon');
        }
      });

      setState(weir.state, 'sending offer (WHEP)');
      const res = await W.negotiate(conn, assignment, 'whep', stale);
      if (stale()) { W.deleteSession(res.location, token); return; }
      weir.endpoint = res.endpoint;
      weir.session = res.location;
      setState(weir.state, `ICE/DTLS with ${res.endpoint.node_id || res.endpoint.url}`);

      unwatch = W.watchConnection(conn, RECONNECT_GRACE_MS, (s) => {
        if (stale()) return;
        console.warn(`weir play: connection ${s} for ${RECONNECT_GRACE_MS} ms, reconnecting`);
        connect(true);
      });
      connectTimer = setTimeout(async () => {
        connectTimer = null;
        if (stale() || conn.connectionState === 'connected') return;
        weir.error = `no connection after ${CONNECT_TIMEOUT_MS / 1000} s (ICE/DTLS state: ${conn.connectionState})`;
        console.warn('weir play:', weir.error);
        setState('failed');
        if (await fallBackToHls(my, weir.error)) return;
        connect(true);
      }, CONNECT_TIMEOUT_MS);
    } catch (e) {
      if (stale()) return;
      console.error('weir play:', e);
      teardown();
      weir.error = e.message;
      setState('failed');
      if (await fallBackToHls(my, e.message)) return;
      scheduleRetry(my);
    }
  }

  // ---- HLS ----------------------------------------------------------------

  /** Where the room's HLS is: the control plane's hls endpoint, else this node. */
  async function hlsUrl() {
    try {
      const a = await W.assign('viewer', room);
      const ep = a.endpoints.find((e) => e && e.kind === 'hls' && typeof e.url === 'string');
      if (ep) return ep.url;
    } catch (e) {
      console.warn('weir play: no HLS endpoint from the control plane:', e.message);
    }
    return `${location.origin}/hls/${encodeURIComponent(room)}/master.m3u8`;
  }

  /** In auto mode, after a failed WebRTC attempt: switch to HLS if the room has it. */
  async function fallBackToHls(my, why) {
    if (wanted !== 'auto' || my !== gen) return false;
    let url;
    try {
      url = await hlsUrl();
      const r = await fetch(url, { method: 'GET', cache: 'no-store' });
      if (!r.ok) return false;
    } catch (_) {
      return false;
    }
    if (my !== gen) return true;
    console.warn(`weir play: WebRTC failed (${why}); falling back to HLS`);
    weir.fallback = `WebRTC failed: ${why}`;
    playHls(true, url);
    return true;
  }

  let hlsJsLoading = null;
  /** Loads the vendored hls.js once. */
  function loadHlsJs() {
    if (window.Hls) return Promise.resolve(window.Hls);
    if (!hlsJsLoading) {
      hlsJsLoading = new Promise((resolve, reject) => {
        const el = document.createElement('script');
        el.src = '/assets/hls.light.min.js';
        el.onload = () => (window.Hls ? resolve(window.Hls) : reject(new W.WeirError('hls.js did not load')));
        el.onerror = () => reject(new W.WeirError('cannot load /assets/hls.light.min.js'));
        document.head.appendChild(el);
      });
    }
    return hlsJsLoading;
  }

  function stopHls() {
    if (hlsPlayer) { hlsPlayer.destroy(); hlsPlayer = null; }
    if (weir.protocol === 'hls' && ui.video.src) {
      ui.video.removeAttribute('src');
      ui.video.load();
    }
    lastFrames = null;
  }

  /** Plays the room over HLS; retries with back-off while it has none. */
  async function playHls(reconnecting, knownUrl) {
    const my = ++gen;
    const stale = () => my !== gen;
    teardown();
    weir.protocol = 'hls';
    weir.attempts += 1;
    weir.error = null;
    weir.ttffMs = null;
    weir.stats = emptyStats();
    weir.rttMs = null;
    t0 = performance.now();
    setState(reconnecting ? 'reconnecting' : 'connecting', 'loading HLS');
    try {
      if (!room) throw new W.WeirError('no room in the URL (expected /play/ROOM)');
      const url = knownUrl || await hlsUrl();
      if (stale()) return;
      weir.hls = { url, player: null, level: null, levels: [], latencyS: null };
      const canNative = ui.video.canPlayType('application/vnd.apple.mpegurl') !== '';
      const hasMse = !!(window.MediaSource || window.ManagedMediaSource);
      const native = canNative && (!hasMse || W.param('hls_player') === 'native');
      ui.video.srcObject = null;
      watchFirstFrame(my);
      const playing = () => {
        if (stale()) return;
        retryDelay = RETRY_MIN_MS;
        setState('connected', `playing HLS (${weir.hls.player})`);
      };
      ui.video.addEventListener('playing', playing, { once: true });
      if (native) {
        weir.hls.player = 'native';
        ui.video.src = url;
        ui.video.addEventListener('error', () => {
          if (stale()) return;
          weir.error = `HLS playback failed (${ui.video.error ? ui.video.error.message || ui.video.error.code : 'error'})`;
          setState('failed');
          hlsRetry(my);
        }, { once: true });
      } else {
        const Hls = await loadHlsJs();
        if (stale()) return;
        if (!Hls.isSupported()) throw new W.WeirError('this browser can play neither WebRTC nor HLS (no MSE)');
        weir.hls.player = 'hls.js';
        const hls = new Hls({ liveSyncDurationCount: 3, manifestLoadingMaxRetry: 2 });
        hlsPlayer = hls;
        hls.on(Hls.Events.MANIFEST_PARSED, (_, data) => {
          weir.hls.levels = data.levels.map((l) => ({ width: l.width, height: l.height, bitrate: l.bitrate }));
        });
        hls.on(Hls.Events.LEVEL_SWITCHED, (_, data) => { weir.hls.level = data.level; });
        hls.on(Hls.Events.ERROR, (_, data) => {
          if (stale() || !data.fatal) return;
          weir.error = `HLS: ${data.details}${data.response && data.response.code ? ` (HTTP ${data.response.code})` : ''}`;
          console.warn('weir play:', weir.error);
          setState('failed');
          hlsRetry(my);
        });
        hls.loadSource(url);
        hls.attachMedia(ui.video);
      }
      ui.video.play().catch(() => {});
    } catch (e) {
      if (stale()) return;
      console.error('weir play:', e);
      weir.error = e.message;
      setState('failed');
      hlsRetry(my);
    }
  }

  function hlsRetry(my) {
    const delay = retryDelay;
    retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
    setState(weir.state, `retrying HLS in ${Math.round(delay / 1000)} s`);
    retryTimer = setTimeout(() => {
      retryTimer = null;
      if (my === gen) playHls(true, weir.hls && weir.hls.url);
    }, delay);
  }

  /** Stats of HLS playback, from the <video> element and hls.js. */
  function pollHlsStats() {
    const v = ui.video;
    const sv = weir.stats.video;
    const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    const frames = q ? q.totalVideoFrames - q.droppedVideoFrames : (v.webkitDecodedFrameCount || 0);
    const now = performance.now();
    if (lastFrames && now > lastFrames.at) {
      sv.framesPerSecond = Math.round(((frames - lastFrames.frames) * 1000 / (now - lastFrames.at)) * 10) / 10;
    }
    lastFrames = { frames, at: now };
    sv.framesDecoded = frames;
    sv.framesReceived = q ? q.totalVideoFrames : frames;
    sv.framesDropped = q ? q.droppedVideoFrames : 0;
    sv.frameWidth = v.videoWidth || null;
    sv.frameHeight = v.videoHeight || null;
    if (hlsPlayer && weir.hls) {
      const level = hlsPlayer.levels && hlsPlayer.levels[hlsPlayer.currentLevel];
      weir.hls.level = hlsPlayer.currentLevel;
      weir.hls.latencyS = Number.isFinite(hlsPlayer.latency) ? Math.round(hlsPlayer.latency * 10) / 10 : null;
      if (level) {
        sv.bitrateKbps = Math.round(level.bitrate / 1000);
        sv.codec = level.videoCodec || null;
      }
    }
    renderStats();
  }

  // ---- stats ------------------------------------------------------------

  async function pollStats() {
    if (weir.protocol === 'hls') { pollHlsStats(); return; }
    const conn = pc;
    if (!conn) { renderStats(); return; }
    let report;
    try {
      report = await conn.getStats();
    } catch (_) {
      return;
    }
    if (conn !== pc) return;
    const v = W.findStat(report, 'inbound-rtp', 'video');
    const a = W.findStat(report, 'inbound-rtp', 'audio');
    const sv = weir.stats.video;
    const sa = weir.stats.audio;
    if (v) {
      sv.framesDecoded = v.framesDecoded || 0;
      sv.framesPerSecond = v.framesPerSecond ?? null;
      sv.frameWidth = v.frameWidth ?? null;
      sv.frameHeight = v.frameHeight ?? null;
      sv.packetsReceived = v.packetsReceived || 0;
      sv.packetsLost = v.packetsLost || 0;
      sv.bytesReceived = v.bytesReceived || 0;
      sv.bitrateKbps = rate.sample(v.bytesReceived, v.timestamp);
      sv.jitter = v.jitter ?? null;
      sv.freezeCount = v.freezeCount || 0;
      sv.nackCount = v.nackCount || 0;
      sv.pliCount = v.pliCount || 0;
      sv.keyFramesDecoded = v.keyFramesDecoded || 0;
      sv.framesReceived = v.framesReceived || 0;
      sv.framesDropped = v.framesDropped || 0;
      sv.codec = W.codecName(report, v.codecId);
    }
    if (a) {
      sa.packetsReceived = a.packetsReceived || 0;
      sa.packetsLost = a.packetsLost || 0;
      sa.jitter = a.jitter ?? null;
      sa.concealmentRatio = a.totalSamplesReceived > 0 ? (a.concealedSamples || 0) / a.totalSamplesReceived : null;
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
        ['protocol', weir.protocol === 'hls' ? `HLS (${(weir.hls && weir.hls.player) || '…'})` : 'WebRTC (WHEP)'],
        ['fallback', weir.fallback],
        ['HLS latency', weir.hls && weir.hls.latencyS != null ? `${weir.hls.latencyS} s` : null],
        ['state', weir.connectionState || weir.state],
        ['node', weir.endpoint ? weir.endpoint.node_id || weir.endpoint.url : null],
        ['time to first frame', f.ms(weir.ttffMs)],
        ['RTT', f.ms(weir.rttMs)],
        ['attempts', weir.attempts],
      ] },
      { title: 'Video in', rows: [
        ['codec', sv.codec],
        ['bitrate', f.kbps(sv.bitrateKbps)],
        ['fps', f.num(sv.framesPerSecond)],
        ['resolution', f.res(sv.frameWidth, sv.frameHeight)],
        ['frames decoded', sv.framesDecoded],
        ['packets lost', sv.packetsLost],
        ['jitter', f.jitter(sv.jitter)],
        ['freezes', sv.freezeCount],
        ['NACKs sent', sv.nackCount],
        ['PLIs sent', sv.pliCount],
      ] },
      { title: 'Audio in', rows: [
        ['codec', sa.codec],
        ['packets received', sa.packetsReceived],
        ['packets lost', sa.packetsLost],
        ['jitter', f.jitter(sa.jitter)],
        ['concealment', f.pct(sa.concealmentRatio)],
      ] },
    ]);
  }

  // ---- wiring -----------------------------------------------------------

  function updateMuteButton() {
    weir.muted = ui.video.muted;
    ui.unmute.textContent = ui.video.muted ? 'Unmute' : 'Mute';
  }

  ui.room.textContent = room ? `room: ${room}` : 'no room';
  if (room) {
    ui.publishLink.href = `/publish/${encodeURIComponent(room)}`;
  } else {
    ui.publishLink.hidden = true;
  }
  ui.unmute.addEventListener('click', () => {
    ui.video.muted = !ui.video.muted;
    ui.video.play().catch(() => {});
    updateMuteButton();
  });
  ui.video.addEventListener('volumechange', updateMuteButton);
  ui.video.addEventListener('click', () => ui.video.play().catch(() => {}));
  ui.reconnect.addEventListener('click', () => {
    retryDelay = RETRY_MIN_MS;
    // From an HLS fallback, the button tries WebRTC again.
    weir.fallback = null;
    connect(false);
  });
  window.addEventListener('pagehide', () => {
    gen++;
    teardown();
  });
  setInterval(pollStats, 1000);
  updateMuteButton();
  renderStats();

  if (room) {
    connect(false);
  } else {
    weir.error = 'no room in the URL (expected /play/ROOM)';
    setState('failed');
    ui.reconnect.disabled = true;
  }
})();

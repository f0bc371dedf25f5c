// Weir play page: WHEP -> <video>, or HLS.
//
// Connects on load; reconnects by itself when the connection stays 'failed' or
// 'disconnected' for RECONNECT_GRACE_MS, when it never comes up, or (with
// back-off) when an attempt fails, e.g. because the room is not live yet.
//
// Failover follows the control plane's ranked endpoints (assign-viewer, sent
// with a viewer id kept in localStorage so the viewer keeps its node version
// and CDN order): WHEP on the first node; when its offer is refused the next
// node is tried at once, and when ICE/DTLS never comes up (or drops before
// the first frame) on a node, that node is skipped and the next one tried;
// a connection that played and then dropped asks for a fresh assignment.
// When the connection drops or the node closes DTLS, the page asks the node
// about its session at once (an empty trickle PATCH): a 410 (the node is
// draining and moved this viewer) or a 404 (the session is gone) sends it
// to a fresh assignment without waiting out the grace. With no node left, HLS:
// the CDNs in the order given (the control plane puts failing CDNs last),
// then the node's own HLS; a CDN that does not answer, or whose playback
// fails, gives way to the next at once. When everything failed, the round
// starts again from a fresh assignment, with back-off.
//
// `?layer=360p` asks for at most that video layer (a rendition of the room's
// transcoding ladder, or a simulcast rid); by default the node picks the best
// layer the viewer's bandwidth allows.
//
// HLS: `?protocol=hls` plays the room's HLS (through the CDNs as above)
// instead of WebRTC; `?protocol=webrtc` never leaves WebRTC. By default
// (`auto`) the page falls back to HLS when the browser has no WebRTC, or when
// WebRTC failed on every node while the room has HLS; the Reconnect button
// tries WebRTC again. HLS plays through hls.js
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
//   WebRTC (null unless it did); hls: { url, cdn (the CDN's name, null for
//   the node itself), player: 'native'|'hls.js', level,
//   levels: [{width, height, bitrate}], latencyS } while on HLS;
//   moves: how many times a draining node sent this viewer elsewhere;
//   viewerId: the id sent with assign-viewer; endpoints: the last ranked
//   list [{kind, url, node_id, cdn}]; failures: the last 20 failed tries,
//   oldest first, [{kind, url, node_id, cdn, error}]
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
    viewerId: null,
    moves: 0,
    endpoints: [],
    failures: [],
    stats: emptyStats(),
  };
  window.weir = weir;

  /** This browser's viewer id: kept in localStorage, else one per page. */
  weir.viewerId = (() => {
    const fresh = () => (window.crypto && crypto.randomUUID
      ? crypto.randomUUID()
      : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);
    try {
      let id = localStorage.getItem('weir.viewer_id');
      if (!id || !/^[\x21-\x7e]{1,128}$/.test(id)) {
        id = fresh();
        localStorage.setItem('weir.viewer_id', id);
      }
      return id;
    } catch (_) {
      return fresh();
    }
  })();

  /** Nodes (by id, or URL) whose WebRTC failed in this round. */
  const failedNodes = new Set();
  /** HLS URLs still to try in this round, best first. */
  let hlsQueue = [];

  function nodeKey(ep) {
    return ep ? ep.node_id || ep.url : null;
  }

  function noteFailure(ep, kind, error) {
    weir.failures.push({
      kind, url: ep ? ep.url : null, node_id: (ep && ep.node_id) || null,
      cdn: (ep && ep.cdn) || null, error,
    });
    if (weir.failures.length > 20) weir.failures.shift();
  }

  /** Asks for a ranked list and remembers it. */
  async function assignViewer() {
    const a = await W.assign('viewer', room, { viewer_id: weir.viewerId });
    weir.endpoints = a.endpoints
      .filter((e) => e && typeof e.url === 'string')
      .map((e) => ({ kind: e.kind, url: e.url, node_id: e.node_id || null, cdn: e.cdn || null }));
    return a;
  }

  /** Something plays: the next failure starts a fresh round. */
  function playing() {
    failedNodes.clear();
  }

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
      const assignment = await assignViewer();
      if (stale()) return;
      token = assignment.token;
      // Nodes that failed in this round are skipped; none left: HLS.
      const whep = assignment.endpoints.filter((e) => e && e.kind === 'whep' && !failedNodes.has(nodeKey(e)));
      if (whep.length === 0) {
        throw new W.WeirError(failedNodes.size > 0
          ? `WebRTC failed on every node offered (${[...failedNodes].join(', ')})`
          : 'control plane returned no whep endpoint');
      }

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
          playing();
          setState('connected', `playing from ${weir.endpoint ? weir.endpoint.node_id || weir.endpoint.url : 'node'}`);
        } else if (s === 'disconnected') {
          setState('disconnected', 'connection interrupted, waiting for it to recover');
        } else if (s === 'failed') {
          setState('failed', 'connection failed, reconnecting soon');
        }
      });

      setState(weir.state, 'sending offer (WHEP)');
      const layer = W.param('layer');
      const offered = layer
        ? whep.map((e) => {
          const u = new URL(e.url, window.location.href);
          u.searchParams.set('layer', layer);
          return { ...e, url: u.href };
        })
        : whep;
      const res = await W.negotiate(conn, { ...assignment, endpoints: offered }, 'whep', stale);
      if (stale()) { W.deleteSession(res.location, token); return; }
      weir.endpoint = res.endpoint;
      weir.session = res.location;
      setState(weir.state, `ICE/DTLS with ${res.endpoint.node_id || res.endpoint.url}`);

      const ep = res.endpoint;
      const sessionUrl = res.location;
      // A drop may be the node ending the session (drain): ask it at once
      // rather than waiting out RECONNECT_GRACE_MS.
      let probing = false;
      const probe = async (why) => {
        if (stale() || probing) return;
        probing = true;
        const state = await W.sessionState(sessionUrl, token);
        probing = false;
        if (stale() || (state !== 'moved' && state !== 'gone')) return;
        if (state === 'moved') weir.moves += 1;
        console.warn(`weir play: ${why}; ${state === 'moved'
          ? 'the node is draining and moved this viewer'
          : 'the node no longer has this session'}: asking for another node`);
        if (weir.session === sessionUrl) weir.session = null; // nothing left to DELETE
        connect(true);
      };
      conn.addEventListener('connectionstatechange', () => {
        const s = conn.connectionState;
        if (s === 'disconnected' || s === 'failed') probe(`connection ${s}`);
      });
      const dtls = conn.getReceivers().map((r) => r.transport).find(Boolean);
      if (dtls) {
        dtls.addEventListener('statechange', () => {
          if (dtls.state === 'closed' || dtls.state === 'failed') probe(`DTLS ${dtls.state}`);
        });
      }
      unwatch = W.watchConnection(conn, RECONNECT_GRACE_MS, (s) => {
        if (stale()) return;
        if (weir.ttffMs !== null) {
          // It played, then dropped: ask again (the scheduler leaves out a
          // node that died), this node included.
          console.warn(`weir play: connection ${s} for ${RECONNECT_GRACE_MS} ms, reconnecting`);
          connect(true);
          return;
        }
        console.warn(`weir play: connection ${s} for ${RECONNECT_GRACE_MS} ms on ${nodeKey(ep)} before any frame, trying the next node`);
        nodeFailed(my, ep, `connection ${s}`);
      });
      connectTimer = setTimeout(() => {
        connectTimer = null;
        if (stale() || conn.connectionState === 'connected') return;
        weir.error = `no connection after ${CONNECT_TIMEOUT_MS / 1000} s (ICE/DTLS state: ${conn.connectionState})`;
        console.warn('weir play:', weir.error);
        setState('failed');
        nodeFailed(my, ep, weir.error);
      }, CONNECT_TIMEOUT_MS);
    } catch (e) {
      if (stale()) return;
      console.error('weir play:', e);
      teardown();
      weir.error = e.message;
      noteFailure(null, 'whep', e.message);
      setState('failed');
      if (await fallBackToHls(my, e.message)) return;
      failedNodes.clear();
      scheduleRetry(my);
    }
  }

  /** WebRTC failed on a node after its offer was taken: skip it, try the next. */
  async function nodeFailed(my, ep, why) {
    if (my !== gen) return;
    failedNodes.add(nodeKey(ep));
    noteFailure(ep, 'whep', why);
    const left = weir.endpoints.filter((e) => e.kind === 'whep' && !failedNodes.has(nodeKey(e)));
    if (left.length > 0) {
      connect(true);
      return;
    }
    if (await fallBackToHls(my, why)) return;
    if (my !== gen) return;
    failedNodes.clear();
    teardown();
    scheduleRetry(my);
  }

  // ---- HLS ----------------------------------------------------------------

  /**
   * Where the room's HLS is, best first: the CDNs in the control plane's
   * order, then this node's own HLS.
   */
  async function hlsCandidates() {
    const urls = [];
    try {
      const a = await assignViewer();
      for (const e of a.endpoints) {
        if (e && e.kind === 'hls' && typeof e.url === 'string') urls.push(e.url);
      }
    } catch (e) {
      console.warn('weir play: no HLS endpoints from the control plane:', e.message);
    }
    urls.push(new URL(`/hls/${encodeURIComponent(room)}/master.m3u8`, location.href).href);
    return [...new Set(urls)];
  }

  function hlsEndpoint(url) {
    return weir.endpoints.find((e) => e.kind === 'hls' && e.url === url) || { url, node_id: null, cdn: null };
  }

  /** Of `urls`, the first whose playlist answers; the rest go to hlsQueue. */
  async function firstWorkingHls(urls, stale) {
    for (let i = 0; i < urls.length; i++) {
      let why;
      try {
        const r = await fetch(urls[i], { method: 'GET', cache: 'no-store' });
        if (r.ok) {
          hlsQueue = urls.slice(i + 1);
          return urls[i];
        }
        why = `HTTP ${r.status}`;
      } catch (e) {
        why = e.message;
      }
      if (stale()) return null;
      console.warn(`weir play: HLS at ${urls[i]} unavailable (${why}), trying the next`);
      noteFailure(hlsEndpoint(urls[i]), 'hls', why);
    }
    hlsQueue = [];
    return null;
  }

  /** In auto mode, after WebRTC failed everywhere: switch to HLS if the room has it. */
  async function fallBackToHls(my, why) {
    if (wanted !== 'auto' || my !== gen) return false;
    const url = await firstWorkingHls(await hlsCandidates(), () => my !== gen);
    if (!url) return false;
    if (my !== gen) return true;
    console.warn(`weir play: WebRTC failed (${why}); falling back to HLS at ${url}`);
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
      const url = knownUrl || await firstWorkingHls(await hlsCandidates(), stale);
      if (stale()) return;
      if (!url) throw new W.WeirError('no HLS endpoint answers (the room may not be live yet)');
      weir.hls = { url, cdn: hlsEndpoint(url).cdn, player: null, level: null, levels: [], latencyS: null };
      const canNative = ui.video.canPlayType('application/vnd.apple.mpegurl') !== '';
      const hasMse = !!(window.MediaSource || window.ManagedMediaSource);
      const native = canNative && (!hasMse || W.param('hls_player') === 'native');
      ui.video.srcObject = null;
      watchFirstFrame(my);
      const started = () => {
        if (stale()) return;
        retryDelay = RETRY_MIN_MS;
        playing();
        setState('connected', `playing HLS (${weir.hls.player}${weir.hls.cdn ? ` via ${weir.hls.cdn}` : ''})`);
      };
      ui.video.addEventListener('playing', started, { once: true });
      if (native) {
        weir.hls.player = 'native';
        ui.video.src = url;
        ui.video.addEventListener('error', () => {
          if (stale()) return;
          weir.error = `HLS playback failed (${ui.video.error ? ui.video.error.message || ui.video.error.code : 'error'})`;
          setState('failed');
          hlsNext(my);
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
          hlsNext(my);
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

  /** HLS playback failed: the next CDN at once, or a new round later. */
  function hlsNext(my) {
    if (my !== gen) return;
    noteFailure(hlsEndpoint(weir.hls && weir.hls.url), 'hls', weir.error);
    if (hlsQueue.length > 0) {
      const next = hlsQueue.shift();
      console.warn(`weir play: moving to the next HLS endpoint, ${next}`);
      playHls(true, next);
      return;
    }
    hlsRetry(my);
  }

  /** A new round from a fresh assignment, with back-off. */
  function hlsRetry(my) {
    const delay = retryDelay;
    retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
    setState(weir.state, `retrying HLS in ${Math.round(delay / 1000)} s`);
    retryTimer = setTimeout(() => {
      retryTimer = null;
      if (my === gen) playHls(true);
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
    qoe.raw = {
      freezes: v ? v.freezeCount || 0 : 0,
      freezeS: v ? v.totalFreezesDuration || 0 : 0,
      vDelay: v ? v.jitterBufferDelay || 0 : 0,
      vCount: v ? v.jitterBufferEmittedCount || 0 : 0,
      aDelay: a ? a.jitterBufferDelay || 0 : 0,
      aCount: a ? a.jitterBufferEmittedCount || 0 : 0,
    };
    renderStats();
  }

  // ---- QoE reports --------------------------------------------------------
  // Every QOE_REPORT_MS the page tells the node that served it what the
  // viewer experienced since its last report (POST /rooms/ROOM/qoe, with the
  // play token): time played, stalls (Chromium's freezes over WebRTC, the
  // video element's 'waiting' spells over HLS) and their length, time to
  // first frame once per playback, and how far video plays behind audio
  // (from the two jitter buffers' delays). The node keeps Prometheus
  // series of them (weir_viewer_*); failures to report are ignored.
  const QOE_REPORT_MS = 5000;
  const qoe = { raw: null, last: null, lastAt: null, ttffSent: null, hlsStalls: 0, hlsStallMs: 0, stallFrom: null };
  ui.video.addEventListener('waiting', () => {
    if (weir.protocol === 'hls' && weir.ttffMs != null && qoe.stallFrom == null) qoe.stallFrom = performance.now();
  });
  ui.video.addEventListener('playing', () => {
    if (qoe.stallFrom != null) {
      qoe.hlsStalls += 1;
      qoe.hlsStallMs += performance.now() - qoe.stallFrom;
      qoe.stallFrom = null;
    }
  });

  function sendQoe(final) {
    const now = performance.now();
    if (!room || !token || weir.ttffMs == null) {
      qoe.lastAt = null;
      return;
    }
    if (qoe.lastAt == null) {
      // Playback (re)started: this report covers from its first frame (the
      // stall and sync counters from now: the first interval has none).
      qoe.lastAt = Math.min(now, t0 + weir.ttffMs);
      qoe.last = qoe.raw;
    }
    const body = { protocol: weir.protocol === 'hls' ? 'hls' : 'webrtc', played_ms: Math.min(Math.round(now - qoe.lastAt), 120000) };
    if (body.protocol === 'webrtc' && qoe.raw && qoe.last) {
      const r = qoe.raw, l = qoe.last;
      body.stalls = Math.max(0, r.freezes - l.freezes);
      body.stall_ms = body.stalls > 0 ? Math.min(Math.round(Math.max(0, r.freezeS - l.freezeS) * 1000), 120000) : 0;
      const vn = r.vCount - l.vCount, an = r.aCount - l.aCount;
      if (vn > 0 && an > 0) {
        const sync = ((r.vDelay - l.vDelay) / vn - (r.aDelay - l.aDelay) / an) * 1000;
        if (Number.isFinite(sync) && Math.abs(sync) <= 10000) body.av_sync_ms = Math.round(sync);
      }
    } else if (body.protocol === 'hls') {
      body.stalls = Math.min(qoe.hlsStalls, 1000);
      body.stall_ms = body.stalls > 0 ? Math.min(Math.round(qoe.hlsStallMs), 120000) : 0;
      qoe.hlsStalls = 0;
      qoe.hlsStallMs = 0;
    }
    if (qoe.ttffSent !== weir.ttffMs) {
      qoe.ttffSent = weir.ttffMs;
      body.ttff_ms = Math.min(weir.ttffMs, 120000);
    }
    qoe.lastAt = now;
    qoe.last = qoe.raw;
    fetch(`/rooms/${encodeURIComponent(room)}/qoe`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: JSON.stringify(body),
      keepalive: !!final,
    }).catch(() => {});
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
        ['CDN', weir.protocol === 'hls' && weir.hls ? weir.hls.cdn || '(the node)' : null],
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
    sendQoe(true);
    gen++;
    teardown();
  });
  setInterval(pollStats, 1000);
  setInterval(() => sendQoe(false), QOE_REPORT_MS);
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

// Weir browser client helpers, shared by publish.html and play.html.
//
// Plain script (no modules, no build step): it defines one global, `WeirClient`.
// The per-page scripts (publish.js, play.js) build on it and own `window.weir`,
// the state object that automated tests read.
//
// Flow for both pages:
//   1. POST {control_url}/v1/assign-{publisher|viewer} {"room": R}
//        -> {endpoints: [{kind, url, node_id}], token, ...}
//   2. Build an RTCPeerConnection, create an offer, wait for ICE gathering
//      (at most ~1 s: the server is ICE-lite, we send one complete offer).
//   3. POST the offer to the first endpoint of the wanted kind (WHIP/WHEP,
//      RFC 9725) with `Authorization: Bearer <token>`; on failure try the next.
//      201 Created -> body is the SDP answer, `Location` names the session.
//   4. On stop / pagehide: DELETE the Location (keepalive fetch).
//
// All server- or user-supplied text goes into the DOM via textContent only.
(function () {
  'use strict';

  /** Milliseconds we wait for ICE gathering before sending the offer anyway. */
  const ICE_GATHER_MAX_MS = 1000;

  /** An Error whose message is meant for the user as is. */
  class WeirError extends Error {
    constructor(message, detail) {
      super(message);
      this.name = 'WeirError';
      if (detail !== undefined) this.detail = detail;
    }
  }

  /** The room named by the last segment of the page path (/publish/R, /play/R). */
  function roomFromPath() {
    const segments = location.pathname.split('/').filter((s) => s.length > 0);
    if (segments.length < 2) return null;
    try {
      return decodeURIComponent(segments[segments.length - 1]);
    } catch (_) {
      return null;
    }
  }

  /** Query parameter helper. */
  function param(name) {
    return new URLSearchParams(location.search).get(name);
  }

  /** Control-plane base URL from /assets/config.js (window.WEIR_CONFIG). */
  function controlUrl() {
    const cfg = window.WEIR_CONFIG;
    if (!cfg || typeof cfg.control_url !== 'string' || cfg.control_url === '') {
      throw new WeirError('window.WEIR_CONFIG.control_url is missing (is /assets/config.js served?)');
    }
    return cfg.control_url.replace(/\/+$/, '');
  }

  /**
   * Ask the control plane for endpoints and a token.
   * role: 'publisher' | 'viewer'; extra: more fields of the request body
   * (a viewer's `viewer_id`). Resolves to the parsed JSON on 200,
   * throws WeirError with the gateway's message otherwise.
   */
  async function assign(role, room, extra = {}) {
    const url = `${controlUrl()}/v1/assign-${role}`;
    let resp;
    try {
      resp = await fetch(url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ ...extra, room }),
        cache: 'no-store',
      });
    } catch (e) {
      throw new WeirError(`control plane unreachable (${url}): ${e.message}`);
    }
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      // Not JSON: fall through, handled below.
    }
    if (!resp.ok) {
      const msg = body && typeof body.error === 'string' ? body.error : (text.trim() || resp.statusText);
      const code = body && typeof body.code === 'string' ? ` [${body.code}]` : '';
      throw new WeirError(`assign-${role} failed (HTTP ${resp.status}): ${msg}${code}`);
    }
    if (!body || !Array.isArray(body.endpoints) || typeof body.token !== 'string') {
      throw new WeirError(`assign-${role}: malformed response from control plane`);
    }
    return body;
  }

  /** Resolve once ICE gathering is complete, or after maxMs, whichever is first. */
  function waitForIceGathering(pc, maxMs = ICE_GATHER_MAX_MS) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener('icegatheringstatechange', onChange);
        resolve();
      };
      const onChange = () => {
        if (pc.iceGatheringState === 'complete') done();
      };
      const timer = setTimeout(done, maxMs);
      pc.addEventListener('icegatheringstatechange', onChange);
    });
  }

  /**
   * One WHIP/WHEP POST. Resolves to {answer, location}; throws WeirError with
   * the server's text/plain message on a non-201 answer.
   */
  async function postOffer(endpointUrl, token, sdp) {
    let resp;
    try {
      resp = await fetch(endpointUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${token}` },
        body: sdp,
        cache: 'no-store',
      });
    } catch (e) {
      throw new WeirError(`${endpointUrl} unreachable: ${e.message}`);
    }
    const text = await resp.text();
    if (resp.status !== 201 && resp.status !== 200) {
      const msg = text.trim().slice(0, 500) || resp.statusText;
      throw new WeirError(`${endpointUrl} answered HTTP ${resp.status}: ${msg}`);
    }
    if (!text.startsWith('v=')) {
      throw new WeirError(`${endpointUrl}: response is not an SDP answer`);
    }
    const loc = resp.headers.get('Location');
    // The Location is relative to the endpoint URL (RFC 9725 §4.2). If it is
    // missing (e.g. not exposed by CORS) we can still stream, only not DELETE.
    const sessionUrl = loc ? new URL(loc, endpointUrl).href : null;
    if (!sessionUrl) console.warn('weir: no Location header; the session cannot be deleted');
    return { answer: text, location: sessionUrl };
  }

  /**
   * Negotiate `pc` (which already has its transceivers) with the first working
   * endpoint of `kind` ('whip' | 'whep') from an assignment. Sets the local
   * offer and the remote answer. Resolves to {endpoint, location}.
   * `isStale()` lets the caller abandon a superseded attempt.
   */
  async function negotiate(pc, assignment, kind, isStale = () => false) {
    const endpoints = assignment.endpoints.filter((e) => e && e.kind === kind && typeof e.url === 'string');
    if (endpoints.length === 0) {
      throw new WeirError(`control plane returned no ${kind} endpoint`);
    }
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitForIceGathering(pc);
    if (isStale()) throw new WeirError('superseded');
    const sdp = pc.localDescription.sdp;

    const errors = [];
    for (const ep of endpoints) {
      const url = new URL(ep.url, window.location.href).href;
      let res;
      try {
        res = await postOffer(url, assignment.token, sdp);
      } catch (e) {
        errors.push(e.message);
        console.warn('weir:', e.message);
        if (isStale()) throw new WeirError('superseded');
        continue;
      }
      if (isStale()) {
        deleteSession(res.location, assignment.token);
        throw new WeirError('superseded');
      }
      try {
        await pc.setRemoteDescription({ type: 'answer', sdp: res.answer });
      } catch (e) {
        // A bad answer leaves the offer in place, so the next endpoint may still work.
        deleteSession(res.location, assignment.token);
        errors.push(`${url}: answer rejected by the browser: ${e.message}`);
        continue;
      }
      return { endpoint: ep, location: res.location };
    }
    throw new WeirError(errors.join('\n'));
  }

  /** DELETE a WHIP/WHEP session; fire and forget, survives page unload. */
  function deleteSession(sessionUrl, token) {
    if (!sessionUrl) return;
    try {
      fetch(sessionUrl, {
        method: 'DELETE',
        headers: { Authorization: `Bearer ${token}` },
        keepalive: true,
      }).catch(() => {});
    } catch (_) {
      // keepalive fetch can throw synchronously during unload; nothing to do.
    }
  }

  /**
   * Whether a WHIP/WHEP session still exists on its node, asked with an
   * empty trickle PATCH: 'live', 'moved' (410: the node is draining and sent
   * this client elsewhere), 'gone' (404: the node no longer has it) or
   * 'unknown' (no clear answer, e.g. the node is down).
   */
  async function sessionState(sessionUrl, token) {
    if (!sessionUrl) return 'unknown';
    try {
      const r = await fetch(sessionUrl, {
        method: 'PATCH',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/trickle-ice-sdpfrag' },
        body: '',
        cache: 'no-store',
      });
      if (r.status === 410) return 'moved';
      if (r.status === 404) return 'gone';
      return r.ok ? 'live' : 'unknown';
    } catch (_) {
      return 'unknown';
    }
  }

  /**
   * Calls onLost() when `pc` stays 'failed' or 'disconnected' for graceMs.
   * Returns a function that stops watching.
   */
  function watchConnection(pc, graceMs, onLost) {
    let timer = null;
    const check = () => {
      const s = pc.connectionState;
      if (s === 'failed' || s === 'disconnected') {
        if (timer === null) timer = setTimeout(() => { timer = null; onLost(s); }, graceMs);
      } else if (timer !== null) {
        clearTimeout(timer);
        timer = null;
      }
    };
    pc.addEventListener('connectionstatechange', check);
    return () => {
      pc.removeEventListener('connectionstatechange', check);
      if (timer !== null) clearTimeout(timer);
    };
  }

  /** "video/H264 (profile-level-id=42e01f)" style codec name for a stats codecId. */
  function codecName(report, codecId) {
    if (!codecId) return null;
    const c = report.get(codecId);
    if (!c || !c.mimeType) return null;
    const name = c.mimeType.replace(/^(audio|video)\//, '');
    const m = c.sdpFmtpLine && c.sdpFmtpLine.match(/profile-level-id=([0-9a-fA-F]+)/);
    return m ? `${name} ${m[1]}` : name;
  }

  /** First stats entry of `type` and media kind, or null. */
  function findStat(report, type, kind) {
    for (const s of report.values()) {
      if (s.type === type && (s.kind || s.mediaType) === kind) return s;
    }
    return null;
  }

  /** The selected ICE candidate pair (for RTT), or null. */
  function selectedPair(report) {
    for (const s of report.values()) {
      if (s.type === 'transport' && s.selectedCandidatePairId) return report.get(s.selectedCandidatePairId) || null;
    }
    for (const s of report.values()) {
      if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') return s;
    }
    return null;
  }

  /** Tracks a byte counter and returns kbit/s between successive samples. */
  class RateMeter {
    constructor() { this.reset(); }
    reset() { this.lastBytes = null; this.lastTs = null; this.kbps = null; }
    /** bytes: cumulative counter; ts: milliseconds (stats timestamp). */
    sample(bytes, ts) {
      if (typeof bytes !== 'number' || typeof ts !== 'number') return this.kbps;
      if (this.lastBytes !== null && ts > this.lastTs && bytes >= this.lastBytes) {
        this.kbps = ((bytes - this.lastBytes) * 8) / (ts - this.lastTs); // bits/ms == kbit/s
      }
      this.lastBytes = bytes;
      this.lastTs = ts;
      return this.kbps;
    }
  }

  // ---- formatting -------------------------------------------------------

  function fmtNum(v, digits = 0) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    return Number(v).toFixed(digits);
  }
  function fmtKbps(v) {
    if (v === null || v === undefined) return '–';
    return v >= 1000 ? `${(v / 1000).toFixed(2)} Mbit/s` : `${v.toFixed(0)} kbit/s`;
  }
  function fmtRes(w, h) {
    return w && h ? `${w}×${h}` : '–';
  }
  function fmtMs(v) {
    return v === null || v === undefined ? '–' : `${Math.round(v)} ms`;
  }
  /** Jitter in stats is in seconds. */
  function fmtJitter(v) {
    return v === null || v === undefined ? '–' : `${(v * 1000).toFixed(1)} ms`;
  }
  function fmtPct(v) {
    return v === null || v === undefined || Number.isNaN(v) ? '–' : `${(v * 100).toFixed(2)} %`;
  }

  // ---- DOM helpers (textContent only) ------------------------------------

  /**
   * Render a stats box: sections = [{title, rows: [[label, value], ...]}].
   * Rebuilt each time; cheap at one update per second.
   */
  function renderStats(container, sections) {
    const nodes = [];
    for (const sec of sections) {
      const h = document.createElement('h2');
      h.textContent = sec.title;
      const dl = document.createElement('dl');
      for (const [label, value] of sec.rows) {
        const dt = document.createElement('dt');
        dt.textContent = label;
        const dd = document.createElement('dd');
        dd.textContent = value === null || value === undefined ? '–' : String(value);
        dl.append(dt, dd);
      }
      nodes.push(h, dl);
    }
    container.replaceChildren(...nodes);
  }

  /** Status line: state word, optional detail, optional error (in red). */
  function renderStatus(el, state, detail, error) {
    el.dataset.state = state;
    const line = document.createElement('span');
    line.textContent = detail ? `${state} — ${detail}` : state;
    const nodes = [line];
    if (error) {
      const err = document.createElement('span');
      err.className = 'error';
      err.textContent = error;
      nodes.push(err);
    }
    el.replaceChildren(...nodes);
  }

  window.WeirClient = Object.freeze({
    WeirError,
    roomFromPath,
    param,
    controlUrl,
    assign,
    waitForIceGathering,
    postOffer,
    negotiate,
    deleteSession,
    sessionState,
    watchConnection,
    codecName,
    findStat,
    selectedPair,
    RateMeter,
    fmt: Object.freeze({ num: fmtNum, kbps: fmtKbps, res: fmtRes, ms: fmtMs, jitter: fmtJitter, pct: fmtPct }),
    renderStats,
    renderStatus,
  });
})();

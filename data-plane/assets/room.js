// Weir play page: the room's live interaction. Danmaku fly over the video,
// a chat log, a like button, gifts with the viewer's balance, online count.
// Events come over the node's WebSocket (/rooms/ROOM/events, JSON frames);
// on a drop the page reconnects with since=&epoch= and gets exactly what it
// missed, or is told it cannot (then it carries on from the newest event).
//
// Who the viewer is: ?token=T (a play token for the room, e.g. from your own
// login), else ?user=NAME (weir dev mints a token for NAME), else an
// anonymous viewer token from the control plane (can read, like and chat,
// but has no wallet).
//
// State for tests and the curious: window.weirRoom.
(function () {
  'use strict';
  const W = window.WeirClient;
  const room = W.roomFromPath();
  const ui = {
    overlay: document.getElementById('danmaku'),
    log: document.getElementById('chat-log'),
    form: document.getElementById('chat-form'),
    input: document.getElementById('chat-input'),
    like: document.getElementById('like'),
    likes: document.getElementById('likes'),
    online: document.getElementById('online'),
    gift: document.getElementById('gift'),
    send: document.getElementById('send-gift'),
    balance: document.getElementById('balance'),
    note: document.getElementById('room-note'),
    friends: document.getElementById('friends'),
  };
  const state = {
    user: null, connected: false, epoch: 0, offset: 0, recovered: null,
    reconnects: 0, gaps: 0, degraded: false, likes: 0, online: 0, balance: null,
    danmaku: [], gifts: [], refused: [], friends: null, error: null,
  };
  window.weirRoom = state;
  /** Drops the socket; the page reconnects and recovers what it missed. */
  state.reconnect = () => { if (ws) ws.close(); };
  let token = null;
  let ws = null;
  let delay = 500;
  let origin = location.origin; // the node whose events we read
  let moveAway = false;         // the node asked us to go (drain) or keeps failing
  let failures = 0;
  const shown = new Set(); // ids of danmaku already on screen (local copies)

  function note(text, bad) {
    ui.note.textContent = text;
    ui.note.dataset.bad = bad ? '1' : '';
  }

  function line(html, cls) {
    const li = document.createElement('li');
    if (cls) li.className = cls;
    li.append(...html);
    ui.log.append(li);
    while (ui.log.children.length > 200) ui.log.firstChild.remove();
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function who(name) {
    const b = document.createElement('b');
    b.textContent = name;
    return b;
  }

  function fly(text) {
    const span = document.createElement('span');
    span.className = 'fly';
    span.textContent = text;
    span.style.top = `${5 + Math.floor(Math.random() * 70)}%`;
    ui.overlay.append(span);
    span.addEventListener('animationend', () => span.remove());
  }

  function onEvent(f) {
    if (f.id && (f.type === 'danmaku') && shown.has(f.id)) {
      shown.delete(f.id); // our local copy, now confirmed: shown once
      return;
    }
    switch (f.type) {
      case 'danmaku':
        state.danmaku.push({ user: f.user, text: f.text, offset: f.offset });
        fly(f.text);
        line([who(f.user), ` ${f.text}`]);
        break;
      case 'gift':
        state.gifts.push(f.gift_id);
        line([who(f.from_user), ` sent ${f.count} × ${f.gift}`], 'gift');
        break;
      case 'likes':
        break; // totals come in counters frames
      case 'moderation':
        line([`${f.by} ${f.seconds ? 'set' : 'lifted'} ${f.action.replace('_', ' ')}${f.user ? ` for ${f.user}` : ''}`], 'system');
        break;
      case 'go_live':
        line([who(f.streamer), ` went live: ${f.title}`], 'system');
        break;
      case 'system':
        line([f.text], 'system');
        break;
      default:
        break;
    }
  }

  function onFrame(f) {
    switch (f.t) {
      case 'hello':
        state.connected = true;
        state.recovered = f.recovered;
        state.degraded = f.degraded;
        if (f.recovered === false) {
          state.gaps += 1;
          line(['(some messages from while you were away are gone)'], 'system');
        }
        if (f.recovered !== true) state.offset = f.offset;
        state.epoch = f.epoch;
        delay = 500;
        failures = 0;
        note(f.degraded ? 'chat: degraded (other nodes late)' : `chat as ${f.user}`);
        break;
      case 'event':
        state.offset = f.offset;
        onEvent(f);
        break;
      case 'local':
        shown.add(f.id);
        state.danmaku.push({ user: f.user, text: f.text, local: true });
        fly(f.text);
        line([who(f.user), ` ${f.text}`]);
        break;
      case 'notice':
        if (f.type === 'go_live') {
          const a = document.createElement('a');
          a.href = `/play/${encodeURIComponent(f.room)}`;
          a.textContent = f.title || f.room;
          line([who(f.streamer), ' went live: ', a], 'system');
        }
        break;
      case 'friends':
        state.friends = f.users;
        line([f.users.length ? `people you follow here: ${f.users.join(', ')}` : 'nobody you follow is here'], 'system');
        break;
      case 'counters':
        state.likes = f.likes;
        state.online = f.online;
        ui.likes.textContent = f.likes;
        ui.online.textContent = f.online;
        break;
      case 'status':
        state.degraded = f.degraded;
        note(f.degraded ? 'chat: degraded (other nodes late)' : `chat as ${state.user}`);
        break;
      case 'gap':
        state.gaps += 1;
        line(['(some messages were lost)'], 'system');
        break;
      case 'refused':
        state.refused.push(f.code);
        note(`refused: ${f.reason}`, true);
        break;
      case 'bye':
        note(`disconnected: ${f.reason}`, true);
        if (f.code === 'drain' || f.code === 'shutdown') moveAway = true;
        break;
      default:
        break;
    }
  }

  /** A node the scheduler offers for this room (drained ones are left out). */
  async function pickNode() {
    try {
      const a = await W.assign('viewer', room);
      const e = a.endpoints.find((x) => x && x.kind === 'whep');
      if (e) return new URL(e.url).origin;
    } catch (_) { /* keep the one we have */ }
    return origin;
  }

  async function connect() {
    if (moveAway || failures >= 3) {
      origin = await pickNode();
      moveAway = false;
      failures = 0;
    }
    const base = origin.replace(/^http/, 'ws');
    let q = `token=${encodeURIComponent(token)}&format=json`;
    if (state.epoch) q += `&since=${state.offset}&epoch=${state.epoch}`;
    ws = new WebSocket(`${base}/rooms/${encodeURIComponent(room)}/events?${q}`);
    ws.onmessage = (m) => {
      try { onFrame(JSON.parse(m.data)); } catch (e) { console.warn('weir room: bad frame', e); }
    };
    ws.onclose = () => {
      if (!state.connected) failures += 1;
      state.connected = false;
      state.reconnects += 1;
      note(`chat: reconnecting in ${Math.round(delay / 1000)} s`, true);
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
    else note('chat: not connected', true);
  }

  async function api(method, path, body) {
    const resp = await fetch(`${W.controlUrl()}${path}`, {
      method,
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: body ? JSON.stringify(body) : undefined,
      cache: 'no-store',
    });
    const json = await resp.json().catch(() => null);
    if (!resp.ok) throw new W.WeirError((json && json.error) || `HTTP ${resp.status}`);
    return json;
  }

  async function refreshBalance() {
    try {
      const b = await api('GET', `/v1/wallet/${encodeURIComponent(state.user)}`);
      state.balance = b.balance;
      ui.balance.textContent = b.balance;
    } catch (e) {
      ui.balance.textContent = '—';
    }
  }

  async function sendGift() {
    const gift = ui.gift.value;
    const key = (crypto.randomUUID && crypto.randomUUID()) || `${Date.now()}-${Math.random()}`;
    ui.send.disabled = true;
    // A network failure is retried with the same key: charged at most once.
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const g = await api('POST', `/v1/rooms/${encodeURIComponent(room)}/gifts`, { gift, count: 1, idempotency_key: key });
        state.balance = g.balance_after;
        ui.balance.textContent = g.balance_after;
        break;
      } catch (e) {
        if (e instanceof W.WeirError) { note(`gift: ${e.message}`, true); break; }
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    ui.send.disabled = false;
  }

  async function start() {
    if (!room) return;
    try {
      const given = W.param('token');
      const user = W.param('user');
      if (given) {
        token = given;
      } else if (user) {
        const r = await fetch(`${W.controlUrl()}/v1/tokens`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ room, mode: 'play', subject: user }),
        });
        const body = await r.json().catch(() => null);
        if (!r.ok) throw new W.WeirError((body && body.error) || `cannot get a token for ${user}`);
        token = body.token;
      } else {
        token = (await W.assign('viewer', room)).token;
      }
      // The token's subject is who we are.
      state.user = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sub;
    } catch (e) {
      state.error = e.message;
      note(`chat unavailable: ${e.message}`, true);
      return;
    }
    connect();
    ui.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const text = ui.input.value.trim();
      if (!text) return;
      send({ t: 'danmaku', text, ref: String(Date.now()) });
      ui.input.value = '';
    });
    ui.like.addEventListener('click', () => send({ t: 'like', count: 1 }));
    ui.friends.addEventListener('click', () => send({ t: 'friends' }));
    ui.send.addEventListener('click', sendGift);
    try {
      const cat = await api('GET', '/v1/gifts');
      for (const g of cat.gifts) {
        const o = document.createElement('option');
        o.value = g.id;
        o.textContent = `${g.name} (${g.price})`;
        ui.gift.append(o);
      }
    } catch (_) { /* the catalogue is optional for chatting */ }
    refreshBalance();
  }

  start();
})();

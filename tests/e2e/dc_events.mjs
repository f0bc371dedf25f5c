#!/usr/bin/env node
// Weir browser test of room events over a WHEP session's data channel: one
// headless Chromium page (Debian's /usr/bin/chromium driven by
// playwright-core) plays a room over WHEP with a data channel labelled
// `weir-events?...` in its offer, and beside it holds a WebSocket client of
// the same room (`/rooms/ROOM/events`).
//
//   node dc_events.mjs --base http://127.0.0.1:8080 --room ROOM \
//        --dc-token TOKEN --ws-token TOKEN [--timeout-ms 60000]
//
// Steps: the channel says hello (a JSON text message); a danmaku sent on the
// channel is acknowledged there and reaches the WebSocket client; one sent
// on the WebSocket reaches the channel; a malformed message is refused with
// a reason. Then the WHEP session ends (DELETE), two danmaku are sent on the
// WebSocket, and a new session whose label carries since/epoch receives
// exactly those two, with `recovered: true`. A session with the bare label
// gets binary (MessagePack) frames; one with a bad label query gets a `bye`
// saying why, while its video session stays up.
//
// Output: one JSON line on stdout: {"ok":true,...} (exit 0) or
// {"ok":false,"error":"..."} (exit 1); exit 2 on setup errors.

import { browserTools, parseArgs } from './setup.mjs';

const args = parseArgs({ base: null, room: null, dcToken: null, wsToken: null, timeoutMs: 60000 }, ['base', 'room', 'dcToken', 'wsToken']);
const { chromium, executablePath } = await browserTools();

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
let result;
try {
  const page = await browser.newPage();
  // Any page of the node gives the script an origin (WHEP allows CORS anyway).
  await page.goto(`${args.base}/healthz`);
  result = await page.evaluate(async ({ base, room, dcToken, wsToken, timeoutMs }) => {
    const deadline = Date.now() + timeoutMs;
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const until = async (what, check) => {
      while (Date.now() < deadline) {
        const v = check();
        if (v) return v;
        await sleep(20);
      }
      throw new Error(`timed out waiting for ${what}`);
    };

    // A WHEP session with a data channel; frames land in `frames`.
    async function session(label) {
      const pc = new RTCPeerConnection();
      pc.addTransceiver('audio', { direction: 'recvonly' });
      pc.addTransceiver('video', { direction: 'recvonly' });
      const dc = pc.createDataChannel(label);
      dc.binaryType = 'arraybuffer';
      const s = { pc, dc, frames: [], binary: 0, open: false, location: null };
      dc.onopen = () => { s.open = true; };
      dc.onmessage = (m) => {
        if (typeof m.data === 'string') s.frames.push(JSON.parse(m.data));
        else { s.binary += 1; s.frames.push({ t: 'binary', bytes: m.data.byteLength }); }
      };
      await pc.setLocalDescription(await pc.createOffer());
      await until('ICE gathering', () => pc.iceGatheringState === 'complete' || null).catch(() => {});
      const res = await fetch(`${base}/whep/${room}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${dcToken}` },
        body: pc.localDescription.sdp,
      });
      if (res.status !== 201) throw new Error(`WHEP answered ${res.status}: ${await res.text()}`);
      s.location = new URL(res.headers.get('Location'), base).toString();
      await pc.setRemoteDescription({ type: 'answer', sdp: await res.text() });
      await until(`channel ${label} open`, () => s.open);
      return s;
    }
    async function end(s) {
      await fetch(s.location, { method: 'DELETE', headers: { Authorization: `Bearer ${dcToken}` } });
      s.pc.close();
    }
    const find = (frames, pred) => frames.find(pred);

    // The WebSocket client of the same room.
    const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/rooms/${room}/events?format=json&token=${wsToken}`);
    const wsFrames = [];
    ws.onmessage = (m) => wsFrames.push(JSON.parse(m.data));
    await until('WebSocket hello', () => find(wsFrames, (f) => f.t === 'hello'));

    const a = await session('weir-events?format=json');
    const hello = await until('channel hello', () => find(a.frames, (f) => f.t === 'hello'));
    a.dc.send(JSON.stringify({ t: 'danmaku', text: 'from the channel', ref: 'c1' }));
    const ack = await until('ack on the channel', () => find(a.frames, (f) => f.t === 'ack' && f.ref === 'c1'));
    await until('channel danmaku on the WebSocket', () =>
      find(wsFrames, (f) => f.t === 'event' && f.type === 'danmaku' && f.text === 'from the channel'));
    ws.send(JSON.stringify({ t: 'danmaku', text: 'from the socket', ref: 'w1' }));
    const fromWs = await until('socket danmaku on the channel', () =>
      find(a.frames, (f) => f.t === 'event' && f.type === 'danmaku' && f.text === 'from the socket'));
    a.dc.send('{not json');
    const refused = await until('refusal of a malformed message', () => find(a.frames, (f) => f.t === 'refused'));

    // Gone, then back with since/epoch: exactly what was missed.
    const last = fromWs.offset;
    await end(a);
    for (const text of ['missed one', 'missed two']) {
      ws.send(JSON.stringify({ t: 'danmaku', text, ref: text }));
      await until(`ack of ${text}`, () => find(wsFrames, (f) => f.t === 'ack' && f.ref === text));
    }
    const b = await session(`weir-events?format=json&since=${last}&epoch=${hello.epoch}`);
    const hello2 = await until('recovery hello', () => find(b.frames, (f) => f.t === 'hello'));
    await until('both missed danmaku', () =>
      b.frames.filter((f) => f.t === 'event' && f.type === 'danmaku').length >= 2 || null);
    await sleep(300);
    const recovered = b.frames.filter((f) => f.t === 'event' && f.type === 'danmaku').map((f) => f.text);
    await end(b);

    // Default format: binary MessagePack.
    const c = await session('weir-events');
    await until('a binary hello', () => c.binary > 0 || null);
    await end(c);

    // A bad query: told why, on the channel.
    const d = await session('weir-events?since=1');
    const bye = await until('bye for a bad label', () => find(d.frames, (f) => f.t === 'bye'));
    const mediaUp = d.pc.connectionState;
    await end(d);
    ws.close();

    return {
      ok: true,
      hello,
      ackOffset: ack.offset,
      refused: refused.code,
      recoveredFlag: hello2.recovered,
      missed: hello2.missed,
      recovered,
      bye,
      mediaUp,
    };
  }, args);
} catch (e) {
  result = { ok: false, error: String(e && e.message ? e.message : e) };
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.ok ? 0 : 1);

#!/usr/bin/env node
// Weir play page failing over between CDNs, in headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core): the control plane ranks a
// broken CDN first, and the page must move on to the next CDN and play.
//
//   node cdn_play.mjs --base http://127.0.0.1:8080 --room ROOM [--frames 50] [--timeout-ms 60000]
//
// Viewer "hls" opens /play/ROOM?protocol=hls; viewer "webrtc-broken" opens
// /play/ROOM with a WebRTC whose negotiation fails (setRemoteDescription
// rejects), so it must leave WebRTC for HLS through the CDNs by itself.
// Each must play until it decoded --frames frames.
//
// Output: exactly one JSON line on stdout.
//   success (exit 0): {"ok":true,"viewers":[{"name","protocol","cdn","url","fallback",
//                      "failures","framesDecoded"}, ...]}
//   failure (exit 1): {"ok":false,"error":"..."}; window.weir and console lines to stderr.
//   setup error (exit 2): Chromium or playwright-core missing, bad arguments.

import { accessSync, constants as fsConstants } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--autoplay-policy=no-user-gesture-required',
];

function setupError(message) {
  process.stderr.write(`cdn_play: ${message}\n`);
  process.stdout.write(JSON.stringify({ ok: false, error: message }) + '\n');
  process.exit(2);
}

const opts = { base: null, room: null, frames: 50, timeoutMs: 60000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const next = () => (i + 1 < argv.length ? argv[++i] : setupError(`${argv[i]} needs a value`));
  switch (argv[i]) {
    case '--base': opts.base = next().replace(/\/+$/, ''); break;
    case '--room': opts.room = next(); break;
    case '--frames': opts.frames = Number(next()); break;
    case '--timeout-ms': opts.timeoutMs = Number(next()); break;
    default: setupError(`unknown argument ${argv[i]}`);
  }
}
if (!opts.base || !opts.room) setupError('--base and --room are required');

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
try {
  accessSync(executablePath, fsConstants.X_OK);
} catch (_) {
  setupError(`Chromium not found at ${executablePath} (install Debian's "chromium" or set CHROMIUM)`);
}
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  setupError(`playwright-core is not installed (run "npm ci" in tests/e2e): ${e.message}`);
}

const deadline = Date.now() + opts.timeoutMs;
const browser = await chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS });
const viewers = [];
let failed = null;
try {
  for (const [name, query, broken] of [['hls', '?protocol=hls', false], ['webrtc-broken', '', true]]) {
    const context = await browser.newContext();
    const page = await context.newPage();
    const lines = [];
    page.on('console', (m) => { lines.push(`${m.type()}: ${m.text()}`); if (lines.length > 30) lines.shift(); });
    page.on('pageerror', (e) => lines.push(`pageerror: ${e.message}`));
    if (broken) {
      await page.addInitScript(() => {
        RTCPeerConnection.prototype.setRemoteDescription = () =>
          Promise.reject(new Error('negotiation broken on purpose'));
      });
    }
    await page.goto(`${opts.base}/play/${encodeURIComponent(opts.room)}${query}`);
    viewers.push({ name, page, lines });
  }
  const done = new Map();
  while (done.size < viewers.length) {
    if (Date.now() > deadline) throw new Error(`not every viewer decoded ${opts.frames} frames in time`);
    for (const v of viewers) {
      if (done.has(v.name)) continue;
      const w = await v.page.evaluate(() => JSON.parse(JSON.stringify(window.weir)));
      v.last = w;
      if (w.protocol === 'hls' && w.state === 'connected' && w.stats.video.framesDecoded >= opts.frames) {
        done.set(v.name, {
          name: v.name,
          protocol: w.protocol,
          cdn: w.hls && w.hls.cdn,
          url: w.hls && w.hls.url,
          fallback: w.fallback,
          failures: w.failures,
          endpoints: w.endpoints,
          framesDecoded: w.stats.video.framesDecoded,
        });
      }
    }
    await sleep(500);
  }
  process.stdout.write(JSON.stringify({ ok: true, viewers: [...done.values()] }) + '\n');
} catch (e) {
  failed = e.message;
  for (const v of viewers) {
    process.stderr.write(`---- ${v.name}: window.weir ----\n${JSON.stringify(v.last, null, 2)}\n`);
    process.stderr.write(`---- ${v.name}: console ----\n${v.lines.join('\n')}\n`);
  }
  process.stdout.write(JSON.stringify({ ok: false, error: failed }) + '\n');
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);

#!/usr/bin/env node
// Weir browser end-to-end test: one publisher and two viewers, each in its own
// Chromium process (Debian's /usr/bin/chromium, driven by playwright-core; no
// browser download).
//
//   node browser_e2e.mjs --base http://127.0.0.1:8080 --room ROOM \
//        [--codec vp8|h264] [--timeout-ms 60000] [--no-publisher] [--watch-ms 0]
//        [--viewer2-query layer=360p]
//
// Steps: publisher opens /publish/ROOM?autostart=1&codec=C and must reach
// state 'connected' with packets going out; viewer 1 opens /play/ROOM and must
// decode video and receive audio; 3 s later viewer 2 (the late joiner) must do
// the same. With --no-publisher the room is published by something else
// (ffmpeg over SRT) and only the two viewers run. --watch-ms keeps both
// viewers playing that long before their stats are read. --viewer2-query adds
// a query to the late joiner's play page URL (e.g. a layer cap). The pages expose their state as `window.weir` (see
// data-plane/assets/publish.js and play.js).
//
// Output: exactly one JSON line on stdout.
//   success (exit 0): {"ok":true,"codec":C,"room":R,"viewers":[{"ttffMs","framesDecoded",
//                      "audioPackets","width","height","videoCodec","framesReceived",
//                      "framesDropped","framesPerSecond","freezeCount","sizesSeen"}, ...]}
//                      (sizesSeen: every "WxH" the viewer showed from its first
//                      picture on)
//   failure (exit 1): {"ok":false,"error":"..."}; each page's window.weir and its
//                      last 30 console messages go to stderr.
//   setup error (exit 2): Chromium or playwright-core missing, bad arguments.
// Console errors of the pages are forwarded to stderr as they happen, prefixed
// with the page name. --timeout-ms bounds the whole run (default 60000).

import { accessSync, constants as fsConstants } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

const USAGE = 'usage: node browser_e2e.mjs --base http://127.0.0.1:8080 --room ROOM [--codec vp8|h264] [--timeout-ms 60000] [--no-publisher] [--watch-ms 0] [--viewer2-query Q]';
const LATE_JOIN_DELAY_MS = 3000;
const CONSOLE_KEEP = 30;

// Flags from shared/PITFALLS.md ("Chromium ... as WHIP/WHEP client"); playwright
// adds --headless and its own temporary --user-data-dir.
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--autoplay-policy=no-user-gesture-required',
];

function setupError(message) {
  process.stderr.write(`browser_e2e: ${message}\n`);
  process.stdout.write(JSON.stringify({ ok: false, error: message }) + '\n');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { base: null, room: null, codec: 'vp8', timeoutMs: 60000, publisher: true, watchMs: 0, viewer2Query: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) setupError(`${a} needs a value\n${USAGE}`);
      return argv[++i];
    };
    switch (a) {
      case '--base': opts.base = next().replace(/\/+$/, ''); break;
      case '--room': opts.room = next(); break;
      case '--codec': opts.codec = next().toLowerCase(); break;
      case '--timeout-ms': opts.timeoutMs = Number(next()); break;
      case '--no-publisher': opts.publisher = false; break;
      case '--watch-ms': opts.watchMs = Number(next()); break;
      case '--viewer2-query': opts.viewer2Query = next().replace(/^\?/, ''); break;
      case '-h': case '--help': process.stderr.write(USAGE + '\n'); process.exit(0); break;
      default: setupError(`unknown argument ${a}\n${USAGE}`);
    }
  }
  if (!opts.base || !opts.room) setupError(`--base and --room are required\n${USAGE}`);
  if (!['vp8', 'h264', 'vp9', 'av1'].includes(opts.codec)) setupError(`--codec must be vp8 or h264 (or vp9, av1), not ${opts.codec}`);
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) setupError('--timeout-ms must be a positive number');
  if (!Number.isFinite(opts.watchMs) || opts.watchMs < 0) setupError('--watch-ms must be a number >= 0');
  try {
    new URL(opts.base);
  } catch (_) {
    setupError(`--base is not a URL: ${opts.base}`);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
try {
  accessSync(executablePath, fsConstants.X_OK);
} catch (_) {
  setupError(`Chromium not found or not executable at ${executablePath} (install Debian's "chromium" package or set CHROMIUM=/path/to/chromium)`);
}

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  setupError(`playwright-core is not installed (run "npm ci" in tests/e2e): ${e.message}`);
}

// getUserMedia needs a secure context; loopback origins are, anything else
// must be declared so explicitly.
const baseUrl = new URL(opts.base);
const args = [...CHROMIUM_ARGS];
if (!['127.0.0.1', 'localhost', '[::1]'].includes(baseUrl.hostname) && baseUrl.protocol === 'http:') {
  args.push(`--unsafely-treat-insecure-origin-as-secure=${baseUrl.origin}`);
}

const deadline = Date.now() + opts.timeoutMs;
const remaining = () => Math.max(1, deadline - Date.now());

/** name -> {browser, page, console: string[]} */
const clients = new Map();

async function openClient(name, url) {
  const browser = await chromium.launch({ executablePath, headless: true, args, timeout: remaining() });
  const entry = { browser, page: null, console: [] };
  clients.set(name, entry);
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  entry.page = page;
  const remember = (line) => {
    entry.console.push(line);
    if (entry.console.length > CONSOLE_KEEP) entry.console.shift();
  };
  page.on('console', (msg) => {
    const line = `${msg.type()}: ${msg.text()}`;
    remember(line);
    if (msg.type() === 'error') process.stderr.write(`[${name}] console ${line}\n`);
  });
  page.on('pageerror', (err) => {
    remember(`pageerror: ${err.message}`);
    process.stderr.write(`[${name}] page error: ${err.message}\n`);
  });
  page.on('crash', () => {
    remember('page crashed');
    process.stderr.write(`[${name}] page crashed\n`);
  });
  const resp = await page.goto(url, { waitUntil: 'load', timeout: remaining() });
  if (!resp || !resp.ok()) {
    throw new Error(`${name}: GET ${url} answered ${resp ? resp.status() : 'nothing'}`);
  }
  return page;
}

/** A JSON copy of the page's window.weir, or a note why there is none. */
async function weirOf(page) {
  try {
    return await page.evaluate(() => (window.weir ? JSON.parse(JSON.stringify(window.weir)) : null));
  } catch (e) {
    return { unavailable: e.message };
  }
}

/**
 * Poll the page until `check(window.weir)` (run in the page) returns
 * {done: true} or {fatal: message}; throws on fatal or at the deadline.
 */
async function waitForWeir(name, page, what, check) {
  try {
    const handle = await page.waitForFunction(check, undefined, { polling: 250, timeout: remaining() });
    const res = await handle.jsonValue();
    if (res && res.fatal) throw new Error(`${name}: ${res.fatal}`);
  } catch (e) {
    if (e.name === 'TimeoutError' || /Timeout/.test(e.message)) {
      const w = await weirOf(page);
      const why = w && w.error ? ` (last error: ${w.error})` : '';
      throw new Error(`${name}: timed out waiting for ${what}; state=${w ? w.state : 'no window.weir'}${why}`);
    }
    throw e;
  }
}

const publisherReady = () => {
  const w = window.weir;
  if (!w) return false;
  // The publish page does not retry a first attempt that failed: stop at once.
  if (w.state === 'failed' && w.error) return { fatal: `publish failed: ${w.error}` };
  return w.state === 'connected' && w.stats.video.packetsSent > 0 && w.stats.audio.packetsSent > 0 ? { done: true } : false;
};

// The play page retries by itself, so a 'failed' state is not final here.
const viewerReady = () => {
  const w = window.weir;
  return !!w && w.stats.video.framesDecoded > 0 && w.stats.audio.packetsReceived > 0 && w.ttffMs !== null ? { done: true } : false;
};

async function closeAll() {
  // Closing the pages first fires 'pagehide', so the pages DELETE their
  // WHIP/WHEP sessions (keepalive fetch); give those a moment to leave.
  const pages = [...clients.values()].filter((c) => c.page && !c.page.isClosed());
  await Promise.allSettled(pages.map((c) => withTimeout(c.page.close(), 3000)));
  if (pages.length > 0) await sleep(300);
  await Promise.allSettled([...clients.values()].map((c) => withTimeout(c.browser.close(), 10000)));
}

function withTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('timeout')), ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Last resort if something hangs past the deadline (including closing).
const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, error: 'hard timeout: browser_e2e hung past --timeout-ms + 30 s' }) + '\n');
  for (const c of clients.values()) {
    try { c.browser.process?.()?.kill('SIGKILL'); } catch (_) { /* ignore */ }
  }
  process.exit(1);
}, opts.timeoutMs + 30000);
killer.unref();

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, async () => {
    await closeAll();
    process.exit(130);
  });
}

const room = encodeURIComponent(opts.room);
let exitCode = 1;
try {
  if (opts.publisher) {
    const publisher = await openClient('publisher', `${opts.base}/publish/${room}?autostart=1&codec=${opts.codec}`);
    await waitForWeir('publisher', publisher, "state 'connected' and packets sent", publisherReady);
  }

  // The frame sizes each viewer shows, sampled every 250 ms from when it
  // first plays until its stats are read: on a loaded machine a viewer may
  // move between layers, so its last size alone says little about which
  // layers it was given.
  const seen = { viewer1: new Set(), viewer2: new Set() };
  const sampled = [];
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      for (const [name, page] of sampled) {
        const v = (await weirOf(page))?.stats?.video;
        if (v?.frameWidth) seen[name].add(`${v.frameWidth}x${v.frameHeight}`);
      }
      await sleep(250);
    }
  })();

  const viewer1 = await openClient('viewer1', `${opts.base}/play/${room}`);
  await waitForWeir('viewer1', viewer1, 'decoded video and received audio', viewerReady);
  sampled.push(['viewer1', viewer1]);

  await sleep(Math.min(LATE_JOIN_DELAY_MS, remaining()));

  const viewer2 = await openClient('viewer2', `${opts.base}/play/${room}${opts.viewer2Query ? `?${opts.viewer2Query}` : ''}`);
  await waitForWeir('viewer2', viewer2, 'decoded video and received audio', viewerReady);
  sampled.push(['viewer2', viewer2]);

  if (opts.watchMs > 0) await sleep(Math.min(opts.watchMs, remaining()));
  sampling = false;
  await sampler;

  const viewers = [];
  for (const [name, page] of [['viewer1', viewer1], ['viewer2', viewer2]]) {
    const w = await weirOf(page);
    const v = w.stats.video;
    const codecName = v.codec || '';
    if (!codecName.toLowerCase().startsWith(opts.codec)) {
      throw new Error(`${name}: receives video codec "${codecName || 'unknown'}", expected ${opts.codec}`);
    }
    viewers.push({
      ttffMs: w.ttffMs,
      framesDecoded: v.framesDecoded,
      audioPackets: w.stats.audio.packetsReceived,
      width: v.frameWidth,
      height: v.frameHeight,
      videoCodec: codecName,
      framesReceived: v.framesReceived,
      framesDropped: v.framesDropped,
      framesPerSecond: v.framesPerSecond,
      freezeCount: v.freezeCount,
      sizesSeen: [...seen[name]].sort(),
    });
  }
  process.stdout.write(JSON.stringify({ ok: true, codec: opts.codec, room: opts.room, viewers }) + '\n');
  exitCode = 0;
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: e.message }) + '\n');
  for (const [name, c] of clients) {
    const w = c.page ? await weirOf(c.page) : null;
    process.stderr.write(`---- ${name}: window.weir ----\n${JSON.stringify(w, null, 2)}\n`);
    process.stderr.write(`---- ${name}: last ${c.console.length} console messages ----\n`);
    for (const line of c.console) process.stderr.write(`  ${line}\n`);
  }
} finally {
  await closeAll();
}
process.exit(exitCode);

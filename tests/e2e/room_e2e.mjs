#!/usr/bin/env node
// Weir browser test of the play page's room panel: two viewers (two pages of
// one headless Chromium, Debian's /usr/bin/chromium driven by
// playwright-core) in one room of `weir dev`.
//
//   node room_e2e.mjs --base http://127.0.0.1:8080 --room ROOM \
//        --sender alice --watcher bob [--gift rose] [--timeout-ms 60000]
//
// Steps: both open /play/ROOM?user=NAME; the sender types a danmaku and
// presses Enter, presses Like three times, and sends one gift (its wallet
// must hold money: the Rust test grants it); the watcher must see the
// danmaku fly over its video and in its log, the like total reach 3 and the
// gift in its log, and the sender's balance must drop. Then the watcher's
// socket is closed from the page (as a network drop would), a second danmaku
// is sent meanwhile, and the watcher must get it after reconnecting with
// recovery (no gap). The pages' state is `window.weirRoom` (room.js).
//
// Output: one JSON line on stdout: {"ok":true,...} (exit 0) or
// {"ok":false,"error":"..."} (exit 1); exit 2 on setup errors.

import { browserTools, parseArgs } from './setup.mjs';

const args = parseArgs({ base: null, room: null, sender: null, watcher: null, gift: 'rose', timeoutMs: 60000 }, ['base', 'room', 'sender', 'watcher']);
const { chromium, executablePath } = await browserTools();

const deadline = Date.now() + args.timeoutMs;
const left = () => Math.max(1000, deadline - Date.now());
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-quic', '--autoplay-policy=no-user-gesture-required'],
  timeout: left(),
});
const logs = [];
const pages = [];
async function open(user) {
  const page = await browser.newPage();
  page.on('console', (m) => logs.push(`${user}: ${m.type()} ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`${user}: page error ${e.message}`));
  pages.push([user, page]);
  await page.goto(`${args.base}/play/${encodeURIComponent(args.room)}?user=${encodeURIComponent(user)}`, { timeout: left() });
  await page.waitForFunction(() => window.weirRoom && window.weirRoom.connected, null, { timeout: left() });
  return page;
}

try {
  const sender = await open(args.sender);
  const watcher = await open(args.watcher);
  await sender.waitForFunction(() => window.weirRoom.balance !== null, null, { timeout: left() });
  const balanceBefore = await sender.evaluate(() => window.weirRoom.balance);

  await sender.fill('#chat-input', 'hello from the browser');
  await sender.press('#chat-input', 'Enter');
  for (let i = 0; i < 3; i++) await sender.click('#like');
  await sender.selectOption('#gift', args.gift);
  await sender.click('#send-gift');

  await watcher.waitForFunction(() => window.weirRoom.danmaku.some((d) => d.text === 'hello from the browser'), null, { timeout: left() });
  const flying = await watcher.evaluate(() => [...document.querySelectorAll('#danmaku .fly')].map((e) => e.textContent));
  if (!flying.includes('hello from the browser')) throw new Error(`the danmaku did not fly over the video: ${JSON.stringify(flying)}`);
  await watcher.waitForFunction(() => window.weirRoom.likes >= 3, null, { timeout: left() });
  await watcher.waitForFunction(() => window.weirRoom.gifts.length === 1, null, { timeout: left() });
  await sender.waitForFunction((b) => window.weirRoom.balance !== null && window.weirRoom.balance < b, balanceBefore, { timeout: left() });
  const balanceAfter = await sender.evaluate(() => window.weirRoom.balance);

  // A network drop on the watcher's side: it reconnects and recovers.
  const reconnectsBefore = await watcher.evaluate(() => window.weirRoom.reconnects);
  await watcher.evaluate(() => { window.weirRoom.reconnect(); });
  await sender.fill('#chat-input', 'while you were away');
  await sender.press('#chat-input', 'Enter');
  await watcher.waitForFunction((r) => window.weirRoom.reconnects > r && window.weirRoom.connected, reconnectsBefore, { timeout: left() });
  await watcher.waitForFunction(() => window.weirRoom.danmaku.some((d) => d.text === 'while you were away'), null, { timeout: left() });
  const w = await watcher.evaluate(() => ({ recovered: window.weirRoom.recovered, gaps: window.weirRoom.gaps, danmaku: window.weirRoom.danmaku.length }));
  if (w.recovered !== true || w.gaps !== 0) throw new Error(`the watcher did not recover cleanly: ${JSON.stringify(w)}`);

  process.stdout.write(JSON.stringify({ ok: true, balanceBefore, balanceAfter, watcher: w }) + '\n');
  await browser.close();
  process.exit(0);
} catch (e) {
  for (const [user, page] of pages) {
    const st = await page.evaluate(() => JSON.stringify(window.weirRoom)).catch((x) => String(x));
    logs.push(`${user}: weirRoom ${st}`);
  }
  process.stderr.write(logs.slice(-40).join('\n') + '\n');
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.message || e) }) + '\n');
  await browser.close();
  process.exit(1);
}

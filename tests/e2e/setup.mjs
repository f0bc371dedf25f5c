// What the room e2e scripts share: their command line (`--kebab-case VALUE`
// pairs into an object of defaults; unknown or missing ones end the run with
// exit 2 and one JSON line) and the browser (Debian's Chromium, or
// $CHROMIUM, driven by playwright-core).

import { accessSync, constants as fsConstants } from 'node:fs';

function setupError(error) {
  process.stdout.write(JSON.stringify({ ok: false, error }) + '\n');
  process.exit(2);
}

/** Parses argv into `defaults`' keys; `required` must end up set. */
export function parseArgs(defaults, required) {
  const args = { ...defaults };
  for (let i = 2; i < process.argv.length; i += 2) {
    const key = process.argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in args)) setupError(`unknown argument ${process.argv[i]}`);
    args[key] = key === 'timeoutMs' ? Number(process.argv[i + 1]) : process.argv[i + 1];
  }
  const missing = required.filter((k) => !args[k]);
  if (missing.length > 0) {
    const flags = required.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`);
    setupError(`need ${flags.slice(0, -1).join(', ')} and ${flags[flags.length - 1]}`);
  }
  return args;
}

/** `{ chromium, executablePath }`, or exit 2 saying what is missing. */
export async function browserTools() {
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  try {
    accessSync(executablePath, fsConstants.X_OK);
  } catch (_) {
    setupError(`Chromium not found at ${executablePath}`);
  }
  try {
    const { chromium } = await import('playwright-core');
    return { chromium, executablePath };
  } catch (e) {
    return setupError(`playwright-core missing (npm ci in tests/e2e): ${e.message}`);
  }
}

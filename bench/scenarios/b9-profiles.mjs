/**
 * B9: many profiles expiring together. 50 `oauth-device` profiles (against the local server,
 * explicit endpoints) whose tokens expire in the same second are added to a running daemon in
 * one edit of the config file. Target: exactly 50 refreshes (one per profile, counted at the
 * server by refresh token), and the cached getAccessToken() p50 of a client of an unrelated
 * profile (the built-in one; it receives every profile's pushes, read between its batches of
 * calls) within 1.5x of the same client against a daemon without profiles in this run (B1's
 * method; the client never takes another profile's push for its own token).
 */
import { chmod, mkdir, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { serializeCredentials } from '../../dist/shared/credentials.js';
import { DEFAULTS } from '../../dist/shared/config.js';
import { DEVICE_AUTHORIZATION_PATH, TOKEN_PATH } from '../../dist/daemon/oauth.js';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { credsFrom, startBenchDaemon } from '../lib/daemon.mjs';
import { REPO_ROOT } from '../lib/paths.mjs';
import { fmtUs, round, summarize } from '../lib/stats.mjs';
import { row, until } from './common.mjs';

const PROFILES = 50;
/** The tokens expire this long after they are written, and are refreshed this long before. */
const EXPIRES_IN_MS = 9_000;
const LEAD_S = 3;
/** The client measures until this long after the last refresh (their pushes have reached it by then). */
const MEASURE_AFTER_REFRESH_MS = 1_000;

/**
 * The client: B1's method (batches of sequential awaited cached calls, each batch timed), plus
 * the wall-clock window it measured in and how many calls answered another token than the first
 * (a push about another profile taken for its own).
 */
const CLIENT = `
import { TokenClient } from ${JSON.stringify(pathToFileURL(join(REPO_ROOT, 'dist', 'client', 'index.js')).href)};
const { perBatch } = JSON.parse(process.argv[1]);
// Measures until the bench says stop (a line on stdin).
let stop = false;
process.stdin.on('data', () => (stop = true));
const client = new TokenClient({ autostart: false });
const first = await client.getAccessToken();
let wrong = 0;
async function run(done) {
  const out = [];
  while (!done() || out.length < 100) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) if ((await client.getAccessToken()) !== first) wrong++;
    out.push(Number(process.hrtime.bigint() - t0) / perBatch);
    // Cached calls never leave the microtask queue: between batches the client reads its socket
    // (the pushes about the other profiles), as a real program between its bursts of calls would.
    await new Promise((resolve) => setImmediate(resolve));
  }
  return out;
}
const warm = performance.now() + 200;
await run(() => performance.now() > warm);
const startedAt = performance.timeOrigin + performance.now();
const ns = await run(() => stop);
const endedAt = performance.timeOrigin + performance.now();
process.stdout.write(JSON.stringify({ ns, wrong, startedAt, endedAt }) + '\\n');
await client.close();
process.stdin.destroy();
`;

/** Runs the client against `d` until `stop` settles; returns its per-call times (µs), window and wrong answers. */
function measureCached(d, { stop, perBatch }) {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, ['--input-type=module', '-e', CLIENT, JSON.stringify({ perBatch })], { env: d.env, stdio: ['pipe', 'pipe', 'pipe'] });
    void stop.then(() => proc.stdin.end('stop\n'));
    let out = '';
    let err = '';
    proc.stdout.on('data', (c) => (out += c));
    proc.stderr.on('data', (c) => (err += c));
    proc.once('error', reject);
    proc.once('close', (code) => {
      if (code !== 0) return reject(new Error(`B9 client exited ${code}: ${err.slice(0, 2000)}`));
      const r = JSON.parse(out);
      resolve({ us: r.ns.map((ns) => ns / 1000), wrong: r.wrong, startedAt: r.startedAt, endedAt: r.endedAt });
    });
  });
}

/** Writes 50 profiles (config file and token files) into the bench home before the daemon starts. */
async function writeProfiles(server, home) {
  const dir = join(home, '.one_dragon_alpha', 'profiles');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const expiry = Date.now() + EXPIRES_IN_MS;
  const profiles = {};
  const refreshTokens = new Set();
  for (let i = 0; i < PROFILES; i++) {
    const name = `dev-${i}`;
    const creds = { ...credsFrom(server), expiry_date: expiry };
    refreshTokens.add(creds.refresh_token);
    await writeFile(join(dir, `${name}.token.json`), serializeCredentials(creds), { mode: 0o600 });
    profiles[name] = {
      kind: 'oauth-device',
      device_authorization_endpoint: `${server.baseUrl}${DEVICE_AUTHORIZATION_PATH}`,
      token_endpoint: `${server.baseUrl}${TOKEN_PATH}`,
      client_id: DEFAULTS.clientId,
      base_url: `${server.baseUrl}/v1`,
      refresh_lead_seconds: LEAD_S,
    };
  }
  const configDir = join(home, '.config', 'qwen-tokend');
  await mkdir(configDir, { recursive: true, mode: 0o700 });
  // Renamed into place, as an editor saves it: the daemon never reads half a file.
  await writeFile(join(configDir, 'config.json.tmp'), JSON.stringify({ profiles }, null, 2), { mode: 0o600 });
  await rename(join(configDir, 'config.json.tmp'), join(configDir, 'config.json'));
  return { refreshTokens, expiry };
}

export async function runB9(ctx, { baselineMs = 4_000, perBatch = 1000 } = {}) {
  const { server } = ctx;
  // B1 in this run: the same worker against a daemon without profiles.
  const plain = await startBenchDaemon(server);
  let baseline;
  try {
    baseline = summarize((await measureCached(plain, { stop: sleep(baselineMs), perBatch })).us);
  } finally {
    await plain.close();
  }

  const refreshesOf = (tokens) => server.requests.filter((r) => r.form?.grant_type === 'refresh_token' && tokens.has(r.form.refresh_token));
  const d = await startBenchDaemon(server);
  try {
    // Added as a hand edit of the config file would add them: all 50 load in one go, their
    // tokens expiring in the same second.
    const seeded = await writeProfiles(server, join(d.root, 'home'));
    await until(async () => (await d.status()).profiles?.length === PROFILES + 1, 15_000, 'the 50 profiles to load');
    const refreshed = until(() => refreshesOf(seeded.refreshTokens).length >= PROFILES, 30_000, '50 refreshes');
    const measured = await measureCached(d, { stop: refreshed.then(() => sleep(MEASURE_AFTER_REFRESH_MS)), perBatch });
    const loaded = summarize(measured.us);
    await refreshed;
    const refreshes = refreshesOf(seeded.refreshTokens);
    const perToken = new Map();
    for (const r of refreshes) perToken.set(r.form.refresh_token, (perToken.get(r.form.refresh_token) ?? 0) + 1);
    const exactlyOnce = refreshes.length === PROFILES && [...perToken.values()].every((n) => n === 1);
    const first = Math.min(...refreshes.map((r) => r.at));
    const last = Math.max(...refreshes.map((r) => r.at));
    const during = first >= measured.startedAt && last <= measured.endedAt;
    const ratio = loaded.p50 / baseline.p50;
    const status = await d.status();
    const valid = status.profiles.filter((p) => p.name.startsWith('dev-') && p.state === 'valid').length;
    return [
      row('B9', `${PROFILES} oauth-device profiles expiring together`, {
        measured: `${refreshes.length} refreshes; cached p50 ${fmtUs(loaded.p50)} on an unrelated profile`,
        baseline: `no profiles: p50 ${fmtUs(baseline.p50)} (B1's method, same run)`,
        ratio: `${round(ratio, 2)}x`,
        target: `exactly ${PROFILES} refreshes; p50 ≤ 1.5x B1`,
        pass: exactlyOnce && valid === PROFILES && measured.wrong === 0 && during && ratio <= 1.5,
        data: {
          method: `batches of ${perBatch} sequential awaited calls (${baselineMs} ms for B1; from the profiles' load until ${MEASURE_AFTER_REFRESH_MS} ms after their last refresh) of the built-in profile's cached token, per-call time = batch time / ${perBatch}; refreshes counted at the server by refresh token`,
          refreshes: refreshes.length,
          profilesRefreshedOnce: [...perToken.values()].filter((n) => n === 1).length,
          refreshSpreadMs: last - first,
          refreshesDuringMeasurement: during,
          refreshesAfterMeasurementStartMs: [Math.round(first - measured.startedAt), Math.round(last - measured.startedAt)],
          measuredMs: Math.round(measured.endedAt - measured.startedAt),
          cachedTokenChanged: measured.wrong,
          profilesValidAfter: valid,
          loadedUs: roundAll(loaded),
          baselineUs: roundAll(baseline),
          ratio: round(ratio, 3),
        },
      }),
    ];
  } finally {
    await d.close();
  }
}

function roundAll(s) {
  return Object.fromEntries(Object.entries(s).map(([k, v]) => [k, round(v, 4)]));
}

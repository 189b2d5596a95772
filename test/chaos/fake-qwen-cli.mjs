// A stand-in for the Qwen CLI as a concurrent writer of ~/.qwen/oauth_creds.json, following
// the lock-and-write protocol on the facts page: an O_CREAT|O_EXCL lock file holding a random
// UUID (stale by mtime: renamed aside, then unlinked), a re-read of the credentials inside the
// lock, an HTTP refresh only when still needed, an atomic temp-file-and-rename write (0600),
// and deleting the credential file when the server rejects the refresh token.
//
// Configured by environment: FAKE_QWEN_HOME, FAKE_TOKEN_URL, FAKE_CLIENT_ID, FAKE_MODE
// (rounds | hold-lock | rejected-refresh), FAKE_ROUNDS, FAKE_STALE_MS, FAKE_REFRESH_BELOW_MS
// (refresh when the token has less than this left; "a-b" draws it per round), FAKE_PAUSE_MS, FAKE_REFRESH_TOKEN
// (rejected-refresh: the stale token it holds in memory).
// Talks to its parent in JSON lines on stdout, with fingerprints only, never a token.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { open, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

const env = process.env;
const home = env.FAKE_QWEN_HOME;
const credsPath = join(home, 'oauth_creds.json');
const lockPath = join(home, 'oauth_creds.lock');
const staleMs = Number(env.FAKE_STALE_MS ?? 35_000);
// "a" or "a-b": refresh when less than this is left (a range: drawn anew each round).
const [belowMin, belowMax = belowMin] = String(env.FAKE_REFRESH_BELOW_MS ?? 30_000).split('-').map(Number);
const refreshBelow = () => belowMin + Math.random() * (belowMax - belowMin);
const pauseMs = Number(env.FAKE_PAUSE_MS ?? 100);

const say = (msg) => process.stdout.write(`${JSON.stringify(msg)}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fp = (t) => {
  if (!t) return 'none';
  const h = createHash('sha256').update(t).digest('hex');
  return `${h.slice(0, 4)}…${h.slice(-4)}`;
};

/** The credentials, or null when the file is missing or not usable (the CLI then treats it as absent). */
async function readCreds() {
  try {
    const c = JSON.parse(await readFile(credsPath, 'utf8'));
    const ok = ['access_token', 'refresh_token', 'token_type'].every((k) => typeof c[k] === 'string' && c[k]) && typeof c.expiry_date === 'number';
    return ok ? c : null;
  } catch {
    return null;
  }
}

async function writeCreds(c) {
  const temp = `${credsPath}.tmp.${randomBytes(6).toString('hex')}`;
  await writeFile(temp, JSON.stringify(c, null, 2), { mode: 0o600 });
  await rename(temp, credsPath);
}

const stats = { refreshes: 0, skipped: 0, brokeStale: 0, lockWaits: 0, rejected: 0, errors: 0 };

/** Takes the lock: O_EXCL create with a UUID; a lock older than staleMs is renamed aside and unlinked. */
async function acquire(timeoutMs = 60_000) {
  const id = randomUUID();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const fh = await open(lockPath, 'wx', 0o600);
      await fh.writeFile(id);
      await fh.close();
      return id;
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
    }
    try {
      const st = await stat(lockPath);
      if (Date.now() - st.mtimeMs > staleMs) {
        const aside = `${lockPath}.stale.${randomUUID()}`;
        await rename(lockPath, aside);
        await unlink(aside).catch(() => undefined);
        stats.brokeStale++;
        continue;
      }
    } catch (err) {
      if (err.code === 'ENOENT') continue;
      throw err;
    }
    if (Date.now() > deadline) throw new Error('lock timeout');
    stats.lockWaits++;
    await sleep(20 + Math.random() * 30);
  }
}

async function release(id) {
  try {
    if ((await readFile(lockPath, 'utf8')).trim() === id) await unlink(lockPath);
  } catch {
    /* gone already */
  }
}

/** RFC 6749 §6 refresh against the local server; returns { status, body }. */
async function refreshGrant(refreshToken) {
  const res = await fetch(env.FAKE_TOKEN_URL, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json', 'user-agent': 'fake-qwen-cli' },
    body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken, client_id: env.FAKE_CLIENT_ID }),
    signal: AbortSignal.timeout(5_000),
  });
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  return { status: res.status, body };
}

/** One refresh with the given refresh token inside the lock; writes or deletes the file like the Qwen CLI. */
async function refreshWith(current) {
  const { status, body } = await refreshGrant(current.refresh_token);
  if (status === 200 && body && typeof body.access_token === 'string') {
    const next = {
      access_token: body.access_token,
      refresh_token: body.refresh_token ?? current.refresh_token,
      token_type: body.token_type ?? 'Bearer',
      resource_url: body.resource_url ?? current.resource_url,
      expiry_date: Date.now() + body.expires_in * 1000,
    };
    await writeCreds(next);
    stats.refreshes++;
    return next;
  }
  if (status === 400 || status === 401) {
    // What the Qwen CLI does on a rejected refresh token.
    await unlink(credsPath).catch(() => undefined);
    stats.rejected++;
    return null;
  }
  stats.errors++;
  return current;
}

async function rounds(n) {
  let last = null;
  for (let round = 0; round < n; round++) {
    await sleep(Math.random() * pauseMs);
    const before = await readCreds();
    if (!before) {
      stats.errors++;
      continue;
    }
    const id = await acquire();
    try {
      // Re-read inside the lock: someone may have refreshed while we waited.
      const inside = await readCreds();
      if (!inside) {
        stats.errors++;
      } else if (inside.expiry_date - Date.now() > refreshBelow()) {
        stats.skipped++;
        last = inside;
      } else {
        last = await refreshWith(inside);
      }
    } finally {
      await release(id);
    }
  }
  return last;
}

const mode = env.FAKE_MODE ?? 'rounds';
if (mode === 'rounds') {
  const last = await rounds(Number(env.FAKE_ROUNDS ?? 10));
  const onDisk = await readCreds();
  say({ event: 'done', ...stats, last: fp(last?.refresh_token), onDisk: fp(onDisk?.refresh_token) });
} else if (mode === 'hold-lock') {
  const id = await acquire();
  say({ event: 'locked', id });
  // Hold it until killed, like a CLI process that died mid-refresh.
  setInterval(() => undefined, 1_000);
} else if (mode === 'rejected-refresh') {
  // A CLI process whose in-memory refresh token is no longer valid refreshes with it.
  const id = await acquire();
  try {
    const onDisk = await readCreds();
    await refreshWith({ ...(onDisk ?? {}), refresh_token: env.FAKE_REFRESH_TOKEN });
  } finally {
    await release(id);
  }
  say({ event: 'done', ...stats });
} else {
  say({ event: 'error', message: `unknown FAKE_MODE ${mode}` });
  process.exit(2);
}

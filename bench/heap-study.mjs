#!/usr/bin/env node
/**
 * B6c's question, answered with heap snapshots: when the daemon's RSS grows between two points of
 * a long run of getAccessToken requests, is it live JavaScript objects (a leak) or V8 sizing its
 * heap (a larger young generation, pages kept for reuse)?
 *
 *   node bench/heap-study.mjs [--millions 7] [--snapshots 4,5,7]
 *
 * Serves requests a million at a time (pipelined as B6c does) and prints, per million, the
 * daemon's RSS; at the millions named, a heap snapshot (which runs a full GC first) gives the
 * live heap: its total size, its object count and the constructors holding the most. Equal live
 * heaps with a larger RSS mean heap sizing; a live heap that grows with the requests is a leak.
 * A snapshot's own memory stays in RSS: compare RSS only up to the first snapshot, or run with
 * `--snapshots 0` for RSS alone. Writes bench/results/heap-study.json. Run it with the Node to study first on PATH; extra
 * daemon flags come from BENCH_DAEMON_ARGS, as for the bench.
 */
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { startWorker } from './lib/children.mjs';
import { daemonArgs, startBenchDaemon } from './lib/daemon.mjs';
import { REPO_ROOT } from './lib/paths.mjs';
import { loadQwenServerModule } from './lib/qwen-server.mjs';
import { fmtMb } from './lib/stats.mjs';
import { withWorkers } from './scenarios/common.mjs';

const STEP = 1_000_000;

/** One million getAccessToken requests over 2 processes x 4 raw connections, window 128 (as B6c). */
async function serveMillion(d) {
  return withWorkers(async (workers) => {
    for (let i = 0; i < 2; i++) {
      workers.push(startWorker('pipeline.mjs', { socketPath: d.socketPath, connections: 4, total: STEP / 2, window: 128 }, d.env));
    }
    const results = await Promise.all(workers.map((w) => w.next('result')));
    const received = results.reduce((n, r) => n + r.received, 0);
    if (received !== STEP || results.some((r) => r.errorChunks > 0 || !r.firstOk)) throw new Error(`a million requests went wrong: ${received} answered`);
  });
}

/** Live heap of a snapshot file: total self size, node count, and the ten largest constructors. */
async function liveHeap(file) {
  const snap = JSON.parse(await readFile(file, 'utf8'));
  const { node_fields: fields, node_types: [types] } = snap.snapshot.meta;
  const width = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const byName = new Map();
  let total = 0;
  let count = 0;
  for (let i = 0; i < snap.nodes.length; i += width) {
    const size = snap.nodes[i + sizeAt];
    total += size;
    count++;
    const type = types[snap.nodes[i + typeAt]];
    const key = type === 'object' || type === 'closure' ? `${type}:${snap.strings[snap.nodes[i + nameAt]]}` : type;
    const entry = byName.get(key) ?? { size: 0, count: 0 };
    entry.size += size;
    entry.count++;
    byName.set(key, entry);
  }
  const top = [...byName].sort((a, b) => b[1].size - a[1].size).slice(0, 10).map(([name, e]) => ({ name, ...e }));
  return { totalBytes: total, objects: count, top };
}

/** Asks the daemon for a heap snapshot (SIGUSR2, see --heapsnapshot-signal) and reads it. */
async function snapshot(d, dir) {
  const before = new Set(await readdir(dir));
  d.daemon.proc.kill('SIGUSR2');
  for (let i = 0; i < 600; i++) {
    await sleep(100);
    const fresh = (await readdir(dir)).filter((f) => !before.has(f) && f.endsWith('.heapsnapshot'));
    if (fresh.length > 0) {
      // Written in one go once the name appears? Wait until its size stops changing.
      const file = join(dir, fresh[0]);
      let last = -1;
      for (;;) {
        const text = await readFile(file, 'utf8').catch(() => '');
        if (text.length === last && text.endsWith('}')) break;
        last = text.length;
        await sleep(200);
      }
      const heap = await liveHeap(file);
      await rm(file);
      return heap;
    }
  }
  throw new Error('no heap snapshot appeared');
}

async function main() {
  const { values } = parseArgs({ options: { millions: { type: 'string', default: '7' }, snapshots: { type: 'string', default: '4,5,7' } } });
  const millions = Number(values.millions);
  const at = new Set(values.snapshots.split(',').map(Number));
  const dir = await mkdtemp(join(tmpdir(), 'qtd-heap-'));
  const { startQwenServer } = await loadQwenServerModule();
  const server = await startQwenServer();
  const d = await startBenchDaemon(server, { spawnOptions: { args: [...daemonArgs(), '--heapsnapshot-signal=SIGUSR2', `--diagnostic-dir=${dir}`] } });
  const steps = [];
  try {
    await sleep(1000);
    steps.push({ millions: 0, rssKb: await d.daemon.rssKb() });
    for (let m = 1; m <= millions; m++) {
      await serveMillion(d);
      await sleep(1000);
      const step = { millions: m, rssKb: await d.daemon.rssKb() };
      if (at.has(m)) {
        step.live = await snapshot(d, dir);
        step.rssAfterSnapshotKb = await d.daemon.rssKb();
      }
      steps.push(step);
      const live = step.live ? `; live heap ${fmtMb(step.live.totalBytes / 1024)} in ${step.live.objects.toLocaleString('en-US')} objects` : '';
      process.stdout.write(`${m}M requests: RSS ${fmtMb(step.rssKb)}${live}\n`);
    }
  } finally {
    await d.close();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  }
  const out = join(REPO_ROOT, 'bench', 'results');
  await mkdir(out, { recursive: true });
  await writeFile(join(out, 'heap-study.json'), `${JSON.stringify({ date: new Date().toISOString(), node: process.version, steps }, null, 2)}\n`);
  process.stdout.write(`Node ${process.version}; details in bench/results/heap-study.json\n`);
}

main().catch((err) => {
  process.stderr.write(`heap-study: ${err?.stack ?? err}\n`);
  process.exit(1);
});

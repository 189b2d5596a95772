#!/usr/bin/env node
/**
 * `npm run bench`: runs B1-B8 against the real daemon (dist/bin/qwen-tokend.js) and the local Qwen
 * server, prints one table (each figure beside its same-run baseline) and writes
 * bench/results/latest.json. Exits 1 when any target is missed.
 *
 *   node bench/run.mjs [--only B2,B4]
 *   node bench/run.mjs --b4-rounds N   (how often B4's target can be met here; see runB4Rounds)
 */
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { cpus, loadavg, totalmem, release } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DAEMON_BIN, REPO_ROOT } from './lib/paths.mjs';
import { loadQwenServerModule } from './lib/qwen-server.mjs';
import { runB1 } from './scenarios/b1-cached.mjs';
import { runB2, runB3 } from './scenarios/b2-b3-rpc.mjs';
import { runB4, runB4Rounds } from './scenarios/b4-expired.mjs';
import { runConnections } from './scenarios/b5-b6-connections.mjs';
import { runB7, runB8 } from './scenarios/b7-b8-startup.mjs';
import { runB9 } from './scenarios/b9-profiles.mjs';
import { row } from './scenarios/common.mjs';
import { fmtMs } from './lib/stats.mjs';

const SCENARIOS = [
  { ids: ['B1'], run: runB1 },
  { ids: ['B2'], run: runB2 },
  { ids: ['B3'], run: runB3 },
  { ids: ['B4'], run: runB4 },
  { ids: ['B5', 'B6'], run: runConnections },
  { ids: ['B7'], run: runB7 },
  { ids: ['B8'], run: runB8 },
  { ids: ['B9'], run: runB9 },
];

function progress(text) {
  process.stderr.write(`${text}\n`);
}

/** A Markdown table with its columns padded to their widest cell. */
function markdownTable(head, cells) {
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  const line = (c) => `| ${c.map((v, i) => v.padEnd(widths[i])).join(' | ')} |`;
  return [line(head), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...cells.map(line)].join('\n');
}

function table(rows) {
  const head = ['id', 'scenario', 'measured', 'baseline (same run)', 'ratio', 'target', 'result'];
  return markdownTable(head, rows.map((r) => [r.id, r.name, r.measured, r.baseline, r.ratio, r.target, r.pass ? 'pass' : 'FAIL']));
}

/** A difference in ms, with its sign (a burst may beat the baseline by a little). */
function signedMs(ms) {
  return ms < 0 ? `-${fmtMs(-ms)}` : fmtMs(ms);
}

/** `--b4-rounds N`: the B4 study. Prints each burst and a summary, writes bench/results/b4-rounds.json. */
async function b4Rounds(ctx, machine, rounds) {
  const started = performance.now();
  const study = await runB4Rounds(ctx, {
    rounds,
    onBurst: (b) =>
      progress(`bench: round ${b.round} ${b.way.padEnd(7)} p99 ${fmtMs(b.p99Ms)} = baseline ${fmtMs(b.baselineMs)} + ${signedMs(b.overBaselineMs)} ${b.met ? 'met' : 'missed'}`),
  });
  machine.loadAtEnd = loadavg().map((v) => Math.round(v * 100) / 100);
  const names = { bare: 'bare server, raw clients', raw: 'daemon, raw clients', library: 'daemon, library clients (B4)' };
  const head = ['the same burst of 1,000 calls', 'met p99 - refresh ≤ bare p99 - refresh + 10 ms', 'p99 - baseline: min / median / max', 'median CPU: server, clients, floor'];
  const cells = study.summary.map((s) => [
    names[s.way],
    `${s.met} of ${s.bursts}`,
    `${signedMs(s.overBaselineMs.min)} / ${signedMs(s.overBaselineMs.median)} / ${signedMs(s.overBaselineMs.max)}`,
    `${fmtMs(s.medianCpuMs.server)}, ${fmtMs(s.medianCpuMs.clients)}, ${fmtMs(s.medianCpuMs.floor)}`,
  ]);
  process.stdout.write(`${markdownTable(head, cells)}\n\n`);
  const seconds = Math.round((performance.now() - started) / 100) / 10;
  const dir = join(REPO_ROOT, 'bench', 'results');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'b4-rounds.json'), `${JSON.stringify({ date: new Date().toISOString(), machine, seconds, ...study }, null, 2)}\n`);
  process.stdout.write(`${machine.cores} cores, Node ${machine.node}, load ${machine.loadAtStart.join(' ')} -> ${machine.loadAtEnd.join(' ')}; ${seconds} s; details in bench/results/b4-rounds.json\n`);
  return 0;
}

async function main() {
  const { values } = parseArgs({ options: { only: { type: 'string' }, 'b4-rounds': { type: 'string' } } });
  const b4RoundsCount = values['b4-rounds'] === undefined ? null : Number(values['b4-rounds']);
  if (b4RoundsCount !== null && !(Number.isInteger(b4RoundsCount) && b4RoundsCount >= 1)) {
    progress(`bench: --b4-rounds takes a whole number of rounds (1 or more), got "${values['b4-rounds']}"`);
    return 2;
  }
  const only = values.only ? new Set(values.only.toUpperCase().split(',').map((s) => s.trim())) : null;
  if (!existsSync(DAEMON_BIN)) {
    progress(`bench: ${DAEMON_BIN} is missing; run \`npm run build\` first`);
    return 2;
  }
  const machine = {
    cores: cpus().length,
    cpu: cpus()[0]?.model ?? 'unknown',
    memoryGb: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    platform: `${process.platform} ${release()}`,
    loadAtStart: loadavg().map((v) => Math.round(v * 100) / 100),
  };
  progress(`bench: ${machine.cores} cores (${machine.cpu}), Node ${machine.node}, load ${machine.loadAtStart.join(' ')}`);
  const { startQwenServer } = await loadQwenServerModule();
  const server = await startQwenServer();
  const ctx = { server };
  if (b4RoundsCount !== null) {
    try {
      return await b4Rounds(ctx, machine, b4RoundsCount);
    } finally {
      await server.close();
    }
  }
  const started = performance.now();
  const rows = [];
  try {
    for (const s of SCENARIOS) {
      if (only && !s.ids.some((id) => only.has(id))) continue;
      const t0 = performance.now();
      progress(`bench: ${s.ids.join('+')} ...`);
      try {
        rows.push(...(await s.run(ctx)));
      } catch (err) {
        for (const id of s.ids) {
          rows.push(row(id, 'scenario failed to run', { measured: 'error', target: '-', pass: false, data: { error: String(err?.stack ?? err) } }));
        }
        progress(`bench: ${s.ids.join('+')} failed: ${err?.stack ?? err}`);
      }
      progress(`bench: ${s.ids.join('+')} done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
  } finally {
    await server.close();
  }
  rows.sort((a, b) => a.id.localeCompare(b.id));
  machine.loadAtEnd = loadavg().map((v) => Math.round(v * 100) / 100);
  const passed = rows.every((r) => r.pass);
  const result = {
    date: new Date().toISOString(),
    machine,
    seconds: Math.round((performance.now() - started) / 100) / 10,
    passed,
    scenarios: rows,
  };
  const dir = join(REPO_ROOT, 'bench', 'results');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'latest.json'), `${JSON.stringify(result, null, 2)}\n`);
  process.stdout.write(`${table(rows)}\n\n`);
  process.stdout.write(
    `${machine.cores} cores (${machine.cpu}), Node ${machine.node}, load ${machine.loadAtStart.join(' ')} -> ${machine.loadAtEnd.join(' ')}; ${result.seconds} s; ` +
      `${passed ? 'all targets met' : `${rows.filter((r) => !r.pass).length} target(s) missed`}; details in bench/results/latest.json\n`,
  );
  return passed ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    progress(`bench: ${err?.stack ?? err}`);
    process.exit(2);
  },
);

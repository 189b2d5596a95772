/**
 * The gateway bench's client, in its own process. Given `{mode, url, headers, ...}` by its
 * parent over IPC:
 * - `latency`: `connections` closed loops of POSTs for `durationMs`; sends back every
 *   request's latency (µs) and the count.
 * - `sse`: opens `streams` streamed completions at once; sends back each event's delay
 *   (receive time − the upstream's stamp, ms), each event's stamp, the time the last stream's
 *   answer head arrived (every stream open from then on) and how many streams finished.
 */
import { Agent, request } from 'node:http';

// The system-wide monotonic clock (ms): the same in every process, so a stamp written by the
// upstream and read here need no correction (performance.timeOrigin differs by milliseconds).
const now = () => Number(process.hrtime.bigint()) / 1e6;

function post(agent, url, headers, body) {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', agent, headers: { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      res.on('data', () => undefined);
      res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`status ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function latency({ url, headers, connections, durationMs }) {
  const agent = new Agent({ keepAlive: true, maxSockets: connections });
  const body = JSON.stringify({ model: 'bench-model', messages: [{ role: 'user', content: 'hi' }] });
  const samples = [];
  let errors = 0;
  const end = performance.now() + durationMs;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: connections }, async () => {
      while (performance.now() < end) {
        const t0 = performance.now();
        try {
          await post(agent, url, headers, body);
          samples.push((performance.now() - t0) * 1000);
        } catch {
          errors += 1;
        }
      }
    }),
  );
  const elapsedMs = performance.now() - started;
  agent.destroy();
  return { samples, errors, elapsedMs };
}

function stream(agent, url, headers, body, delays, stamps, opened) {
  return new Promise((resolve) => {
    const req = request(url, { method: 'POST', agent, headers: { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        return resolve(false);
      }
      opened.push(now());
      let buffered = '';
      res.setEncoding('utf8');
      res.on('data', (text) => {
        const at = now();
        buffered += text;
        let end = buffered.indexOf('\n\n');
        while (end !== -1) {
          const event = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          const m = /"t":([0-9.]+)/.exec(event);
          if (m) {
            delays.push(at - Number(m[1]));
            stamps.push(Number(m[1]));
          }
          end = buffered.indexOf('\n\n');
        }
      });
      res.on('end', () => resolve(true));
      res.on('error', () => resolve(false));
    });
    req.on('error', () => resolve(false));
    req.end(body);
  });
}

async function sse({ url, headers, streams, events, intervalMs }) {
  const agent = new Agent({ keepAlive: false, maxSockets: Infinity });
  const body = JSON.stringify({ model: 'bench-model', stream: true, events, intervalMs, messages: [{ role: 'user', content: 'hi' }] });
  const delays = [];
  const stamps = [];
  const opened = [];
  const results = await Promise.all(Array.from({ length: streams }, () => stream(agent, url, headers, body, delays, stamps, opened)));
  const allOpenAt = opened.reduce((a, b) => Math.max(a, b), 0);
  return { delays, stamps, allOpenAt, finished: results.filter(Boolean).length };
}

process.on('message', async (task) => {
  const result = task.mode === 'sse' ? await sse(task) : await latency(task);
  process.send(result, () => process.exit(0));
});

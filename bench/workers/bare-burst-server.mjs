// B4 context: the least any server can do for a burst on an expired token. It answers NDJSON
// lines with a line of the daemon's reply size carrying the request id; after "arm", the first
// line it receives starts one HTTP refresh at the local Qwen server and every line waits for it.
import { unlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { args, commands, fail, say } from './protocol.mjs';

const { socketPath, replyBytes, warmUrl } = args;
let armed = null;
let refresh = null;
const pad = 'x'.repeat(Math.max(0, replyBytes - 1 - JSON.stringify({ jsonrpc: '2.0', id: 0, result: { pad: '' } }).length - 3));
const reply = (id) => `{"jsonrpc":"2.0","id":${id},"result":{"pad":"${pad}"}}\n`;

function startRefresh() {
  const { url, form } = armed;
  armed = null;
  return fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
    body: new URLSearchParams(form),
  }).then((res) => res.json().then(() => res.ok));
}

const server = createServer((socket) => {
  socket.on('error', () => socket.destroy());
  let buffer = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk) => {
    buffer += chunk;
    const lines = buffer.split('\n');
    buffer = lines.pop();
    const ids = lines.filter(Boolean).map((l) => JSON.parse(l).id);
    if (armed) refresh = startRefresh();
    const answer = () => socket.write(ids.map(reply).join(''));
    if (refresh) void refresh.then(answer);
    else answer();
  });
});
server.on('error', fail);
// Like the daemon, which has made an HTTP call by then: the first fetch loads Node's HTTP client.
await fetch(warmUrl).then((r) => r.arrayBuffer()).catch(() => undefined);
server.listen(socketPath, () => say({ type: 'ready' }));
commands(
  (msg) => {
    if (msg.cmd === 'arm') {
      armed = { url: msg.url, form: msg.form };
      refresh = null;
      say({ type: 'armed' });
    }
  },
  () => {
    server.close();
    try {
      unlinkSync(socketPath);
    } catch {
      /* gone */
    }
    process.exit(0);
  },
);

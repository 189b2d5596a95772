// The B2/B3 baseline: a bare node:net NDJSON server. For every line it receives it answers one
// line of `replyBytes` bytes (the size of the daemon's getAccessToken reply), and nothing else.
import { unlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { args, commands, fail, say } from './protocol.mjs';

const { socketPath, replyBytes } = args;
// A valid JSON-RPC response padded to the daemon's reply size (newline included).
const skeleton = { jsonrpc: '2.0', id: 0, result: { pad: '' } };
const padLength = replyBytes - 1 - JSON.stringify(skeleton).length;
skeleton.result.pad = 'x'.repeat(Math.max(0, padLength));
const reply = Buffer.from(`${JSON.stringify(skeleton)}\n`);

const server = createServer((socket) => {
  socket.on('error', () => socket.destroy());
  socket.on('data', (chunk) => {
    let lines = 0;
    for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) lines++;
    if (lines === 1) socket.write(reply);
    else if (lines > 1) socket.write(Buffer.concat(Array(lines).fill(reply)));
  });
});
server.on('error', fail);
server.listen(socketPath, () => say({ type: 'ready', replyBytes: reply.length }));
commands(
  () => undefined,
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

/**
 * The gateway bench's floor below HTTP: a raw TCP pipe in node, in its own process. Each client
 * connection gets its own upstream connection and the bytes are piped both ways unread, so it
 * can add no header (the load sends the credential itself). What any proxy written in node
 * pays before it parses a byte. Given `{upstreamPort}` over IPC, it listens on loopback and
 * sends `{port}` back.
 */
import { connect, createServer } from 'node:net';

process.once('message', ({ upstreamPort }) => {
  const server = createServer({ noDelay: true }, (client) => {
    const up = connect({ host: '127.0.0.1', port: upstreamPort, noDelay: true });
    client.pipe(up);
    up.pipe(client);
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
  });
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
});
process.on('disconnect', () => process.exit(0));
// An orderly exit on SIGTERM too, so `--cpu-prof` (BENCH_FLOOR_ARGS) writes its profile.
process.on('SIGTERM', () => process.exit(0));

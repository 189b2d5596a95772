/**
 * The gateway's upstream client against local servers: TLS with connection reuse, request
 * bodies kept and streamed, failures classified (unreachable, timeout, aborted, unreadable),
 * and connections the upstream closed while idle never used again.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Cancellation, UpstreamFailure, UpstreamPool, type UpstreamRequest } from '../daemon/gateway/upstream.js';

type Handler = (req: IncomingMessage, body: Buffer, res: ServerResponse) => void;

/** Routes by path; records each request's body and how many connections were opened. */
function handlerFor(routes: Record<string, Handler>, seen: { connections: number; bodies: Buffer[] }) {
  return {
    onConnection: () => (seen.connections += 1),
    onRequest: (req: IncomingMessage, res: ServerResponse) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks);
        seen.bodies.push(body);
        routes[req.url ?? '/']!(req, body, res);
      });
    },
  };
}

const routes: Record<string, Handler> = {
  '/v1/json': (_req, _body, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"ok":true}');
  },
  '/v1/stream': (_req, _body, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write('data: 1\n\n');
    setTimeout(() => res.end('data: [DONE]\n\n'), 20);
  },
  '/v1/echo': (req, body, res) => {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'x-request-te': String(req.headers['transfer-encoding'] ?? '') });
    res.end(body);
  },
  '/v1/silent': () => undefined,
  '/v1/slow': (_req, _body, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write('data: 1\n\n');
  },
};

function listening(server: Server | NetServer): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)));
}

function call(pool: UpstreamPool, url: string, extra: Partial<UpstreamRequest> = {}) {
  return pool.send({ url: new URL(url), method: 'POST', fields: ['content-type', 'application/json'], body: Buffer.from('{}'), timeoutMs: 5_000, cancel: new Cancellation(), ...extra });
}

describe('upstream client over plain HTTP', () => {
  const seen = { connections: 0, bodies: [] as Buffer[] };
  const pool = new UpstreamPool();
  let server: Server;
  let base: string;

  beforeAll(async () => {
    const h = handlerFor(routes, seen);
    server = createServer({ keepAliveTimeout: 2_000 }, h.onRequest);
    server.on('connection', h.onConnection);
    base = `http://127.0.0.1:${await listening(server)}`;
  });
  afterAll(() => {
    pool.close();
    server.closeAllConnections();
    server.close();
  });

  it('keeps the connection for the next request, and reads a streamed answer decoded', async () => {
    const before = seen.connections;
    const first = await call(pool, `${base}/v1/json`);
    expect(first.status).toBe(200);
    expect((await first.readAll(1024))?.toString()).toBe('{"ok":true}');
    // undici hands a connection back one event loop turn after an answer ends.
    await new Promise((r) => setImmediate(r));
    const second = await call(pool, `${base}/v1/stream`);
    expect(second.framing).toBe('stream');
    expect((await second.readAll(1024))?.toString()).toBe('data: 1\n\ndata: [DONE]\n\n');
    expect(seen.connections - before).toBe(1);
  });

  it('streams a body of unknown length chunked, and one of known length as it is', async () => {
    const payload = Buffer.alloc(200_000, 'b');
    for (const length of [null, payload.length]) {
      const answer = await call(pool, `${base}/v1/echo`, {
        body: {
          length,
          write: (sink) => {
            sink.write(payload.subarray(0, 100_000));
            sink.end(payload.subarray(100_000));
          },
        },
      });
      expect(answer.field('x-request-te')).toBe(length === null ? 'chunked' : '');
      expect((await answer.readAll(1_000_000))?.equals(payload)).toBe(true);
    }
  });

  it('a connection the upstream closed while idle is not used again', async () => {
    const answer = await call(pool, `${base}/v1/json`);
    await answer.readAll(1024);
    server.closeIdleConnections();
    await new Promise((r) => setTimeout(r, 100));
    const again = await call(pool, `${base}/v1/json`);
    expect(again.status).toBe(200);
    expect((await again.readAll(1024))?.toString()).toBe('{"ok":true}');
  });

  it('classifies failures: unreachable, timeout before the head, aborted by the client, broken in the body', async () => {
    const closed = createNetServer();
    const port = await listening(closed);
    await new Promise((r) => closed.close(r));
    await expect(call(pool, `http://127.0.0.1:${port}/v1/json`)).rejects.toMatchObject({ kind: 'unreachable' });
    await expect(call(pool, `${base}/v1/silent`, { timeoutMs: 200 })).rejects.toMatchObject({ kind: 'timeout' });

    const cancel = new Cancellation();
    const pending = call(pool, `${base}/v1/silent`, { cancel });
    setTimeout(() => cancel.cancel(), 50);
    await expect(pending).rejects.toMatchObject({ kind: 'aborted' });

    const slow = await call(pool, `${base}/v1/slow`, { timeoutMs: 200 });
    expect(await slow.readAll(1024)).toBeNull();
  });

  it('an answer it cannot read fails as unreachable, naming the reason', async () => {
    const liar = createNetServer((socket) => socket.end('HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab'));
    const port = await listening(liar);
    const failure = await call(pool, `http://127.0.0.1:${port}/v1/json`).catch((err: unknown) => err);
    expect(failure).toBeInstanceOf(UpstreamFailure);
    expect((failure as UpstreamFailure).message).toMatch(/cannot read/);
    liar.close();
  });
});

const openssl = ['/usr/bin/openssl', '/bin/openssl', '/usr/local/bin/openssl'].find((p) => existsSync(p));

describe.skipIf(!openssl)('upstream client over TLS', () => {
  const seen = { connections: 0, bodies: [] as Buffer[] };
  let pool: UpstreamPool;
  let server: Server;
  let base: string;
  let dir: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qgw-tls-'));
    execFileSync(openssl!, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { stdio: 'ignore' });
    const [key, cert] = await Promise.all([readFile(join(dir, 'key.pem')), readFile(join(dir, 'cert.pem'))]);
    const h = handlerFor(routes, seen);
    server = createHttpsServer({ key, cert, keepAliveTimeout: 2_000 }, h.onRequest);
    server.on('secureConnection', h.onConnection);
    base = `https://localhost:${await listening(server)}`;
    pool = new UpstreamPool({ ca: cert });
  });
  afterAll(async () => {
    pool?.close();
    server?.closeAllConnections();
    server?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('verifies the certificate by name and keeps the connection', async () => {
    const before = seen.connections;
    for (const path of ['/v1/json', '/v1/stream', '/v1/json']) {
      const answer = await call(pool, `${base}${path}`);
      expect(answer.status).toBe(200);
      expect((await answer.readAll(1024))?.length).toBeGreaterThan(0);
      await new Promise((r) => setImmediate(r));
    }
    expect(seen.connections - before).toBe(1);
  });

  it('refuses a certificate it does not trust', async () => {
    const untrusting = new UpstreamPool();
    await expect(call(untrusting, `${base}/v1/json`)).rejects.toMatchObject({ kind: 'unreachable' });
    untrusting.close();
  });
});

/**
 * The gateway's answers to a security review: methods that echo or tunnel, the credential in
 * the headers of any answer and in escaped spellings, repeated Content-Encoding lines, parser
 * errors on a connection whose answer is already going out, clients that hang up mid-body,
 * the model list's body limit and loopback TCP changes that overlap. Each case runs the
 * gateway in this process against a local upstream that misbehaves as the case needs.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, createServer as createNetServer, type AddressInfo } from 'node:net';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GatewayProfile } from '../daemon/gateway/profiles.js';
import { fingerprint } from '../shared/fingerprint.js';
import { httpCall, profileSet, rawCall, startGateway, type GatewayHarness } from './support/gateway-harness.js';

/** A made-up API key with the characters encoders escape (`/`, `+`, `=`). */
const KEY = 'sk-hard/en+ing=0123456789abcdefXYZ';
const HEADER_MARKER = `[redacted key ${fingerprint(KEY).replace('…', '...')}]`;
const BODY_MARKER = `[redacted key ${fingerprint(KEY)}]`;

/** `text` percent-encoded with lower-case hex digits, as some encoders write it. */
const lowerHex = (text: string) => encodeURIComponent(text).replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase());

/** Whether `text` holds the key in any spelling an upstream might use (a boolean, so a failure never prints it). */
function leaks(text: string): boolean {
  const forms = [KEY, KEY.replaceAll('/', '\\/'), encodeURIComponent(KEY), lowerHex(KEY), KEY.replaceAll('+', '\\u002B')];
  return forms.some((form) => text.includes(form));
}

function keyProfile(name: string, base: () => string): GatewayProfile {
  return {
    name,
    kind: 'api-key',
    retryOnAuthFailure: false,
    async baseUrl() {
      return base();
    },
    async credentialHeaders() {
      return { authorization: `Bearer ${KEY}` };
    },
  };
}

async function listenLocal(server: Server): Promise<string> {
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
}

/** Polls (no time limit of its own; the test's timeout bounds it) until `check` holds. */
async function until(check: () => boolean): Promise<void> {
  while (!check()) await new Promise((r) => setTimeout(r, 10));
}

/**
 * Writes `head` on a fresh connection; once the received bytes include `when`, writes `then`
 * (when given). Resolves with everything received when the gateway closes the connection.
 */
function rawExchange(socketPath: string, head: string, when?: string, then?: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect(socketPath);
    let out = '';
    let sent = false;
    socket.on('data', (d: Buffer) => {
      out += d.toString('latin1');
      if (!sent && when !== undefined && then !== undefined && out.includes(when)) {
        sent = true;
        socket.write(then);
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(out));
    socket.on('connect', () => socket.write(head));
  });
}

/** Upstream answers, by path; every one quotes the credential it was sent somewhere. */
function misbehave(req: IncomingMessage, res: ServerResponse): void {
  const auth = req.headers.authorization ?? '';
  const sent = auth.replace(/^Bearer /, '');
  const path = req.url ?? '';
  if (req.method === 'TRACE') {
    // What RFC 9110 §9.3.8 asks of a server: the request echoed back, credential included.
    res.writeHead(200, { 'content-type': 'message/http' });
    res.end(`TRACE ${path} HTTP/1.1\r\nauthorization: ${auth}\r\n`);
  } else if (path.startsWith('/v1/redirect')) {
    res.writeHead(302, { location: `https://example.test/cb?key=${encodeURIComponent(sent)}`, 'x-debug': `saw ${auth}`, 'x-lower': `k=${lowerHex(sent)}`, 'content-length': 0 });
    res.end();
  } else if (path.startsWith('/v1/ok-echo')) {
    res.writeHead(200, { 'content-type': 'application/json', 'x-debug': `saw ${auth}`, 'x-plain': 'nothing here' });
    res.end('{"ok":true}');
  } else if (path.startsWith('/v1/head401')) {
    res.writeHead(401, { 'www-authenticate': `Bearer error="invalid_token", error_description="bad key ${sent}"`, 'content-length': 40 });
    res.end();
  } else if (path.startsWith('/v1/dupce')) {
    // Two lines: "identity" then "gzip" (decodable), or "gzip" then "zstd" (not: the gateway has no zstd).
    const packed = gzipSync(`{"error":"Incorrect API key provided: ${sent}"}`);
    const codings = path.includes('zstd') ? ['gzip', 'zstd'] : ['identity', 'gzip'];
    res.writeHead(401, [['content-type', 'application/json'], ['content-encoding', codings[0]!], ['content-encoding', codings[1]!], ['content-length', String(packed.length)]]);
    res.end(packed);
  } else if (path.startsWith('/v1/jsonesc')) {
    res.writeHead(401, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `bad key ${sent}` }).replaceAll('/', '\\/'));
  } else if (path.startsWith('/v1/unicode')) {
    // .NET's default JSON encoder writes "+" as \u002B.
    res.writeHead(401, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `bad key ${sent}` }).replaceAll('+', '\\u002B'));
  } else if (path.startsWith('/v1/urlenc')) {
    const encoded = path.includes('lower') ? lowerHex(sent) : encodeURIComponent(sent);
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `bad request /x?key=${encoded}` }));
  } else if (path.startsWith('/v1/sse')) {
    // Answers at once, before any body, and keeps the stream open.
    req.resume();
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write('data: first\n\n');
  } else {
    req.resume();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"ok":true}');
  }
}

describe('gateway hardening: what reaches the client', () => {
  let gw: GatewayHarness;
  let upstream: Server;
  let seen: string[] = [];
  let base = '';

  beforeAll(async () => {
    upstream = createServer((req, res) => {
      seen.push(`${req.method} ${req.url}`);
      misbehave(req, res);
    });
    base = await listenLocal(upstream);
    gw = await startGateway(profileSet([keyProfile('k', () => base)]));
  });
  afterAll(async () => {
    const logText = JSON.stringify(gw.logs);
    await gw.close();
    upstream.closeAllConnections();
    upstream.close();
    expect(leaks(logText)).toBe(false);
  });

  it('refuses TRACE, TRACK and CONNECT with 405 in the OpenAI shape; nothing is forwarded', async () => {
    seen = [];
    for (const head of ['TRACE /v1/x HTTP/1.1\r\nHost: a\r\n\r\n', 'TRACK /v1/x HTTP/1.1\r\nHost: a\r\n\r\n', 'CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n']) {
      const out = await rawCall(gw.socketPath, [head]);
      expect(out.split('\r\n')[0]).toBe('HTTP/1.1 405 Method Not Allowed');
      expect(out.toLowerCase()).toContain('\r\nallow: get, head, post');
      const body = JSON.parse(out.slice(out.indexOf('\r\n\r\n') + 4)) as { error: { code: string; type: string; message: string } };
      expect(body.error.code).toBe('method_not_allowed');
      expect(body.error.type).toBe('invalid_request_error');
      expect(leaks(out)).toBe(false);
    }
    expect(seen).toEqual([]);
  });

  it('replaces the credential in the headers of answers that are not errors: a redirect\'s Location, a 200\'s header', async () => {
    const redirect = await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/redirect');
    expect(redirect.status).toBe(302);
    expect(redirect.headers.location).toBe(`https://example.test/cb?key=${HEADER_MARKER}`);
    expect(redirect.headers['x-debug']).toBe(`saw Bearer ${HEADER_MARKER}`);
    expect(redirect.headers['x-lower']).toBe(`k=${HEADER_MARKER}`);
    const ok = await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/ok-echo');
    expect(ok.status).toBe(200);
    expect(ok.headers['x-debug']).toBe(`saw Bearer ${HEADER_MARKER}`);
    expect(ok.headers['x-plain']).toBe('nothing here');
    expect(ok.body).toBe('{"ok":true}');
    expect(leaks(JSON.stringify([redirect.headers, ok.headers]))).toBe(false);
  });

  it('replaces the credential in the headers of an error answer to HEAD (no body to read)', async () => {
    const out = await rawCall(gw.socketPath, ['HEAD /v1/head401 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n']);
    expect(out.split('\r\n')[0]).toBe('HTTP/1.1 401 Unauthorized');
    expect(out).toContain(`error_description="bad key ${HEADER_MARKER}"`);
    expect(leaks(out)).toBe(false);
  });

  it('decodes an error body whose Content-Encoding comes in two lines; withholds one it cannot decode', async () => {
    const identityGzip = await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/dupce');
    expect(identityGzip.status).toBe(401);
    expect(identityGzip.headers['content-encoding']).toBeUndefined();
    expect(identityGzip.body).toBe(`{"error":"Incorrect API key provided: ${BODY_MARKER}"}`);
    const gzipZstd = await rawCall(gw.socketPath, ['GET /v1/dupce-zstd HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n']);
    expect(gzipZstd.split('\r\n')[0]).toBe('HTTP/1.1 401 Unauthorized');
    expect(gzipZstd.toLowerCase()).not.toContain('content-encoding');
    expect(gzipZstd).toContain('[the gateway withheld this error body');
    // Raw, the gzip member would still be there for the client to decode.
    expect(gzipZstd.includes('\x1f\x8b')).toBe(false);
  });

  it('finds the credential JSON-escaped (\\/ and \\u002B) and percent-encoded (upper and lower hex) in error bodies', async () => {
    for (const path of ['/v1/jsonesc', '/v1/unicode', '/v1/urlenc', '/v1/urlenc-lower']) {
      const answer = await httpCall({ socketPath: gw.socketPath }, 'GET', path);
      expect(answer.status).toBeGreaterThanOrEqual(400);
      expect(answer.body).toContain(BODY_MARKER);
      expect(leaks(answer.body)).toBe(false);
      expect(answer.headers['content-length']).toBe(String(Buffer.byteLength(answer.body)));
    }
  });
});

describe('gateway hardening: connections and their accounting', () => {
  let upstream: Server;
  let base = '';

  beforeAll(async () => {
    upstream = createServer(misbehave);
    base = await listenLocal(upstream);
  });
  afterAll(() => {
    upstream.closeAllConnections();
    upstream.close();
  });

  async function withGateway(limits: Parameters<typeof startGateway>[1], run: (gw: GatewayHarness) => Promise<void>): Promise<void> {
    const gw = await startGateway(profileSet([keyProfile('k', () => base)]), limits);
    try {
      await run(gw);
    } finally {
      await gw.close();
    }
  }

  const accessLines = (gw: GatewayHarness) => gw.logs.filter((l) => l.msg === 'gateway request');

  it('an oversized head pipelined behind a stream cuts the connection instead of writing a 431 into the stream; counted once', async () => {
    await withGateway({}, async (gw) => {
      const stream = 'POST /v1/sse HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}';
      const oversized = `GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Big: ${'a'.repeat(40_000)}\r\n\r\n`;
      const out = await rawExchange(gw.socketPath, stream, 'data: first', oversized);
      expect(out.startsWith('HTTP/1.1 200 OK')).toBe(true);
      expect(out).toContain('data: first');
      // One answer on the connection: nothing was written after the stream's own bytes.
      expect(out.match(/HTTP\/1\.1 /g)).toHaveLength(1);
      await until(() => gw.gateway.status().active_requests === 0);
      expect(gw.gateway.status().errors).toEqual({ headers_too_large: 1 });
    });
  });

  it('a request timeout while the answer to a streamed upload flows cuts the connection instead of writing a 408 into it', async () => {
    await withGateway({ replayBytes: 1024, headersTimeoutMs: 200, requestTimeoutMs: 400 }, async (gw) => {
      // More than the replay size, so the body streams and the upstream answers before it ends; then the client stalls.
      const head = `POST /v1/sse HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n${'a'.repeat(2048)}\r\n`;
      const out = await rawExchange(gw.socketPath, head);
      expect(out.startsWith('HTTP/1.1 200 OK')).toBe(true);
      expect(out).toContain('data: first');
      expect(out).not.toContain('HTTP/1.1 408');
      await until(() => gw.gateway.status().active_requests === 0);
      expect(gw.gateway.status().errors).toEqual({ request_timeout: 1 });
      expect(accessLines(gw).at(-1)).toMatchObject({ status: 200, error: 'request_timeout' });
    });
  });

  it('a client that hangs up mid-body is counted once, as client_aborted, and its log line has no status', async () => {
    await withGateway({}, async (gw) => {
      const out = await new Promise<string>((resolve) => {
        const socket = connect(gw.socketPath);
        let got = '';
        socket.on('data', (d: Buffer) => (got += d.toString('latin1')));
        socket.on('error', () => undefined);
        socket.on('close', () => resolve(got));
        // Half a body, then the end of the connection, as a process that exits mid-upload.
        socket.on('connect', () => socket.end('POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mo'));
      });
      expect(out).toBe('');
      await until(() => accessLines(gw).length === 1);
      expect(gw.gateway.status().errors).toEqual({ client_aborted: 1 });
      expect(gw.logs.some((l) => l.msg === 'gateway refused a malformed request')).toBe(false);
      expect(accessLines(gw)[0]).toMatchObject({ method: 'POST', status: null, error: 'client_aborted' });
    });
  });

  it('GET /v1/models holds its body to the size limit (413), with a length or chunked', async () => {
    await withGateway({ maxBodyBytes: 64 * 1024 }, async (gw) => {
      const big = 'z'.repeat(200 * 1024);
      const sized = await rawCall(gw.socketPath, [`GET /v1/models HTTP/1.1\r\nHost: a\r\nContent-Length: ${big.length}\r\n\r\n`, big]);
      expect(sized.split('\r\n')[0]).toBe('HTTP/1.1 413 Payload Too Large');
      const chunks = ['GET /v1/models HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n'];
      for (let i = 0; i < 16; i++) chunks.push(`2000\r\n${'y'.repeat(8192)}\r\n`);
      chunks.push('0\r\n\r\n');
      const chunked = await rawCall(gw.socketPath, chunks);
      expect(chunked.split('\r\n')[0]).toBe('HTTP/1.1 413 Payload Too Large');
      expect(JSON.parse(chunked.slice(chunked.indexOf('\r\n\r\n') + 4)).error.code).toBe('body_too_large');
      // A small body is still read and dropped.
      const small = await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/models', { headers: { 'content-length': 100 }, body: 'x'.repeat(100) });
      expect(small.status).toBe(200);
    });
  });

  it('GET /v1/models: a client that hangs up mid-body is client_aborted, not an error-level failure', async () => {
    await withGateway({}, async (gw) => {
      await rawCall(gw.socketPath, ['GET /v1/models HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n', 'abc'], { waitMs: 200 });
      await until(() => accessLines(gw).length === 1);
      expect(gw.gateway.status().errors).toEqual({ client_aborted: 1 });
      expect(gw.logs.filter((l) => l.level >= 50)).toEqual([]);
    });
  });
});

describe('gateway hardening: loopback TCP changes that overlap', () => {
  async function freePort(): Promise<number> {
    const server = createNetServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const { port } = server.address() as AddressInfo;
    await new Promise((r) => server.close(r));
    return port;
  }

  function probe(port: number): Promise<'open' | 'refused'> {
    return new Promise((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.on('connect', () => {
        socket.destroy();
        resolve('open');
      });
      socket.on('error', () => resolve('refused'));
    });
  }

  it('two enables at once leave one listener, which disable closes', async () => {
    const gw = await startGateway(profileSet([keyProfile('k', () => 'http://127.0.0.1:9/v1')]));
    try {
      const [p1, p2] = [await freePort(), await freePort()];
      const results = await Promise.all([gw.gateway.enableTcp(p1), gw.gateway.enableTcp(p2)]);
      expect(results.map((s) => s.tcp.address)).toEqual([`127.0.0.1:${p1}`, `127.0.0.1:${p2}`]);
      expect([await probe(p1), await probe(p2)]).toEqual(['refused', 'open']);
      await gw.gateway.disableTcp();
      expect([await probe(p1), await probe(p2)]).toEqual(['refused', 'refused']);
    } finally {
      await gw.close();
    }
  });

  it('a close that overlaps an enable leaves no listener', async () => {
    const gw = await startGateway(profileSet([keyProfile('k', () => 'http://127.0.0.1:9/v1')]));
    const port = await freePort();
    try {
      const enabling = gw.gateway.enableTcp(port).catch(() => null);
      await gw.gateway.close();
      await enabling;
      expect(await probe(port)).toBe('refused');
    } finally {
      await gw.close();
    }
  });
});

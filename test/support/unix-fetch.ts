/**
 * A `fetch` over a Unix socket, for SDKs that take a fetch function (the `openai` package):
 * node:http with `socketPath`, the response body handed over as a web stream as it arrives.
 */
import { request } from 'node:http';
import { Readable } from 'node:stream';

/** A fetch that sends every request to the HTTP server on `socketPath`, whatever the URL's host. */
export function unixSocketFetch(socketPath: string): typeof fetch {
  return async (input, init) => {
    const req = new Request(input, init);
    const url = new URL(req.url);
    const body = req.body ? Buffer.from(await req.arrayBuffer()) : undefined;
    const headers: Record<string, string> = {};
    req.headers.forEach((value, name) => (headers[name] = value));
    return new Promise<Response>((resolve, reject) => {
      const out = request({ socketPath, method: req.method, path: `${url.pathname}${url.search}`, headers, signal: req.signal }, (res) => {
        const responseHeaders = new Headers();
        for (const [name, value] of Object.entries(res.headers)) {
          if (value !== undefined) responseHeaders.set(name, Array.isArray(value) ? value.join(', ') : value);
        }
        const stream = Readable.toWeb(res) as ReadableStream<Uint8Array>;
        resolve(new Response(stream, { status: res.statusCode ?? 0, headers: responseHeaders }));
      });
      out.on('error', reject);
      out.end(body);
    });
  };
}

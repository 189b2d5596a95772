/**
 * Where a gateway request goes, as pure functions of the request line, the body's `model`
 * and the profile names: no sockets, so every routing rule is a one-line table test.
 */

/** The `model` prefix older configurations use for the built-in Qwen OAuth profile. */
export const QWEN_PORTAL_ALIAS = 'qwen-portal';
/** The name of the built-in Qwen OAuth profile the alias stands for. */
export const QWEN_PROFILE = 'qwen';

/** A request the gateway answers itself: the model list, of one profile or of all. */
export interface ModelsRoute {
  kind: 'models';
  /** Set for `/p/<profile>/v1/models` (bare model names); absent for `/v1/models` (prefixed names). */
  profile?: string;
}

/** A request forwarded upstream. */
export interface ForwardRoute {
  kind: 'forward';
  profile: string;
  /** True when the path named the profile (`/p/<profile>/...`), false for the default profile. */
  explicit: boolean;
  /** The path below `/v1`, with its query: `/chat/completions?x=1`. */
  rest: string;
}

export interface RouteFailure {
  kind: 'error';
  status: 400 | 404 | 405;
  code: 'unknown_route' | 'unknown_profile' | 'invalid_path' | 'method_not_allowed';
  message: string;
}

export type Route = ModelsRoute | ForwardRoute | RouteFailure;

const PROFILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/**
 * Methods never forwarded: an upstream answers TRACE (and IIS's TRACK) by echoing the request
 * it received, the credential the gateway added included; CONNECT asks for a tunnel.
 */
const REFUSED_METHODS = new Set(['TRACE', 'TRACK', 'CONNECT']);

/** Routes a request target (`req.url`) for `method`; `known` tells whether a profile exists. */
export function routeRequest(method: string, target: string, defaultProfile: string, known: (name: string) => boolean): Route {
  if (REFUSED_METHODS.has(method)) return { kind: 'error', status: 405, code: 'method_not_allowed', message: `the gateway does not forward ${method} requests` };
  if (!target.startsWith('/')) return { kind: 'error', status: 400, code: 'invalid_path', message: 'the request target must be a path' };
  const q = target.indexOf('?');
  const path = q === -1 ? target : target.slice(0, q);
  const query = q === -1 ? '' : target.slice(q);
  // A path that climbs out of /v1 upstream (`/v1/../admin`) is refused, not normalised.
  if (/(^|\/)\.\.?(\/|$)/.test(path) || path.includes('\\') || /%2e|%2f|%5c/i.test(path)) {
    return { kind: 'error', status: 400, code: 'invalid_path', message: 'the path may not contain dot segments or encoded separators' };
  }
  let profile = defaultProfile;
  let explicit = false;
  let below = path;
  const named = /^\/p\/([^/]+)(\/.*)?$/.exec(path);
  if (named) {
    const name = named[1]!;
    if (!PROFILE_NAME.test(name) || !known(name)) {
      return { kind: 'error', status: 404, code: 'unknown_profile', message: `no profile named "${name.slice(0, 64)}"` };
    }
    profile = name;
    explicit = true;
    below = named[2] ?? '/';
  }
  if (below !== '/v1' && !below.startsWith('/v1/')) {
    return { kind: 'error', status: 404, code: 'unknown_route', message: 'the gateway serves /v1/... and /p/<profile>/v1/...' };
  }
  const rest = below.slice(3);
  if (method === 'GET' && (rest === '/models' || rest === '/models/')) return explicit ? { kind: 'models', profile } : { kind: 'models' };
  return { kind: 'forward', profile, explicit, rest: `${rest}${query}` };
}

/** A `model` of the form `<profile>/<model>` naming a known profile, split; null when it names none. */
export function profileFromModel(model: string, known: (name: string) => boolean): { profile: string; model: string } | null {
  const slash = model.indexOf('/');
  if (slash <= 0 || slash === model.length - 1) return null;
  const prefix = model.slice(0, slash);
  const bare = model.slice(slash + 1);
  if (prefix === QWEN_PORTAL_ALIAS && known(QWEN_PROFILE)) return { profile: QWEN_PROFILE, model: bare };
  if (PROFILE_NAME.test(prefix) && known(prefix)) return { profile: prefix, model: bare };
  // Other slashes belong to the model's own name (`meta-llama/Llama-3`): sent as is.
  return null;
}

/**
 * The upstream URL for `rest` (the path below `/v1`) on a profile whose base URL is given.
 * A base ending in `/v1` (OpenAI style) gets `rest` appended; any other base (an
 * Anthropic-style `.../apps/anthropic`) gets `/v1` and `rest`, as that SDK would build it.
 */
export function upstreamUrl(baseUrl: string, rest: string): URL {
  const base = baseUrl.replace(/\/+$/, '');
  const withVersion = /\/v1$/.test(base) ? base : `${base}/v1`;
  return new URL(`${withVersion}${rest}`);
}

/** How the gateway part of a status reads for a person (no zod, no I/O: `status` imports it). */
import type { GatewayStatus } from '../../shared/gateway-protocol.js';

/** The gateway's addresses and counters, one `label  value` row each. */
export function formatGatewayRows(g: GatewayStatus): Array<[string, string]> {
  const tcp = g.tcp.address
    ? `http://${g.tcp.address}/v1 (gateway key required)`
    : g.tcp.enabled
      ? `enabled but not listening: ${g.tcp.error ?? 'unknown error'}`
      : 'off (`qwen-token gateway enable`)';
  const errors = Object.entries(g.errors)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([kind, n]) => `${kind} ${n}`)
    .join(', ');
  return [
    ['gateway socket', g.socket_path],
    ['gateway TCP', tcp],
    ['gateway profiles', `${g.profiles.join(', ')} (default ${g.default_profile})`],
    ['gateway requests', `${g.requests_served} served, ${g.active_requests} active, ${g.active_streams} streaming`],
    ['gateway errors', errors || 'none'],
  ];
}


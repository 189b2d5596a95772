/** The request line TokenClient sends for an uncached `getAccessToken` (the echo path sends the same size). */
export function tokenRequestLine(id = 1) {
  return `${JSON.stringify({ jsonrpc: '2.0', id, method: 'getAccessToken', params: { minValidityMs: 60000 } })}\n`;
}

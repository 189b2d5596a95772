/** The daemon methods behind `qwen-token gateway ...`. */
import { GatewayEmptyParams, GatewayEnableParams, GatewayMethods } from '../../shared/gateway-protocol.js';
import { rpcMethod, type RpcMethod } from '../rpc-dispatcher.js';
import type { Gateway } from './gateway.js';

/** Method handlers to register on the daemon's socket. */
export function gatewayMethods(gateway: Gateway): Record<string, RpcMethod> {
  return {
    [GatewayMethods.enable]: rpcMethod(GatewayEnableParams, ({ port }) => gateway.enableTcp(port)),
    [GatewayMethods.disable]: rpcMethod(GatewayEmptyParams, () => gateway.disableTcp()),
    [GatewayMethods.status]: rpcMethod(GatewayEmptyParams, () => gateway.status()),
    [GatewayMethods.env]: rpcMethod(GatewayEmptyParams, () => gateway.envInfo()),
  };
}

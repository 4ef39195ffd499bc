// A generic netlink client: resolves family names through the controller (GENL_ID_CTRL,
// CTRL_CMD_GETFAMILY) and sends family commands over one NetlinkSocket.

import { NETLINK_GENERIC } from '../sys/socket.js';
import { decodeFamily, decodeGenlPayload, encodeGenlPayload, encodeGetFamily, GENL_ID_CTRL, type GenlFamily, type GenlMsg } from './genl-codec.js';
import type { NlAttrSpec } from './netlink-codec.js';
import { NetlinkSocket } from './netlink-socket.js';
import { NetlinkProtocolError } from './netlink-codec.js';

export interface GenlRequestOptions {
  readonly what: string;
  readonly dump?: boolean;
  readonly timeoutMs?: number;
}

export class GenlSocket {
  private readonly sock: NetlinkSocket;
  private readonly families = new Map<string, GenlFamily>();

  private constructor(sock: NetlinkSocket) {
    this.sock = sock;
  }

  static open(): GenlSocket {
    return new GenlSocket(NetlinkSocket.open(NETLINK_GENERIC));
  }

  /**
   * Look up a family by name. Fails with code 'ENOENT' when no such family is registered
   * (the kernel first tries to load a module aliased to it, e.g. nbd).
   */
  async resolveFamily(name: string): Promise<GenlFamily> {
    const known = this.families.get(name);
    if (known) return known;
    const replies = await this.sock.request(GENL_ID_CTRL, 0, encodeGetFamily(name), { what: `CTRL_CMD_GETFAMILY ${name}` });
    const first = replies[0];
    if (!first) throw new NetlinkProtocolError(`CTRL_CMD_GETFAMILY ${name}: no reply before the ACK`);
    const family = decodeFamily(decodeGenlPayload(first.payload));
    this.families.set(name, family);
    return family;
  }

  /** Send one family command; returns the decoded replies that came before the ACK. */
  async request(familyId: number, cmd: number, version: number, attrs: readonly NlAttrSpec[], opts: GenlRequestOptions): Promise<GenlMsg[]> {
    const replies = await this.sock.request(familyId, 0, encodeGenlPayload(cmd, version, attrs), opts);
    return replies.filter((m) => m.type === familyId).map((m) => decodeGenlPayload(m.payload));
  }

  close(): void {
    this.sock.close();
  }
}

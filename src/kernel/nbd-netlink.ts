// Configures kernel NBD devices through the "nbd" generic netlink family: CONNECT hands the
// kernel already-negotiated sockets (the handshake is done in userspace), DISCONNECT,
// RECONFIGURE and STATUS manage them. Errors come back as NetlinkError with the errno name
// as `code` (ENOENT: no such device, EBUSY: in use, EINVAL: bad configuration).

import { GenlSocket } from './genl.js';
import type { GenlFamily } from './genl-codec.js';
import {
  decodeConnectReply,
  decodeStatusReply,
  encodeConnectAttrs,
  encodeIndexAttrs,
  encodeReconfigureAttrs,
  NBD_GENL_CMD,
  NBD_GENL_FAMILY_NAME,
  NBD_GENL_VERSION,
  type NbdConnectConfig,
  type NbdDeviceStatus,
  type NbdReconfigureConfig,
} from './nbd-netlink-codec.js';
import { NetlinkProtocolError, type NlAttrSpec } from './netlink-codec.js';

export type { NbdConnectConfig, NbdDeviceStatus, NbdReconfigureConfig } from './nbd-netlink-codec.js';
export { NBD_CFLAG } from './nbd-netlink-codec.js';

export class NbdNetlink {
  private readonly genl: GenlSocket;
  readonly family: GenlFamily;

  private constructor(genl: GenlSocket, family: GenlFamily) {
    this.genl = genl;
    this.family = family;
  }

  /** Open a netlink socket and resolve the nbd family (loading the module when it is modular). */
  static async open(): Promise<NbdNetlink> {
    const genl = GenlSocket.open();
    try {
      return new NbdNetlink(genl, await genl.resolveFamily(NBD_GENL_FAMILY_NAME));
    } catch (err) {
      genl.close();
      throw err;
    }
  }

  private async command(cmd: number, what: string, attrs: readonly NlAttrSpec[]) {
    return this.genl.request(this.family.id, cmd, NBD_GENL_VERSION, attrs, { what });
  }

  /**
   * NBD_CMD_CONNECT; returns the device index (the kernel's choice when `index` is omitted).
   * The kernel holds its own reference to each socket: the caller may close its fds afterwards.
   */
  async connect(config: NbdConnectConfig): Promise<number> {
    const replies = await this.command(NBD_GENL_CMD.CONNECT, 'NBD_CMD_CONNECT', encodeConnectAttrs(config));
    const reply = replies[0];
    if (!reply) throw new NetlinkProtocolError('NBD_CMD_CONNECT: no reply carrying the device index');
    return decodeConnectReply(reply.attrs);
  }

  async disconnect(index: number): Promise<void> {
    await this.command(NBD_GENL_CMD.DISCONNECT, 'NBD_CMD_DISCONNECT', encodeIndexAttrs(index));
  }

  async reconfigure(config: NbdReconfigureConfig): Promise<void> {
    await this.command(NBD_GENL_CMD.RECONFIGURE, 'NBD_CMD_RECONFIGURE', encodeReconfigureAttrs(config));
  }

  /** Every device (or one, by index) with its connected state. */
  async status(index?: number): Promise<NbdDeviceStatus[]> {
    const replies = await this.command(NBD_GENL_CMD.STATUS, 'NBD_CMD_STATUS', encodeIndexAttrs(index));
    return replies.flatMap((r) => decodeStatusReply(r.attrs));
  }

  close(): void {
    this.genl.close();
  }
}

// The NBD generic-netlink family (linux/nbd-netlink.h, specs/nbd-netlink-proto.md): attribute
// lists for CONNECT / DISCONNECT / RECONFIGURE / STATUS and decoders for the replies. Pure.
//
// CONNECT attributes (u64 unless noted):
//   NBD_ATTR_INDEX u32 (omitted: the kernel picks a free device and returns it)
//   NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_ATTR_TIMEOUT (seconds),
//   NBD_ATTR_SERVER_FLAGS (NBD_FLAG_* from the handshake), NBD_ATTR_CLIENT_FLAGS (NBD_CFLAG_*),
//   NBD_ATTR_DEAD_CONN_TIMEOUT (seconds), NBD_ATTR_BACKEND_IDENTIFIER string,
//   NBD_ATTR_SOCKETS nested { NBD_SOCK_ITEM nested { NBD_SOCK_FD u32 } ... }

import { attrNested, attrU32, attrU8, findAttr, NetlinkProtocolError, nlaNested, nlaString, nlaU32, nlaU64, type NlAttr, type NlAttrSpec } from './netlink-codec.js';

export const NBD_GENL_FAMILY_NAME = 'nbd';
export const NBD_GENL_VERSION = 1;
export const NBD_GENL_MCAST_GROUP_NAME = 'nbd_mc_group';

export const NBD_ATTR = {
  INDEX: 1,
  SIZE_BYTES: 2,
  BLOCK_SIZE_BYTES: 3,
  TIMEOUT: 4,
  SERVER_FLAGS: 5,
  CLIENT_FLAGS: 6,
  SOCKETS: 7,
  DEAD_CONN_TIMEOUT: 8,
  DEVICE_LIST: 9,
  BACKEND_IDENTIFIER: 10,
} as const;

export const NBD_DEVICE_ITEM = 1;
export const NBD_DEVICE = { INDEX: 1, CONNECTED: 2 } as const;
export const NBD_SOCK_ITEM = 1;
export const NBD_SOCK_FD = 1;

export const NBD_GENL_CMD = {
  CONNECT: 1,
  DISCONNECT: 2,
  RECONFIGURE: 3,
  LINK_DEAD: 4,
  STATUS: 5,
} as const;
export type NbdGenlCmd = (typeof NBD_GENL_CMD)[keyof typeof NBD_GENL_CMD];

/** linux/nbd.h client flags. */
export const NBD_CFLAG = {
  /** Free the device when it disconnects. */
  DESTROY_ON_DISCONNECT: 1 << 0,
  /** Disconnect when the last opener of the netlink-configured device closes it. */
  DISCONNECT_ON_CLOSE: 1 << 1,
} as const;

export interface NbdConnectConfig {
  /** Device to use; omitted so the kernel picks a free one. */
  readonly index?: number;
  /** Connected stream sockets the kernel reads requests from, past the handshake. */
  readonly socketFds: readonly number[];
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  /** Transmission flags from the handshake (NBD_FLAG_*). */
  readonly serverFlags: number;
  readonly clientFlags?: number;
  readonly timeoutSeconds?: number;
  readonly deadConnTimeoutSeconds?: number;
  readonly backendIdentifier?: string;
}

function sockets(fds: readonly number[]): NlAttrSpec {
  if (fds.length === 0) throw new RangeError('NBD needs at least one socket');
  return nlaNested(
    NBD_ATTR.SOCKETS,
    fds.map((fd) => nlaNested(NBD_SOCK_ITEM, [nlaU32(NBD_SOCK_FD, fd)])),
  );
}

export function encodeConnectAttrs(c: NbdConnectConfig): NlAttrSpec[] {
  const attrs: NlAttrSpec[] = [];
  if (c.index !== undefined) attrs.push(nlaU32(NBD_ATTR.INDEX, c.index));
  attrs.push(nlaU64(NBD_ATTR.SIZE_BYTES, c.sizeBytes));
  attrs.push(nlaU64(NBD_ATTR.BLOCK_SIZE_BYTES, c.blockSizeBytes));
  attrs.push(nlaU64(NBD_ATTR.SERVER_FLAGS, c.serverFlags));
  if (c.clientFlags !== undefined) attrs.push(nlaU64(NBD_ATTR.CLIENT_FLAGS, c.clientFlags));
  if (c.timeoutSeconds !== undefined) attrs.push(nlaU64(NBD_ATTR.TIMEOUT, c.timeoutSeconds));
  if (c.deadConnTimeoutSeconds !== undefined) attrs.push(nlaU64(NBD_ATTR.DEAD_CONN_TIMEOUT, c.deadConnTimeoutSeconds));
  if (c.backendIdentifier !== undefined) attrs.push(nlaString(NBD_ATTR.BACKEND_IDENTIFIER, c.backendIdentifier));
  attrs.push(sockets(c.socketFds));
  return attrs;
}

export interface NbdReconfigureConfig {
  readonly index: number;
  /** Replacement sockets for dead connections. */
  readonly socketFds?: readonly number[];
  readonly timeoutSeconds?: number;
  readonly deadConnTimeoutSeconds?: number;
  readonly clientFlags?: number;
  /**
   * Must repeat the identifier given at CONNECT, if one was: the kernel refuses to reconfigure
   * a device with a backend identifier otherwise (EINVAL), so a device cannot be re-pointed
   * at another image.
   */
  readonly backendIdentifier?: string;
}

export function encodeReconfigureAttrs(c: NbdReconfigureConfig): NlAttrSpec[] {
  const attrs: NlAttrSpec[] = [nlaU32(NBD_ATTR.INDEX, c.index)];
  if (c.timeoutSeconds !== undefined) attrs.push(nlaU64(NBD_ATTR.TIMEOUT, c.timeoutSeconds));
  if (c.deadConnTimeoutSeconds !== undefined) attrs.push(nlaU64(NBD_ATTR.DEAD_CONN_TIMEOUT, c.deadConnTimeoutSeconds));
  if (c.clientFlags !== undefined) attrs.push(nlaU64(NBD_ATTR.CLIENT_FLAGS, c.clientFlags));
  if (c.backendIdentifier !== undefined) attrs.push(nlaString(NBD_ATTR.BACKEND_IDENTIFIER, c.backendIdentifier));
  if (c.socketFds !== undefined) attrs.push(sockets(c.socketFds));
  return attrs;
}

export function encodeIndexAttrs(index: number | undefined): NlAttrSpec[] {
  return index === undefined ? [] : [nlaU32(NBD_ATTR.INDEX, index)];
}

/** The index the kernel chose, from the CONNECT reply. */
export function decodeConnectReply(attrs: readonly NlAttr[]): number {
  const index = findAttr(attrs, NBD_ATTR.INDEX);
  if (!index) throw new NetlinkProtocolError('NBD CONNECT reply without NBD_ATTR_INDEX');
  return attrU32(index);
}

export interface NbdDeviceStatus {
  readonly index: number;
  readonly connected: boolean;
}

/** STATUS reply: NBD_ATTR_DEVICE_LIST { NBD_DEVICE_ITEM { INDEX u32, CONNECTED u8 } ... }. */
export function decodeStatusReply(attrs: readonly NlAttr[]): NbdDeviceStatus[] {
  const list = findAttr(attrs, NBD_ATTR.DEVICE_LIST);
  if (!list) return [];
  const out: NbdDeviceStatus[] = [];
  for (const item of attrNested(list)) {
    if (item.type !== NBD_DEVICE_ITEM) continue;
    const fields = attrNested(item);
    const index = findAttr(fields, NBD_DEVICE.INDEX);
    const connected = findAttr(fields, NBD_DEVICE.CONNECTED);
    if (!index || !connected) throw new NetlinkProtocolError('NBD device item without INDEX or CONNECTED');
    out.push({ index: attrU32(index), connected: attrU8(connected) !== 0 });
  }
  return out;
}

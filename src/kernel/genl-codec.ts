// Generic netlink framing (linux/genetlink.h) and the controller family's GETFAMILY
// request/reply, used to turn a family name such as "nbd" into its dynamic message type.
//
// struct genlmsghdr (4 bytes, after the nlmsghdr)
//   0  u8  cmd
//   1  u8  version
//   2  u16 reserved (0)
//   4  attributes

import { attrNested, attrString, attrU16, attrU32, decodeAttrs, encodeAttrs, findAttr, NetlinkProtocolError, nlaString, type NlAttr, type NlAttrSpec } from './netlink-codec.js';

export const GENL_HDRLEN = 4;
export const GENL_ID_CTRL = 0x10;
export const GENL_NAMSIZ = 16;

export const CTRL_CMD_GETFAMILY = 3;
export const CTRL_VERSION = 2;

export const CTRL_ATTR = {
  FAMILY_ID: 1,
  FAMILY_NAME: 2,
  VERSION: 3,
  HDRSIZE: 4,
  MAXATTR: 5,
  OPS: 6,
  MCAST_GROUPS: 7,
} as const;

export const CTRL_ATTR_MCAST_GRP = { NAME: 1, ID: 2 } as const;

export interface GenlMsg {
  readonly cmd: number;
  readonly version: number;
  readonly attrs: NlAttr[];
}

/** The genlmsghdr plus encoded attributes: the payload of one nlmsg. */
export function encodeGenlPayload(cmd: number, version: number, attrs: readonly NlAttrSpec[]): Buffer[] {
  const head = Buffer.alloc(GENL_HDRLEN);
  head.writeUInt8(cmd, 0);
  head.writeUInt8(version, 1);
  return [head, encodeAttrs(attrs)];
}

export function decodeGenlPayload(payload: Buffer): GenlMsg {
  if (payload.length < GENL_HDRLEN) {
    throw new NetlinkProtocolError(`generic netlink payload of ${payload.length} bytes, need ${GENL_HDRLEN}`);
  }
  return { cmd: payload[0]!, version: payload[1]!, attrs: decodeAttrs(payload.subarray(GENL_HDRLEN)) };
}

/** CTRL_CMD_GETFAMILY for one family, by name. */
export function encodeGetFamily(name: string): Buffer[] {
  if (Buffer.byteLength(name) >= GENL_NAMSIZ) throw new RangeError(`generic netlink family name too long: ${name}`);
  return encodeGenlPayload(CTRL_CMD_GETFAMILY, CTRL_VERSION, [nlaString(CTRL_ATTR.FAMILY_NAME, name)]);
}

export interface GenlFamily {
  readonly id: number;
  readonly name: string;
  readonly version: number;
  readonly maxAttr: number;
  /** Multicast group name to group id. */
  readonly mcastGroups: ReadonlyMap<string, number>;
}

/** Decode the controller's NEWFAMILY reply; FAMILY_ID and FAMILY_NAME are required. */
export function decodeFamily(msg: GenlMsg): GenlFamily {
  const id = findAttr(msg.attrs, CTRL_ATTR.FAMILY_ID);
  const name = findAttr(msg.attrs, CTRL_ATTR.FAMILY_NAME);
  if (!id || !name) throw new NetlinkProtocolError('GETFAMILY reply without FAMILY_ID or FAMILY_NAME');
  const version = findAttr(msg.attrs, CTRL_ATTR.VERSION);
  const maxAttr = findAttr(msg.attrs, CTRL_ATTR.MAXATTR);
  const groups = new Map<string, number>();
  const mcast = findAttr(msg.attrs, CTRL_ATTR.MCAST_GROUPS);
  if (mcast) {
    for (const item of attrNested(mcast)) {
      const fields = attrNested(item);
      const gName = findAttr(fields, CTRL_ATTR_MCAST_GRP.NAME);
      const gId = findAttr(fields, CTRL_ATTR_MCAST_GRP.ID);
      if (gName && gId) groups.set(attrString(gName), attrU32(gId));
    }
  }
  return {
    id: attrU16(id),
    name: attrString(name),
    version: version ? attrU32(version) : 0,
    maxAttr: maxAttr ? attrU32(maxAttr) : 0,
    mcastGroups: groups,
  };
}

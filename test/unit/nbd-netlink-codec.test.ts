// Generic netlink controller and NBD family messages against hex built by hand from
// linux/genetlink.h and linux/nbd-netlink.h (little-endian host assumed, like CI).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { endianness } from 'node:os';
import { decodeFamily, decodeGenlPayload, encodeGenlPayload, encodeGetFamily, GENL_ID_CTRL } from '../../src/kernel/genl-codec.js';
import {
  decodeConnectReply,
  decodeStatusReply,
  encodeConnectAttrs,
  encodeIndexAttrs,
  encodeReconfigureAttrs,
  NBD_CFLAG,
  NBD_GENL_CMD,
  NBD_GENL_VERSION,
} from '../../src/kernel/nbd-netlink-codec.js';
import { decodeNlMsgs, encodeNlMsg, NetlinkProtocolError, NLM_F } from '../../src/kernel/netlink-codec.js';

const skip = endianness() !== 'LE' && 'goldens are little-endian';

function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

const FAMILY = 0x1a;

test('CTRL_CMD_GETFAMILY "nbd": genlmsghdr {cmd 3, version 2} + FAMILY_NAME string', { skip }, () => {
  const msg = encodeNlMsg({ type: GENL_ID_CTRL, flags: NLM_F.REQUEST | NLM_F.ACK, seq: 1, pid: 0 }, encodeGetFamily('nbd'));
  assert.deepEqual(
    msg,
    hex(`
      1c 00 00 00  10 00  05 00  01 00 00 00  00 00 00 00
      03 02 00 00
      08 00 02 00  6e 62 64 00`),
  );
  assert.throws(() => encodeGetFamily('a-name-too-long!'), RangeError);
});

test('NEWFAMILY reply: id (u16), name, version, maxattr, multicast groups', { skip }, () => {
  const payload = hex(`
    01 02 00 00
    06 00 01 00  1a 00 00 00
    08 00 02 00  6e 62 64 00
    08 00 03 00  01 00 00 00
    08 00 04 00  00 00 00 00
    08 00 05 00  0a 00 00 00
    24 00 07 80
      20 00 01 80
        11 00 01 00  6e 62 64 5f 6d 63 5f 67 72 6f 75 70 00 00 00 00
        08 00 02 00  17 00 00 00`);
  const fam = decodeFamily(decodeGenlPayload(payload));
  assert.deepEqual(fam, { id: 0x1a, name: 'nbd', version: 1, maxAttr: 10, mcastGroups: new Map([['nbd_mc_group', 0x17]]) });
});

test('NEWFAMILY reply without FAMILY_ID is malformed', () => {
  assert.throws(() => decodeFamily(decodeGenlPayload(hex('01 02 00 00 08 00 02 00 6e 62 64 00'))), NetlinkProtocolError);
  assert.throws(() => decodeGenlPayload(hex('01 02 00')), NetlinkProtocolError);
});

test('NBD_CMD_CONNECT without an index: every attribute, sockets nested twice', { skip }, () => {
  const attrs = encodeConnectAttrs({
    socketFds: [5, 6],
    sizeBytes: 1 << 20,
    blockSizeBytes: 4096,
    serverFlags: 0x0d,
    clientFlags: NBD_CFLAG.DISCONNECT_ON_CLOSE,
    timeoutSeconds: 30,
    deadConnTimeoutSeconds: 5,
    backendIdentifier: 'imgbd',
  });
  const msg = encodeNlMsg({ type: FAMILY, flags: NLM_F.REQUEST | NLM_F.ACK, seq: 7, pid: 0 }, encodeGenlPayload(NBD_GENL_CMD.CONNECT, NBD_GENL_VERSION, attrs));
  assert.deepEqual(
    msg,
    hex(`
      84 00 00 00  1a 00  05 00  07 00 00 00  00 00 00 00
      01 01 00 00
      0c 00 02 00  00 00 10 00 00 00 00 00
      0c 00 03 00  00 10 00 00 00 00 00 00
      0c 00 05 00  0d 00 00 00 00 00 00 00
      0c 00 06 00  02 00 00 00 00 00 00 00
      0c 00 04 00  1e 00 00 00 00 00 00 00
      0c 00 08 00  05 00 00 00 00 00 00 00
      0a 00 0a 00  69 6d 67 62 64 00 00 00
      1c 00 07 80
        0c 00 01 80  08 00 01 00 05 00 00 00
        0c 00 01 80  08 00 01 00 06 00 00 00`),
  );
});

test('NBD_CMD_CONNECT with an index and only the required attributes', { skip }, () => {
  const attrs = encodeConnectAttrs({ index: 3, socketFds: [9], sizeBytes: 512, blockSizeBytes: 512, serverFlags: 1 });
  assert.deepEqual(
    encodeGenlPayload(NBD_GENL_CMD.CONNECT, NBD_GENL_VERSION, attrs),
    [
      hex('01 01 00 00'),
      hex(`
        08 00 01 00  03 00 00 00
        0c 00 02 00  00 02 00 00 00 00 00 00
        0c 00 03 00  00 02 00 00 00 00 00 00
        0c 00 05 00  01 00 00 00 00 00 00 00
        10 00 07 80  0c 00 01 80  08 00 01 00 09 00 00 00`),
    ],
  );
  assert.throws(() => encodeConnectAttrs({ socketFds: [], sizeBytes: 512, blockSizeBytes: 512, serverFlags: 1 }), RangeError);
});

test('DISCONNECT / STATUS carry an optional u32 index; RECONFIGURE repeats the backend', { skip }, () => {
  assert.deepEqual(encodeGenlPayload(NBD_GENL_CMD.DISCONNECT, 1, encodeIndexAttrs(2)), [hex('02 01 00 00'), hex('08 00 01 00 02 00 00 00')]);
  assert.deepEqual(encodeGenlPayload(NBD_GENL_CMD.STATUS, 1, encodeIndexAttrs(undefined)), [hex('05 01 00 00'), Buffer.alloc(0)]);
  assert.deepEqual(
    Buffer.concat(encodeGenlPayload(NBD_GENL_CMD.RECONFIGURE, 1, encodeReconfigureAttrs({ index: 4, timeoutSeconds: 60, backendIdentifier: 'x', socketFds: [11] }))),
    hex(`
      03 01 00 00
      08 00 01 00  04 00 00 00
      0c 00 04 00  3c 00 00 00 00 00 00 00
      06 00 0a 00  78 00 00 00
      10 00 07 80  0c 00 01 80  08 00 01 00 0b 00 00 00`),
  );
});

test('CONNECT reply carries the chosen NBD_ATTR_INDEX, then the ACK', { skip }, () => {
  const datagram = hex(`
    1c 00 00 00  1a 00 00 00  07 00 00 00  d2 04 00 00
    01 01 00 00  08 00 01 00  0b 00 00 00
    24 00 00 00  02 00 00 01  07 00 00 00  d2 04 00 00
    00 00 00 00  84 00 00 00 1a 00 05 00 07 00 00 00 00 00 00 00`);
  const [reply, ack] = decodeNlMsgs(datagram);
  assert.equal(ack!.type, 2);
  const g = decodeGenlPayload(reply!.payload);
  assert.equal(g.cmd, NBD_GENL_CMD.CONNECT);
  assert.equal(decodeConnectReply(g.attrs), 11);
  assert.throws(() => decodeConnectReply([]), NetlinkProtocolError);
});

test('STATUS reply: DEVICE_LIST (no NESTED flag, as the kernel sends it) of INDEX/CONNECTED items', { skip }, () => {
  const payload = hex(`
    05 01 00 00
    2c 00 09 00
      14 00 01 00  08 00 01 00 00 00 00 00  05 00 02 00 01 00 00 00
      14 00 01 00  08 00 01 00 03 00 00 00  05 00 02 00 00 00 00 00`);
  assert.deepEqual(decodeStatusReply(decodeGenlPayload(payload).attrs), [
    { index: 0, connected: true },
    { index: 3, connected: false },
  ]);
  assert.deepEqual(decodeStatusReply([]), []);
  const missing = hex('05 01 00 00 10 00 09 00 0c 00 01 00 08 00 01 00 00 00 00 00');
  assert.throws(() => decodeStatusReply(decodeGenlPayload(missing).attrs), NetlinkProtocolError);
});

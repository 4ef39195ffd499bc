// Netlink framing against hex built by hand from linux/netlink.h, genetlink.h and
// nbd-netlink.h (host order: these goldens assume a little-endian host, like every CI runner).
// Then malformed input: every truncation and random bytes only ever raise NetlinkProtocolError.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { endianness } from 'node:os';
import fc from 'fast-check';
import {
  attrNested,
  attrString,
  attrU16,
  attrU32,
  attrU64,
  attrU8,
  decodeAttrs,
  decodeNlMsgErr,
  decodeNlMsgs,
  encodeAttrs,
  encodeNlMsg,
  NetlinkProtocolError,
  NLM_F,
  NLMSG_ERROR,
  nlaNested,
  nlaString,
  nlaU16,
  nlaU32,
  nlaU64,
  nlaU8,
  type NlAttr,
  type NlAttrSpec,
} from '../../src/kernel/netlink-codec.js';

const LE = endianness() === 'LE';

function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

test('nlmsghdr: 16 bytes, len/type/flags/seq/pid in host order, payload appended', { skip: !LE && 'goldens are little-endian' }, () => {
  const msg = encodeNlMsg({ type: 0x10, flags: NLM_F.REQUEST | NLM_F.ACK, seq: 0x01020304, pid: 0 }, [hex('03 02 00 00'), hex('08 00 02 00 6e 62 64 00')]);
  assert.deepEqual(
    msg,
    hex(`
      1c 00 00 00  10 00  05 00  04 03 02 01  00 00 00 00
      03 02 00 00
      08 00 02 00 6e 62 64 00`),
  );
});

test('nlmsghdr: nlmsg_len excludes the trailing alignment padding', { skip: !LE && 'goldens are little-endian' }, () => {
  const msg = encodeNlMsg({ type: 0x1a, flags: 1, seq: 9, pid: 77 }, [hex('aa bb cc')]);
  assert.deepEqual(msg, hex('13 00 00 00 1a 00 01 00 09 00 00 00 4d 00 00 00 aa bb cc 00'));
  const [m] = decodeNlMsgs(msg);
  assert.deepEqual(m, { type: 0x1a, flags: 1, seq: 9, pid: 77, payload: hex('aa bb cc') });
});

test('nlattr: scalars, strings with NUL, padding to 4 bytes, nested sets NLA_F_NESTED', { skip: !LE && 'goldens are little-endian' }, () => {
  const bytes = encodeAttrs([
    nlaU8(1, 0xab),
    nlaU16(2, 0x1234),
    nlaU32(3, 0xdeadbeef),
    nlaU64(4, 0x0102030405),
    nlaString(5, 'imgbd'),
    nlaNested(6, [nlaU32(1, 7)]),
    nlaU64(7, 0xffff_ffff_ffff_ffffn),
  ]);
  assert.deepEqual(
    bytes,
    hex(`
      05 00 01 00  ab 00 00 00
      06 00 02 00  34 12 00 00
      08 00 03 00  ef be ad de
      0c 00 04 00  05 04 03 02 01 00 00 00
      0a 00 05 00  69 6d 67 62 64 00 00 00
      0c 00 06 80  08 00 01 00 07 00 00 00
      0c 00 07 00  ff ff ff ff ff ff ff ff`),
  );
  const a = decodeAttrs(bytes);
  assert.deepEqual(
    a.map((x) => [x.type, x.nested, x.payload.length]),
    [
      [1, false, 1],
      [2, false, 2],
      [3, false, 4],
      [4, false, 8],
      [5, false, 6],
      [6, true, 8],
      [7, false, 8],
    ],
  );
  assert.equal(attrU8(a[0]!), 0xab);
  assert.equal(attrU16(a[1]!), 0x1234);
  assert.equal(attrU32(a[2]!), 0xdeadbeef);
  assert.equal(attrU64(a[3]!), 0x0102030405n);
  assert.equal(attrString(a[4]!), 'imgbd');
  assert.equal(attrU32(attrNested(a[5]!)[0]!), 7);
  assert.equal(attrU64(a[6]!), 0xffff_ffff_ffff_ffffn);
});

test('nlattr: encoders refuse values that do not fit their width', () => {
  assert.throws(() => nlaU8(1, 256), RangeError);
  assert.throws(() => nlaU16(1, 0x10000), RangeError);
  assert.throws(() => nlaU32(1, -1), RangeError);
  assert.throws(() => nlaU32(1, 2 ** 32), RangeError);
  assert.throws(() => nlaU64(1, 2 ** 53), RangeError);
  assert.throws(() => nlaU64(1, 1n << 64n), RangeError);
  assert.throws(() => encodeAttrs([{ type: 1, payload: Buffer.alloc(0x10000) }]), RangeError);
  assert.throws(() => encodeAttrs([nlaU32(0x4000, 1)]), RangeError);
});

test('nlattr: scalar readers refuse short payloads', () => {
  const [a] = decodeAttrs(hex('06 00 01 00 01 02 00 00'));
  assert.equal(attrU16(a!), 0x0201);
  assert.throws(() => attrU32(a!), NetlinkProtocolError);
  assert.throws(() => attrU64(a!), NetlinkProtocolError);
});

test('nlattr: lengths below the header or past the end are malformed; short tails are padding', () => {
  assert.throws(() => decodeAttrs(hex('03 00 01 00')), NetlinkProtocolError);
  assert.throws(() => decodeAttrs(hex('09 00 01 00 00 00 00 00')), NetlinkProtocolError);
  assert.deepEqual(decodeAttrs(hex('04 00 01 00 00 00')).length, 1);
  assert.deepEqual(decodeAttrs(hex('00 00')), []);
});

test('nlmsg: a length below the header or past the datagram is malformed', () => {
  assert.throws(() => decodeNlMsgs(hex('0f 00 00 00 10 00 00 00 00 00 00 00 00 00 00 00')), NetlinkProtocolError);
  assert.throws(() => decodeNlMsgs(hex('20 00 00 00 10 00 00 00 00 00 00 00 00 00 00 00')), NetlinkProtocolError);
  assert.throws(() => decodeNlMsgs(hex('10 00 00')), NetlinkProtocolError);
});

const ERR_REQUEST_HDR = '1c 00 00 00 1a 00 05 00 07 00 00 00 00 00 00 00';

test('NLMSG_ERROR: an ACK (error 0) with the request capped', { skip: !LE && 'goldens are little-endian' }, () => {
  const [m] = decodeNlMsgs(hex(`24 00 00 00 02 00 00 01 07 00 00 00 d2 04 00 00  00 00 00 00 ${ERR_REQUEST_HDR}`));
  assert.equal(m!.type, NLMSG_ERROR);
  assert.equal(m!.flags, NLM_F.CAPPED);
  assert.deepEqual(decodeNlMsgErr(m!.payload, m!.flags), { errno: 0, request: { type: 0x1a, flags: 5, seq: 7, pid: 0 } });
});

test('NLMSG_ERROR: -EINVAL with extended-ack message and offset after a capped request', { skip: !LE && 'goldens are little-endian' }, () => {
  const datagram = hex(`
    34 00 00 00 02 00 00 03 07 00 00 00 d2 04 00 00
    ea ff ff ff ${ERR_REQUEST_HDR}
    08 00 01 00 62 61 64 00
    08 00 02 00 18 00 00 00`);
  const [m] = decodeNlMsgs(datagram);
  assert.deepEqual(decodeNlMsgErr(m!.payload, m!.flags), {
    errno: 22,
    request: { type: 0x1a, flags: 5, seq: 7, pid: 0 },
    message: 'bad',
    badAttrOffset: 0x18,
  });
});

test('NLMSG_ERROR: extended-ack TLVs after an echoed (uncapped) request payload', { skip: !LE && 'goldens are little-endian' }, () => {
  const datagram = hex(`
    3c 00 00 00 02 00 00 02 07 00 00 00 d2 04 00 00
    fe ff ff ff ${ERR_REQUEST_HDR}
    05 01 00 00 08 00 01 00 03 00 00 00
    0b 00 01 00 6e 6f 20 64 65 76 00 00`);
  const [m] = decodeNlMsgs(datagram);
  assert.deepEqual(decodeNlMsgErr(m!.payload, m!.flags), {
    errno: 2,
    request: { type: 0x1a, flags: 5, seq: 7, pid: 0 },
    message: 'no dev',
  });
});

test('NLMSG_ERROR: a payload shorter than error + header is malformed', () => {
  assert.throws(() => decodeNlMsgErr(hex('ea ff ff ff 1c 00 00 00'), 0), NetlinkProtocolError);
});

test('every truncation of a valid datagram decodes a prefix or raises NetlinkProtocolError', () => {
  const one = encodeNlMsg({ type: 0x1a, flags: 2, seq: 1, pid: 1 }, [hex('05 01 00 00'), encodeAttrs([nlaNested(9, [nlaNested(1, [nlaU32(1, 0), nlaU8(2, 1)])])])]);
  const datagram = Buffer.concat([one, one]);
  for (let cut = 0; cut <= datagram.length; cut++) {
    try {
      const msgs = decodeNlMsgs(datagram.subarray(0, cut));
      assert.ok(msgs.length <= 2);
      for (const m of msgs) decodeAttrs(m.payload.subarray(4));
    } catch (err) {
      assert.ok(err instanceof NetlinkProtocolError, `cut ${cut}: ${String(err)}`);
    }
  }
});

test('random bytes never escape as anything but NetlinkProtocolError', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 96 }), (bytes) => {
      const buf = Buffer.from(bytes);
      for (const fn of [() => decodeNlMsgs(buf), () => decodeAttrs(buf).forEach((a) => a.nested && attrNested(a)), () => decodeNlMsgErr(buf, NLM_F.ACK_TLVS)]) {
        try {
          fn();
        } catch (err) {
          if (!(err instanceof NetlinkProtocolError)) throw err;
        }
      }
    }),
  );
});

type Tree = { type: number; payload: Uint8Array } | { type: number; nested: Tree[] };

const treeArb = fc.letrec<{ node: Tree }>((tie) => ({
  node: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.record({ type: fc.integer({ min: 0, max: 0x3fff }), payload: fc.uint8Array({ maxLength: 24 }) }),
    fc.record({ type: fc.integer({ min: 0, max: 0x3fff }), nested: fc.array(tie('node'), { maxLength: 4 }) }),
  ),
})).node;

function matches(spec: NlAttrSpec, got: NlAttr): boolean {
  if (spec.type !== got.type) return false;
  if ('payload' in spec) return !got.nested && Buffer.from(spec.payload).equals(got.payload);
  const kids = attrNested(got);
  return got.nested && kids.length === spec.nested.length && spec.nested.every((c, i) => matches(c, kids[i]!));
}

test('attribute trees decode to what was encoded (types, nesting, payload bytes)', () => {
  fc.assert(
    fc.property(fc.array(treeArb, { maxLength: 6 }), (trees) => {
      const bytes = encodeAttrs(trees as NlAttrSpec[]);
      assert.equal(bytes.length % 4, 0);
      const got = decodeAttrs(bytes);
      assert.equal(got.length, trees.length);
      trees.forEach((t, i) => assert.ok(matches(t as NlAttrSpec, got[i]!)));
    }),
  );
});

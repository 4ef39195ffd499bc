// Option haggling without sockets: the Negotiator's replies, bytes decoded by hand, and the
// metadata context rules (qemu's wildcard semantics).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_BLOCK_SIZES, type BlockDevice, type Capabilities } from '../../src/block/device.js';
import { ExportTable } from '../../src/server/exports.js';
import { matchContexts } from '../../src/server/meta-context.js';
import { Negotiator, type TlsMode } from '../../src/server/negotiation.js';

const CAPS: Capabilities = { writable: true, flush: true, fua: false, trim: true, zero: true, fastZero: true, extents: true, allocationDepth: false, cache: false, multiConn: false, rotational: true };

function memDevice(sizeBytes: number, caps: Partial<Capabilities> = {}): BlockDevice {
  const data = Buffer.alloc(sizeBytes);
  const c = { ...CAPS, ...caps };
  return {
    sizeBytes,
    capabilities: () => c,
    blockSizes: () => ({ ...DEFAULT_BLOCK_SIZES, minimum: 512 }),
    pread: async (b, o) => void data.copy(b, 0, o, o + b.length),
    pwrite: async (b, o) => void b.copy(data, o),
    flush: async () => {},
    trim: async () => {},
    zero: async (o, l) => void data.fill(0, o, o + l),
    extents: async (_o, l) => [{ length: l, flags: 0 }],
    allocationDepth: async (_o, l) => [{ length: l, depth: 1 }],
    close: async () => {},
  };
}

const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u16 = (v: number): Buffer => Buffer.from([v >> 8, v & 0xff]);

interface Reply {
  option: number;
  type: number;
  data: Buffer;
}

function setup(tls: TlsMode = 'off') {
  const table = new ExportTable(
    [
      { name: 'a', description: 'disk a', device: memDevice(1 << 20), readOnly: false },
      { name: 'b', device: memDevice(2 << 20, { allocationDepth: true }), readOnly: true },
    ],
    32 << 20,
    'a',
  );
  const sent: Buffer[] = [];
  const neg = new Negotiator(table, tls, (b) => sent.push(b));
  assert.equal(neg.clientFlags(3), null);
  const replies = (): Reply[] => {
    const out = sent.splice(0).map((b) => {
      assert.equal(b.readBigUInt64BE(0), 0x3e889045565a9n);
      assert.equal(b.readUInt32BE(16), b.length - 20);
      return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), data: b.subarray(20) };
    });
    return out;
  };
  const opt = (option: number, data: Buffer = Buffer.alloc(0)) => neg.handle({ option, data, length: data.length });
  return { neg, replies, opt, raw: sent, table };
}

const info = (name: string, infos: number[]): Buffer => Buffer.concat([u32(Buffer.byteLength(name)), Buffer.from(name), u16(infos.length), ...infos.map(u16)]);
const meta = (name: string, qs: string[]): Buffer =>
  Buffer.concat([u32(Buffer.byteLength(name)), Buffer.from(name), u32(qs.length), ...qs.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)])]);

test('INFO sends EXPORT, NAME, DESCRIPTION and BLOCK_SIZE, then ACK; flags follow the device', () => {
  const { opt, replies } = setup();
  assert.deepEqual(opt(6, info('', [1, 2, 3])), { kind: 'continue' });
  const r = replies();
  assert.deepEqual(r.map((x) => x.type), [3, 3, 3, 3, 1]);
  const exp = r[0]!.data;
  assert.equal(exp.readUInt16BE(0), 0);
  assert.equal(exp.readBigUInt64BE(2), 1n << 20n);
  // HAS_FLAGS|SEND_FLUSH|SEND_FUA|ROTATIONAL|SEND_TRIM|SEND_WRITE_ZEROES|SEND_CACHE|FAST_ZERO; no DF (no structured replies), no MULTI_CONN.
  assert.equal(exp.readUInt16BE(10), 0x1 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x400 | 0x800);
  assert.equal(r[1]!.data.toString('latin1'), '\0\x01a');
  assert.equal(r[2]!.data.toString('latin1'), '\0\x02disk a');
  assert.deepEqual([r[3]!.data.readUInt16BE(0), r[3]!.data.readUInt32BE(2), r[3]!.data.readUInt32BE(6), r[3]!.data.readUInt32BE(10)], [3, 512, 4096, 32 << 20]);
});

test('GO on a read-only export enters transmission with READ_ONLY and DF once structured', () => {
  const { opt, replies } = setup();
  opt(8);
  assert.equal(replies()[0]!.type, 1);
  const action = opt(7, info('b', []));
  assert.equal(action.kind, 'transmission');
  const r = replies();
  const flags = r[0]!.data.readUInt16BE(10);
  assert.equal(flags & 0x2, 0x2, 'READ_ONLY');
  assert.equal(flags & 0x80, 0x80, 'SEND_DF');
  assert.equal(flags & (0x20 | 0x40 | 0x8), 0, 'no write-like flags on a read-only export');
  assert.equal(r[r.length - 1]!.type, 1);
});

test('LIST names every export with its description', () => {
  const { opt, replies } = setup();
  opt(3);
  const r = replies();
  assert.deepEqual(r.map((x) => x.type), [2, 2, 1]);
  assert.deepEqual(r.slice(0, 2).map((x) => x.data.toString('latin1')), ['\0\0\0\x01adisk a', '\0\0\0\x01b']);
});

test('meta contexts: list wildcards, set exact names, need structured replies, reset on SET', () => {
  const { opt, replies, neg } = setup();
  opt(10, meta('b', ['base:allocation']));
  assert.equal(replies()[0]!.type, 0x80000003, 'SET before STRUCTURED_REPLY is invalid');
  opt(8);
  replies();
  opt(9, meta('b', []));
  assert.deepEqual(replies().map((x) => x.data.subarray(4).toString()), ['base:allocation', 'qemu:allocation-depth', '']);
  opt(9, meta('a', ['qemu:']));
  assert.deepEqual(replies().map((x) => x.type), [1], 'export a has no allocation depth');
  opt(10, meta('b', ['base:', 'qemu:', 'x-other:thing', 'nocolon', 'base:allocation']));
  const set = replies();
  assert.deepEqual(set.map((x) => x.data.subarray(4).toString()), ['base:allocation', '']);
  assert.notEqual(set[0]!.data.readUInt32BE(0), 0);
  // GO on the same export carries the context; GO on another drops it.
  const go = neg.handle({ option: 7, data: info('b', []), length: 0 });
  assert.ok(go.kind === 'transmission' && go.contexts.length === 1);
});

test('contexts set for one export do not carry to another', () => {
  const { opt, neg, replies } = setup();
  opt(8);
  opt(10, meta('b', ['base:allocation']));
  replies();
  const go = neg.handle({ option: 7, data: info('a', []), length: 0 });
  assert.ok(go.kind === 'transmission' && go.contexts.length === 0);
});

test('matchContexts follows qemu: empty leaf lists, never selects', () => {
  const { table } = setup();
  const b = table.lookup('b')!;
  assert.deepEqual(matchContexts(b, ['qemu:'], true).map((c) => c.name), ['qemu:allocation-depth']);
  assert.deepEqual(matchContexts(b, ['qemu:'], false), []);
  assert.deepEqual(matchContexts(b, ['qemu:allocation-depth', 'base:allocation'], false).map((c) => c.name), ['base:allocation', 'qemu:allocation-depth']);
  assert.deepEqual(matchContexts(b, ['base:allocation-ish'], true), []);
});

test('require mode refuses everything but STARTTLS and ABORT, and EXPORT_NAME disconnects', () => {
  const { opt, replies, neg } = setup('require');
  for (const o of [3, 6, 7, 8, 9, 10, 99]) {
    assert.deepEqual(opt(o), { kind: 'continue' });
    assert.equal(replies()[0]!.type, 0x80000005, `option ${o}`);
  }
  assert.equal(opt(1, Buffer.from('a')).kind, 'disconnect');
  assert.deepEqual(opt(5), { kind: 'starttls' });
  assert.equal(replies()[0]!.type, 1);
  neg.tlsStarted();
  opt(5);
  assert.equal(replies()[0]!.type, 0x80000003, 'STARTTLS twice is invalid');
  assert.equal(opt(7, info('a', [])).kind, 'transmission');
});

test('STARTTLS with data is invalid; ABORT is acknowledged; non-fixed clients only get EXPORT_NAME', () => {
  const { opt, replies } = setup('on');
  opt(5, Buffer.from('x'));
  assert.equal(replies()[0]!.type, 0x80000003);
  assert.deepEqual(opt(2, Buffer.from('ignored')), { kind: 'abort' });
  assert.equal(replies()[0]!.type, 1);
  const s = setup();
  assert.equal(s.neg.clientFlags(0), null);
  assert.equal(s.opt(3).kind, 'disconnect');
  assert.equal(s.neg.clientFlags(4) !== null, true, 'unknown client flag');
});

test('EXPORT_NAME replies size and flags, with 124 zeroes unless NO_ZEROES', () => {
  const { opt, raw } = setup();
  assert.equal(opt(1, Buffer.from('')).kind, 'transmission');
  assert.equal(raw.pop()!.length, 10);
  const s = setup();
  s.neg.clientFlags(1);
  s.opt(1, Buffer.from('b'));
  const r = s.raw.pop()!;
  assert.equal(r.length, 134);
  assert.equal(r.readBigUInt64BE(0), 2n << 20n);
});

test('over-long option data is answered with ERR_TOO_BIG', () => {
  const { neg, replies } = setup();
  assert.deepEqual(neg.handle({ option: 6, data: undefined, length: 1 << 20 }), { kind: 'continue' });
  assert.equal(replies()[0]!.type, 0x80000009);
});

// The generic netlink client and socketpair binding against the host's own kernel: no VM
// and no nbd module needed, since the controller family (nlctrl) is always registered.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { Socket } from 'node:net';
import { GenlSocket } from '../../src/kernel/genl.js';
import { CTRL_CMD_GETFAMILY, decodeFamily, GENL_ID_CTRL } from '../../src/kernel/genl-codec.js';
import { NetlinkError } from '../../src/kernel/netlink-socket.js';
import { nlaString } from '../../src/kernel/netlink-codec.js';
import { socketPair } from '../../src/sys/socket.js';

test('GETFAMILY resolves the controller itself, with its multicast group', async (t) => {
  const g = GenlSocket.open();
  t.after(() => g.close());
  const fam = await g.resolveFamily('nlctrl');
  assert.equal(fam.id, GENL_ID_CTRL);
  assert.equal(fam.name, 'nlctrl');
  assert.ok(fam.version >= 1);
  assert.ok(fam.mcastGroups.has('notify'));
});

test('an unknown family comes back as NetlinkError ENOENT', async (t) => {
  const g = GenlSocket.open();
  t.after(() => g.close());
  await assert.rejects(g.resolveFamily('imgbd-nosuch'), (e: unknown) => e instanceof NetlinkError && e.code === 'ENOENT' && e.errno === 2);
  // The socket stays usable after an error reply.
  assert.equal((await g.resolveFamily('nlctrl')).id, GENL_ID_CTRL);
});

test('a message to an unregistered family id is refused by the kernel', async (t) => {
  const g = GenlSocket.open();
  t.after(() => g.close());
  await assert.rejects(g.request(0x3ff, CTRL_CMD_GETFAMILY, 1, [nlaString(2, 'x')], { what: 'bogus' }), (e: unknown) => e instanceof NetlinkError && e.errno > 0);
});

test('concurrent requests on one socket are serialized and each gets its own reply', async (t) => {
  const g = GenlSocket.open();
  t.after(() => g.close());
  const names = ['nlctrl', 'imgbd-nosuch-1', 'nlctrl', 'imgbd-nosuch-2'];
  const got = await Promise.allSettled(names.map((n) => g.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 2, [nlaString(2, n)], { what: n })));
  assert.deepEqual(
    got.map((r) => r.status),
    ['fulfilled', 'rejected', 'fulfilled', 'rejected'],
  );
});

test('socketPair gives two connected stream fds usable as net.Socket', async (t) => {
  const [a, b] = socketPair();
  assert.notEqual(a, b);
  const sa = new Socket({ fd: a, readable: true, writable: true });
  const sb = new Socket({ fd: b, readable: true, writable: true });
  t.after(() => {
    sa.destroy();
    sb.destroy();
  });
  sa.end(Buffer.from('ping'));
  const chunks: Buffer[] = [];
  sb.on('data', (d: Buffer) => chunks.push(d));
  await once(sb, 'end');
  assert.equal(Buffer.concat(chunks).toString(), 'ping');
});

test('a dump lists every registered family, nlctrl among them', async (t) => {
  const g = GenlSocket.open();
  t.after(() => g.close());
  const replies = await g.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 2, [], { what: 'GETFAMILY dump', dump: true });
  const names = replies.map((m) => decodeFamily(m).name);
  assert.ok(names.includes('nlctrl'), names.join(','));
  assert.equal(new Set(names).size, names.length);
});

test('a request still queued at close() fails with ERR_NETLINK_CLOSED', async () => {
  const g = GenlSocket.open();
  const pending = g.resolveFamily('nlctrl');
  g.close();
  await assert.rejects(pending, (e: unknown) => (e as { code?: string }).code === 'ERR_NETLINK_CLOSED');
});

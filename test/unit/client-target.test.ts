// resolveTarget: URIs, explicit addresses and options merged into one connection target.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { resolveTarget } from '../../src/client/target.js';
import { UsageError } from '../../src/errors.js';

describe('resolveTarget', () => {
  it('takes the export name and TLS settings from the URI', () => {
    assert.deepEqual(resolveTarget('nbds+unix:///disk%201?socket=/run/s&tls-psk-file=/k.psk&tls-username=al'), {
      socket: '/run/s',
      port: 10809,
      exportName: 'disk 1',
      tls: { pskFile: '/k.psk', username: 'al' },
    });
    assert.deepEqual(resolveTarget('nbd://[::1]:1234/x'), { host: '::1', port: 1234, exportName: 'x' });
  });

  it('plain nbd:// with credentials still requires TLS (no silent downgrade)', () => {
    assert.deepEqual(resolveTarget('nbd://h/?tls-certificates=/pki&tls-verify-peer=0').tls, { certificatesDir: '/pki', verifyPeer: false });
  });

  it('explicit options win over the URI', () => {
    const t = resolveTarget('nbds://h/a?tls-certificates=/pki', { exportName: 'b', tls: { verifyPeer: false } });
    assert.equal(t.exportName, 'b');
    assert.deepEqual(t.tls, { certificatesDir: '/pki', verifyPeer: false });
  });

  it('accepts an address object', () => {
    assert.deepEqual(resolveTarget({ socket: '/s' }), { socket: '/s', port: 10809, exportName: '' });
    assert.deepEqual(resolveTarget({ host: 'h', port: 5, exportName: 'e', tls: true }), { host: 'h', port: 5, exportName: 'e', tls: {} });
  });

  for (const [input, re] of [
    ['nbds://h/?tls-type=anon', /anonymous/],
    ['nbds://h/?tls-type=psk', /needs tls-psk-file/],
    ['nbds://h/?tls-type=x509&tls-psk-file=/k', /conflicts/],
    ['nbd+unix:///', /socket/],
  ] as const) {
    it(`refuses ${input}`, () => assert.throws(() => resolveTarget(input), (e: unknown) => e instanceof UsageError && re.test(e.message)));
  }
  it('refuses an address with neither or both of socket and host', () => {
    assert.throws(() => resolveTarget({}), UsageError);
    assert.throws(() => resolveTarget({ socket: '/s', host: 'h' }), UsageError);
  });
});

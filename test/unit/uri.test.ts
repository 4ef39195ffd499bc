// NBD URI parsing against the examples of nbd-uri.md and libnbd's conventions, the
// refusals, and formatting that reads back to the same target.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { UsageError } from '../../src/errors.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from '../../src/protocol/uri.js';

const valid: [string, NbdUri][] = [
  // nbd-uri.md "NBD URI export name" table
  ['nbd://example.com/disk', { tls: false, transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk' }],
  ['nbd+unix:///disk?socket=sock', { tls: false, transport: 'unix', socket: 'sock', exportName: 'disk' }],
  ['nbd://example.com/', { tls: false, transport: 'tcp', host: 'example.com', port: 10809, exportName: '' }],
  ['nbd://example.com', { tls: false, transport: 'tcp', host: 'example.com', port: 10809, exportName: '' }],
  ['nbd://example.com//disk', { tls: false, transport: 'tcp', host: 'example.com', port: 10809, exportName: '/disk' }],
  ['nbd://example.com/hello%20world', { tls: false, transport: 'tcp', host: 'example.com', port: 10809, exportName: 'hello world' }],
  // ports, IPv6 literals, userinfo
  ['nbd://127.0.0.1:1234/x', { tls: false, transport: 'tcp', host: '127.0.0.1', port: 1234, exportName: 'x' }],
  ['nbd://[::1]/', { tls: false, transport: 'tcp', host: '::1', port: 10809, exportName: '' }],
  ['nbd://[fe80::1%25eth0]:99/e', { tls: false, transport: 'tcp', host: 'fe80::1%eth0', port: 99, exportName: 'e' }],
  ['nbds://alice@host/e', { tls: true, transport: 'tcp', host: 'host', port: 10809, exportName: 'e', username: 'alice' }],
  ['nbd:///', { tls: false, transport: 'tcp', host: 'localhost', port: 10809, exportName: '' }],
  ['NBD://Host/E', { tls: false, transport: 'tcp', host: 'Host', port: 10809, exportName: 'E' }],
  // unix sockets, abstract namespace, encoded paths
  ['nbd+unix://?socket=/tmp/s', { tls: false, transport: 'unix', socket: '/tmp/s', exportName: '' }],
  ['nbd+unix:///?socket=%00/abstract', { tls: false, transport: 'unix', socket: '\0/abstract', exportName: '' }],
  ['nbd+unix:///a%2Fb?socket=/tmp/my%20dir/s%26t', { tls: false, transport: 'unix', socket: '/tmp/my dir/s&t', exportName: 'a/b' }],
  ['nbd://h/%C3%A9t%C3%A9', { tls: false, transport: 'tcp', host: 'h', port: 10809, exportName: 'été' }],
  // TLS parameters
  [
    'nbds+unix:///e?socket=/s&tls-certificates=/pki&tls-verify-peer=0&tls-hostname=srv',
    { tls: true, transport: 'unix', socket: '/s', exportName: 'e', tlsCertificates: '/pki', tlsVerifyPeer: false, tlsHostname: 'srv' },
  ],
  [
    'nbds://h/?tls-psk-file=/keys.psk&tls-username=bob&tls-type=psk',
    { tls: true, transport: 'tcp', host: 'h', port: 10809, exportName: '', tlsPskFile: '/keys.psk', username: 'bob', tlsType: 'psk' },
  ],
  ['nbd://h/?tls-verify-peer=1&x-custom=whatever', { tls: false, transport: 'tcp', host: 'h', port: 10809, exportName: '', tlsVerifyPeer: true }],
];

const invalid: [string, RegExp][] = [
  ['http://example.com/', /unknown scheme/],
  ['nbd', /not a URI/],
  ['nbd+unix:///e', /requires \?socket/],
  ['nbd+unix://host/e?socket=/s', /takes no host/],
  ['nbd://h/?socket=/s', /only for nbd\+unix/],
  ['nbd://h:0/', /out of range/],
  ['nbd://h:65536/', /out of range/],
  ['nbd://h:12a/', /bad port/],
  ['nbd://::1/', /brackets/],
  ['nbd://[::1/', /unterminated/],
  ['nbd://[zz]/', /bad IPv6/],
  ['nbd://[::1]x/', /after IPv6/],
  ['nbd://h/%zz', /percent-encoding/],
  ['nbd://h/%ff', /UTF-8/],
  ['nbd://h/a%00b', /NUL/],
  ['nbd://h/#frag', /fragments/],
  ['nbd://u:pw@h/', /passwords/],
  ['nbd://h/?tls-verify-peer=maybe', /0 or 1/],
  ['nbd://h/?tls-type=kerberos', /tls-type/],
  ['nbd://h/?bogus=1', /unknown query parameter/],
  ['nbd+unix:///?socket=/a&socket=/b', /twice/],
  ['nbd+unix:///?socket=', /empty/],
  ['nbd://alice@h/?tls-username=bob', /conflicts/],
  ['nbds://h/?tls-certificates=/d&tls-psk-file=/f', /mutually exclusive/],
];

describe('parseNbdUri', () => {
  for (const [uri, expected] of valid) {
    it(`parses ${uri}`, () => assert.deepStrictEqual(parseNbdUri(uri), expected));
  }
  for (const [uri, re] of invalid) {
    it(`refuses ${uri}`, () =>
      assert.throws(
        () => parseNbdUri(uri),
        (e: unknown) => e instanceof UsageError && e.code === 'ERR_USAGE' && re.test(e.message),
      ));
  }
});

describe('formatNbdUri', () => {
  it('formats canonical URIs', () => {
    assert.equal(formatNbdUri(parseNbdUri('nbd://example.com:10809/hello%20world')), 'nbd://example.com/hello%20world');
    assert.equal(formatNbdUri(parseNbdUri('nbd://[::1]:99//disk')), 'nbd://[::1]:99//disk');
    assert.equal(formatNbdUri(parseNbdUri('nbds+unix:///e?socket=/a%20b&tls-verify-peer=0')), 'nbds+unix:///e?socket=/a%20b&tls-verify-peer=0');
  });

  it('reads back what it writes, for any export name, socket path and user', () => {
    const text = fc.string({ unit: 'grapheme', maxLength: 30 }).filter((s) => !s.includes('\0'));
    fc.assert(
      fc.property(
        fc.oneof(
          fc.record({ tls: fc.boolean(), transport: fc.constant('unix' as const), socket: text.filter((s) => s !== ''), exportName: text }),
          fc.record(
            {
              tls: fc.boolean(),
              transport: fc.constant('tcp' as const),
              host: fc.oneof(fc.domain(), fc.ipV4(), fc.ipV6()),
              port: fc.integer({ min: 1, max: 65535 }),
              exportName: text,
              username: text.filter((s) => s !== ''),
            },
            { requiredKeys: ['tls', 'transport', 'host', 'port', 'exportName'] },
          ),
        ),
        (u: NbdUri) => assert.deepStrictEqual(parseNbdUri(formatNbdUri(u)), { ...u }),
      ),
      { numRuns: 500 },
    );
  });
});

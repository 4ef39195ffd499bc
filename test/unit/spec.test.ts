// nbd:IMAGE[:PART] and IMAGE[:PART] parsing, table-driven: what each spelling selects, and
// the exact reason each bad one is refused.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { UsageError } from '../../src/errors.js';
import { parseImageSpec, parseNbdRootSpec, type ImageSpec } from '../../src/container/spec.js';

const good: Array<[string, ImageSpec]> = [
  ['nbd:/path/img.qcow2', { image: '/path/img.qcow2' }],
  ['nbd:/path/img.qcow2:1', { image: '/path/img.qcow2', partition: 1 }],
  ['nbd:/path/img.qcow2:15', { image: '/path/img.qcow2', partition: 15 }],
  ['nbd:/path/img.qcow2:256', { image: '/path/img.qcow2', partition: 256 }],
  ['nbd:/path/img:name=root', { image: '/path/img', partition: { name: 'root' } }],
  ['nbd:/path/img:name=EFI system', { image: '/path/img', partition: { name: 'EFI system' } }],
  ['nbd:/path/img:name=a:b', { image: '/path/img', partition: { name: 'a:b' } }],
  ['nbd:/path/img:name=7', { image: '/path/img', partition: { name: '7' } }],
  ['nbd:/path/img:name=x=y', { image: '/path/img', partition: { name: 'x=y' } }],
  ['nbd:/path/img:name=dätä ✓', { image: '/path/img', partition: { name: 'dätä ✓' } }],
  ['nbd:relative/disk.raw:2', { image: 'relative/disk.raw', partition: 2 }],
  ['nbd:disk-2', { image: 'disk-2' }],
  ['nbd:/data/name=x/disk.img', { image: '/data/name=x/disk.img' }],
  ['nbd:/path/img 1', { image: '/path/img 1' }],
];

const bad: Array<[string, RegExp]> = [
  ['/path/img.qcow2', /starts with "nbd:"/],
  ['nbd:', /no image path/],
  ['nbd::1', /no image path/],
  ['nbd::name=root', /no image path/],
  ['nbd:/path/img:0', /partition number 0 is not in 1\.\.256/],
  ['nbd:/path/img:01', /partition number 01 is not in 1\.\.256/],
  ['nbd:/path/img:257', /partition number 257 is not in 1\.\.256/],
  ['nbd:/path/img:99999999999999999999', /partition number 99999999999999999999 is not in/],
  ['nbd:/path/img:name=', /empty partition name/],
  ['nbd:/path/img:name=' + 'x'.repeat(37), /longer than GPT's 36 characters/],
  ['nbd:/path/a:b/img.qcow2', /ambiguous: the image path "\/path\/a:b\/img\.qcow2" contains ':'.*rename the image or use a symlink/],
  ['nbd:/path/a:b/img.qcow2:1', /ambiguous: the image path "\/path\/a:b\/img\.qcow2" contains ':'/],
  ['nbd:/path/a:b/img:name=root', /ambiguous: the image path "\/path\/a:b\/img" contains ':'/],
  ['nbd:/path/img:p1', /ambiguous: the image path "\/path\/img:p1"/],
  ['nbd:/path/img:-1', /ambiguous/],
  ['nbd:/path/img:1:2', /ambiguous: the image path "\/path\/img:1"/],
  ['nbd:/path/img:label=root', /ambiguous/],
  ['nbd://localhost:10809/export', /NBD URIs are not accepted/],
  ['nbd+unix:///export?socket=/tmp/s', /NBD URIs are not accepted/],
];

for (const [spec, want] of good) {
  test(`root spec ${JSON.stringify(spec)}`, () => {
    assert.deepEqual(parseNbdRootSpec(spec), want);
    assert.deepEqual(parseImageSpec(spec.slice(4)), want, 'the bare attach form parses the same');
  });
}

for (const [spec, message] of bad) {
  test(`root spec ${JSON.stringify(spec.slice(0, 60))} is refused`, () => {
    assert.throws(
      () => parseNbdRootSpec(spec),
      (e: unknown) => {
        assert.ok(e instanceof UsageError);
        assert.equal(e.code, 'ERR_USAGE');
        assert.match(e.message, message);
        return true;
      },
    );
  });
}

test('any string parses to a spec without ":" in the image path, or to a UsageError', () => {
  fc.assert(
    fc.property(fc.string({ unit: fc.constantFrom('a', '/', ':', '1', '0', 'n', 'name=', '=', ' ', 'é') }), (s) => {
      try {
        const r = parseImageSpec(s);
        assert.ok(r.image.length > 0 && !r.image.includes(':'));
        const rebuilt = r.partition === undefined ? r.image : typeof r.partition === 'number' ? `${r.image}:${r.partition}` : `${r.image}:name=${r.partition.name}`;
        assert.equal(rebuilt, s);
      } catch (e) {
        if (!(e instanceof UsageError)) throw e;
      }
    }),
    { numRuns: 2000 },
  );
});

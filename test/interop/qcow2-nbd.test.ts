// qemu-made qcow2 images of every shape served by `imgbd serve`: the export must read the same
// as qemu reads the image (qemu-img compare of the NBD URI against the image), and nbdinfo --map
// must agree with qemu-img map on which bytes hold data.

import { strict as assert } from 'node:assert';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { requirePeers, runOk, tempDir } from '../helpers/peers.js';
import { runImgbdOk, serveImgbd, stopServe } from './qcow2-cli-helpers.js';

const PEERS = ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy'];

interface Case {
  readonly name: string;
  /** Builds the image to serve in `dir` and returns its path. */
  build(dir: string): Promise<string>;
}

const KiB = 1024;
const MiB = 1024 * KiB;

async function qemuIo(image: string, cmds: readonly string[], format = 'qcow2'): Promise<void> {
  await runOk('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), image]);
}

/** Data, zeroes and discards at cluster-aligned, sub-cluster and unaligned places. */
function workload(clusterBytes: number, sizeBytes: number): string[] {
  const c = clusterBytes;
  return [
    `write -P 0x11 0 ${3 * c}`,
    `write -P 0x22 ${5 * c + 512} ${c + 1536}`,
    `write -P 0x33 ${Math.floor(sizeBytes / 2) + 7} 70001`,
    `write -z ${c} ${c}`,
    `write -z -u ${Math.floor(sizeBytes / 2)} ${4 * c}`,
    `discard ${2 * c} ${c}`,
    `write -P 0x44 ${sizeBytes - 3 * c} ${3 * c}`,
    `write -P 0x55 ${sizeBytes - 4096 - 300} 300`,
  ];
}

function plain(name: string, size: number, opts: string, clusterBytes: number): Case {
  return {
    name,
    async build(dir) {
      const img = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, img, String(size)]);
      await qemuIo(img, workload(clusterBytes, size));
      return img;
    },
  };
}

function compressed(type: 'zlib' | 'zstd'): Case {
  return {
    name: `convert -c, compression_type=${type}`,
    async build(dir) {
      const src = join(dir, 'src.raw');
      await runOk('qemu-img', ['create', '-q', '-f', 'raw', src, String(8 * MiB)]);
      await qemuIo(src, workload(65536, 8 * MiB), 'raw');
      // Random bytes do not compress: those clusters stay uncompressed, next to compressed ones.
      await runOk('dd', ['if=/dev/urandom', `of=${src}`, 'bs=64k', 'count=3', 'seek=40', 'conv=notrunc', 'status=none']);
      const img = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, img]);
      return img;
    },
  };
}

const CASES: Case[] = [
  plain('compat=0.10, 64K clusters', 8 * MiB, 'compat=0.10', 65536),
  plain('compat=1.1, 512-byte clusters', 2 * MiB, 'compat=1.1,cluster_size=512', 512),
  plain('compat=1.1, 4K clusters', 8 * MiB, 'compat=1.1,cluster_size=4k', 4096),
  plain('compat=1.1, 64K clusters', 8 * MiB, 'compat=1.1,cluster_size=64k', 65536),
  plain('compat=1.1, 2M clusters', 24 * MiB, 'compat=1.1,cluster_size=2M', 2 * MiB),
  plain('extended_l2=on, 64K clusters', 8 * MiB, 'extended_l2=on,cluster_size=64k', 65536),
  plain('extended_l2=on, 2M clusters', 24 * MiB, 'extended_l2=on,cluster_size=2M', 2 * MiB),
  plain('refcount_bits=1', 8 * MiB, 'refcount_bits=1', 65536),
  plain('preallocation=metadata', 8 * MiB, 'preallocation=metadata', 65536),
  plain('preallocation=falloc', 8 * MiB, 'preallocation=falloc', 65536),
  plain('preallocation=full', 8 * MiB, 'preallocation=full', 65536),
  compressed('zlib'),
  compressed('zstd'),
  {
    name: 'backing chain of depth 3: raw <- qcow2 <- qcow2',
    async build(dir) {
      const base = join(dir, 'base.raw');
      const mid = join(dir, 'mid.qcow2');
      const top = join(dir, 'top.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'raw', base, String(6 * MiB)]);
      await qemuIo(base, [`write -P 0xa1 0 ${6 * MiB}`, `write -z ${MiB} ${MiB}`], 'raw');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '-o', 'cluster_size=4k', mid, String(7 * MiB)]);
      await qemuIo(mid, [`write -P 0xb2 ${512 * KiB} ${MiB}`, `write -z ${3 * MiB} 8192`, `write -P 0xb3 ${6 * MiB + 100} 5000`]);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, String(8 * MiB)]);
      await qemuIo(top, [`write -P 0xc3 ${MiB + 4096} 65536`, `write -z 0 4096`, `write -P 0xc4 ${7 * MiB} 12345`]);
      return top;
    },
  },
  {
    name: 'overlay with extended L2 over a qcow2 backing file',
    async build(dir) {
      const base = join(dir, 'base.qcow2');
      const top = join(dir, 'top.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(4 * MiB)]);
      await qemuIo(base, [`write -P 0x5a 0 ${4 * MiB}`]);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on', top]);
      await qemuIo(top, ['write -P 0x6b 2048 1024', 'write -z 65536 4096', `write -P 0x7c ${MiB - 100} 300`]);
      return top;
    },
  },
  {
    name: 'internal snapshot present',
    async build(dir) {
      const img = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(8 * MiB)]);
      await qemuIo(img, workload(65536, 8 * MiB));
      await runOk('qemu-img', ['snapshot', '-c', 'first', img]);
      // Writes after the snapshot copy shared clusters (refcount 2, COPIED clear).
      await qemuIo(img, ['write -P 0x99 4096 8192', `write -z ${2 * MiB} ${MiB}`, `discard 0 65536`]);
      return img;
    },
  },
  {
    name: 'external data_file',
    async build(dir) {
      const img = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'img.data')}`, img, String(8 * MiB)]);
      await qemuIo(img, workload(65536, 8 * MiB));
      return img;
    },
  },
  {
    name: 'lazy_refcounts=on with the dirty bit left set',
    async build(dir) {
      const img = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, String(8 * MiB)]);
      // qemu-io killed by its own SIGKILL: the dirty bit stays set, refcounts are stale.
      await runOk('sh', ['-c', `qemu-io -f qcow2 -c 'write -P 0x42 0 200k' -c 'write -P 0x43 3M 64k' -c 'sigraise 9' '${img}' >/dev/null 2>&1; true`]);
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as Record<string, unknown>;
      assert.equal(info['dirty-flag'], true, 'the image should be left dirty');
      return img;
    },
  },
];

interface MapRange {
  readonly start: number;
  readonly end: number;
  readonly data: boolean;
}

/** Merge adjacent ranges with the same flag so two maps of different granularity compare. */
function normalise(ranges: MapRange[]): MapRange[] {
  const out: MapRange[] = [];
  for (const r of ranges) {
    if (r.end === r.start) continue;
    const last = out[out.length - 1];
    if (last && last.data === r.data && last.end === r.start) out[out.length - 1] = { ...last, end: r.end };
    else out.push(r);
  }
  return out;
}

async function qemuMap(image: string): Promise<MapRange[]> {
  const entries = JSON.parse(await runOk('qemu-img', ['map', '--output=json', image])) as { start: number; length: number; data: boolean }[];
  return normalise(entries.map((e) => ({ start: e.start, end: e.start + e.length, data: e.data })));
}

async function nbdMap(uri: string): Promise<MapRange[]> {
  const entries = JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri])) as { offset: number; length: number; type: number }[];
  // base:allocation: bit 0 is NBD_STATE_HOLE; qemu's "data": false is a hole.
  return normalise(entries.map((e) => ({ start: e.offset, end: e.offset + e.length, data: (e.type & 1) === 0 })));
}

async function checkServed(t: TestContext, c: Case): Promise<void> {
  const dir = tempDir(t);
  const image = await c.build(dir);
  const served = await serveImgbd(t, join(dir, 'nbd.sock'), ['-f', 'qcow2', '-r', '-t', '-e', '0', image]);
  try {
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, served.uri]);
    // nbdcopy's 256 KiB requests over four connections take the zero-copy path where they can.
    const copy = join(dir, 'copy.raw');
    await runOk('nbdcopy', [served.uri, copy]);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, copy]);
    assert.deepEqual(await nbdMap(served.uri), await qemuMap(image));
    // imgbd info must describe the image as qemu-img info does (same file, same moment).
    const ours = JSON.parse(await runImgbdOk(['info', '--json', image])) as Record<string, unknown>;
    const theirs = JSON.parse(await runOk('qemu-img', ['info', '--output=json', image])) as Record<string, unknown>;
    assert.deepEqual(ours, theirs);
  } finally {
    await stopServe(served);
  }
}

describe('imgbd serve of qemu-made qcow2 images', () => {
  for (const c of CASES) {
    it(c.name, async (t) => {
      if (!requirePeers(t, ...PEERS)) return;
      await checkServed(t, c);
    });
  }
});

// Reading and rewriting the backing file reference in an image header, for rebase and commit:
//   qcow2 (qcow2.txt "Header"): backing_file_offset (u64 BE at 8) and backing_file_size (u32 BE
//     at 16) name bytes in cluster 0 after the header extensions; the format lives in the
//     backing format extension (0xe2792aca). Every other extension is carried over untouched.
//   qed (qed_spec.rst "Header"): backing_filename_offset/size (u32 LE at 56/60) inside the
//     header clusters, feature bits QED_F_BACKING_FILE and QED_F_BACKING_FORMAT_NO_PROBE.
// The image must not be open for writing elsewhere while its header is rewritten.

import { UnsupportedImageError, UsageError } from '../errors.js';
import { HostFile } from '../io/host-file.js';
import { QCOW2_EXT, QCOW2_MAX_BACKING_NAME_BYTES, QCOW2_V2_HEADER_BYTES, decodeQcow2Header } from '../formats/qcow2/header.js';
import { QED_F, QED_HEADER_BYTES, QED_MAX_BACKING_NAME_BYTES, encodeQedHeader, parseQedHeader } from '../formats/qed/header.js';
import { writeU64 } from '../util/u64.js';

export interface BackingReference {
  /** As stored in the image (relative names are relative to the image's directory). */
  readonly backingFile: string | null;
  /** Recorded format; null when the image does not say (then it is probed). */
  readonly backingFormat: string | null;
}

async function readQcow2Cluster0(file: HostFile): Promise<Buffer> {
  const head = Buffer.alloc(QCOW2_V2_HEADER_BYTES);
  await file.pread(head, 0);
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw new UnsupportedImageError(`qcow2: cluster bits ${clusterBits} out of range`);
  const c0 = Buffer.alloc(2 ** clusterBits);
  await file.pread(c0, 0);
  return c0;
}

export async function readBackingReference(path: string, format: string): Promise<BackingReference> {
  const file = await HostFile.open(path, { readOnly: true });
  try {
    const size = await file.size();
    if (format === 'qcow2') {
      const h = decodeQcow2Header(await readQcow2Cluster0(file), size);
      return { backingFile: h.backingFile, backingFormat: h.backingFormat };
    }
    if (format === 'qed') {
      const hb = Buffer.alloc(QED_HEADER_BYTES);
      await file.pread(hb, 0);
      const h = parseQedHeader(hb, size);
      if ((h.features & QED_F.BACKING_FILE) === 0) return { backingFile: null, backingFormat: null };
      const name = Buffer.alloc(h.backingFilenameSize);
      await file.pread(name, h.backingFilenameOffset);
      return { backingFile: name.toString('utf8'), backingFormat: (h.features & QED_F.BACKING_FORMAT_NO_PROBE) !== 0 ? 'raw' : null };
    }
    return { backingFile: null, backingFormat: null };
  } finally {
    await file.close();
  }
}

/** Point the image at `ref` (backingFile null removes the backing file). */
export async function writeBackingReference(path: string, format: string, ref: BackingReference): Promise<void> {
  if (ref.backingFile === '') throw new UsageError('an empty backing file name: pass null to remove the backing file');
  if (format === 'qcow2') return writeQcow2Backing(path, ref);
  if (format === 'qed') return writeQedBacking(path, ref);
  throw new UsageError(`${format} images have no backing file`);
}

async function writeQcow2Backing(path: string, ref: BackingReference): Promise<void> {
  const file = await HostFile.open(path, { readOnly: false });
  try {
    const c0 = await readQcow2Cluster0(file);
    const h = decodeQcow2Header(c0, await file.size());
    const out = Buffer.alloc(c0.length);
    c0.copy(out, 0, 0, h.headerLength);
    let pos = h.headerLength;
    const put = (type: number, data: Buffer): void => {
      const padded = Math.ceil(data.length / 8) * 8;
      if (pos + 8 + padded + 8 > out.length) throw new UnsupportedImageError('qcow2: the header extensions do not fit in the first cluster');
      out.writeUInt32BE(type, pos);
      out.writeUInt32BE(data.length, pos + 4);
      data.copy(out, pos + 8);
      pos += 8 + padded;
    };
    if (ref.backingFile !== null && ref.backingFormat !== null) put(QCOW2_EXT.BACKING_FORMAT, Buffer.from(ref.backingFormat, 'latin1'));
    for (const e of h.extensions) if (e.type !== QCOW2_EXT.BACKING_FORMAT && e.type !== QCOW2_EXT.END) put(e.type, e.data);
    pos += 8;
    writeU64(out, 0, 8);
    out.writeUInt32BE(0, 16);
    if (ref.backingFile !== null) {
      const name = Buffer.from(ref.backingFile, 'utf8');
      if (name.length > QCOW2_MAX_BACKING_NAME_BYTES || pos + name.length > out.length) throw new UnsupportedImageError(`qcow2: a backing file name of ${name.length} bytes does not fit`);
      name.copy(out, pos);
      writeU64(out, pos, 8);
      out.writeUInt32BE(name.length, 16);
    }
    await file.pwrite(out, 0);
    await file.datasync();
  } finally {
    await file.close();
  }
}

async function writeQedBacking(path: string, ref: BackingReference): Promise<void> {
  const file = await HostFile.open(path, { readOnly: false });
  try {
    const hb = Buffer.alloc(QED_HEADER_BYTES);
    await file.pread(hb, 0);
    const h = parseQedHeader(hb, await file.size());
    let features = h.features & ~(QED_F.BACKING_FILE | QED_F.BACKING_FORMAT_NO_PROBE);
    let offset = 0;
    let size = 0;
    if (ref.backingFile !== null) {
      const name = Buffer.from(ref.backingFile, 'utf8');
      if (name.length > QED_MAX_BACKING_NAME_BYTES || QED_HEADER_BYTES + name.length > h.headerSize * h.clusterSize) {
        throw new UnsupportedImageError(`qed: a backing file name of ${name.length} bytes does not fit in the header`);
      }
      // The name goes in first: the header must never point at bytes not yet written.
      await file.pwrite(name, QED_HEADER_BYTES);
      await file.datasync();
      features |= QED_F.BACKING_FILE;
      if (ref.backingFormat === 'raw') features |= QED_F.BACKING_FORMAT_NO_PROBE;
      offset = QED_HEADER_BYTES;
      size = name.length;
    }
    await file.pwrite(encodeQedHeader({ ...h, features, backingFilenameOffset: offset, backingFilenameSize: size }), 0);
    await file.datasync();
  } finally {
    await file.close();
  }
}

// Image-format signatures recognised by magic alone, so that probing never calls a
// structured image "raw" just because this build has no driver for it, and so that a
// probed raw image can refuse writes that would turn it into one (QEMU's rule).
//
// Sources: qcow2.txt ("magic", bytes 0-3: 'Q' 'F' 'I' 0xfb; qcow v1 shares it), qed_spec.rst
// (magic "QED\0" at 0), vdi-notes.md (signature 0xbeda107f, little-endian, at 0x40), and the
// signatures QEMU's other probes test at offset 0 (vmdk sparse "KDMV", vpc "conectix",
// vhdx "vhdxfile", LUKS "LUKS\xba\xbe", parallels, bochs).

export interface FormatMagic {
  readonly format: string;
  readonly offset: number;
  readonly bytes: Buffer;
}

export const PROBE_HEAD_BYTES = 512;

export const KNOWN_MAGICS: readonly FormatMagic[] = [
  { format: 'qcow2', offset: 0, bytes: Buffer.from([0x51, 0x46, 0x49, 0xfb]) },
  { format: 'qed', offset: 0, bytes: Buffer.from('QED\0', 'latin1') },
  { format: 'vdi', offset: 0x40, bytes: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) },
  { format: 'vmdk', offset: 0, bytes: Buffer.from('KDMV', 'latin1') },
  { format: 'vpc', offset: 0, bytes: Buffer.from('conectix', 'latin1') },
  { format: 'vhdx', offset: 0, bytes: Buffer.from('vhdxfile', 'latin1') },
  { format: 'luks', offset: 0, bytes: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
  { format: 'parallels', offset: 0, bytes: Buffer.from('WithoutFreeSpace', 'latin1') },
  { format: 'parallels', offset: 0, bytes: Buffer.from('WithouFreSpacExt', 'latin1') },
  { format: 'bochs', offset: 0, bytes: Buffer.from('Bochs Virtual HD Image', 'latin1') },
];

/** The first known format whose magic `head` carries, or null. A short head matches nothing it lacks. */
export function matchKnownMagic(head: Buffer): string | null {
  for (const m of KNOWN_MAGICS) {
    const end = m.offset + m.bytes.length;
    if (head.length >= end && head.compare(m.bytes, 0, m.bytes.length, m.offset, end) === 0) return m.format;
  }
  return null;
}

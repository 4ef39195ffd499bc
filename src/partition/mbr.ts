// MBR (DOS) partition tables: the four primary entries of sector 0 and the chain of extended
// boot records (EBRs) inside an extended partition, numbered as Linux numbers them
// (block/partitions/msdos.c): primaries by slot 1-4, logical partitions from 5 in chain order.
//
// Sector 0 and every EBR (one logical sector; only the first 512 bytes matter):
//   0x000  446 bytes  boot code (ignored)
//   0x1B8  u32 LE     disk signature (sector 0 only)
//   0x1BE  4 × 16-byte entries:
//            +0   u8      boot indicator: 0x80 active, 0x00 inactive (anything else: not an MBR)
//            +1   3 bytes CHS start (ignored: the LBA fields are authoritative)
//            +4   u8      system id (partition type)
//            +5   3 bytes CHS end (ignored)
//            +8   u32 LE  first sector: primary, from disk start; logical data entry, from its
//                         own EBR; link to the next EBR, from the extended partition's start
//            +12  u32 LE  number of sectors (0: unused entry)
//   0x1FE  0x55 0xAA  signature
//
// Nothing read from disk is trusted: every entry must lie inside the device (or, for a logical
// partition, inside its extended partition) and not overlap another, and the EBR walk
// terminates by construction (bounded count, no sector visited twice, every link inside the
// extended partition). An entry that breaks these rules is a CorruptImageError naming it.

import type { BlockDevice } from '../block/device.js';
import { CorruptImageError } from '../errors.js';
import { looksLikeFatBootSector } from '../fs/vfat.js';
import { readRange, type Partition, type PartitionTable } from './types.js';

export const MBR_ENTRIES_OFFSET = 0x1be;
export const MBR_ENTRY_BYTES = 16;
export const MBR_DISK_SIGNATURE_OFFSET = 0x1b8;
export const MBR_SIGNATURE_OFFSET = 0x1fe;

export const MBR_TYPE = {
  EMPTY: 0x00,
  DOS_EXTENDED: 0x05,
  WIN98_EXTENDED: 0x0f,
  LINUX_EXTENDED: 0x85,
  GPT_PROTECTIVE: 0xee,
} as const;

/** More EBRs than Linux could ever number (DISK_MAX_PARTS is 256): the chain is hostile. */
export const MAX_EBRS = 256;

export interface MbrEntry {
  /** 0-based slot in its sector. */
  readonly slot: number;
  readonly bootIndicator: number;
  readonly systemId: number;
  readonly startLba: number;
  readonly sectors: number;
}

export interface MbrSector {
  readonly diskSignature: number;
  readonly entries: readonly MbrEntry[];
}

export function isExtendedType(systemId: number): boolean {
  return systemId === MBR_TYPE.DOS_EXTENDED || systemId === MBR_TYPE.WIN98_EXTENDED || systemId === MBR_TYPE.LINUX_EXTENDED;
}

export function hasMbrSignature(sector: Buffer): boolean {
  return sector.length >= 512 && sector[MBR_SIGNATURE_OFFSET] === 0x55 && sector[MBR_SIGNATURE_OFFSET + 1] === 0xaa;
}

/** Decode the four entries of an MBR or EBR sector; null without the 0x55AA signature. */
export function decodeMbrSector(sector: Buffer): MbrSector | null {
  if (!hasMbrSignature(sector)) return null;
  const entries: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const p = MBR_ENTRIES_OFFSET + slot * MBR_ENTRY_BYTES;
    entries.push({
      slot,
      bootIndicator: sector[p],
      systemId: sector[p + 4],
      startLba: sector.readUInt32LE(p + 8),
      sectors: sector.readUInt32LE(p + 12),
    });
  }
  return { diskSignature: sector.readUInt32LE(MBR_DISK_SIGNATURE_OFFSET), entries };
}

export type MbrKind = 'none' | 'protective' | 'mbr';

/**
 * What sector 0 holds. 'none': no signature, boot indicators other than 0x00/0x80 (Linux's
 * test), or a FAT boot sector (a partitionless "superfloppy", blkid's exception);
 * 'protective': an entry of type 0xEE, so the disk is GPT (hybrid MBRs included, as Linux does).
 */
export function classifyMbr(sector0: Buffer): MbrKind {
  const mbr = decodeMbrSector(sector0);
  if (!mbr) return 'none';
  if (mbr.entries.some((e) => e.bootIndicator !== 0 && e.bootIndicator !== 0x80)) return 'none';
  if (mbr.entries.some((e) => e.systemId === MBR_TYPE.GPT_PROTECTIVE && e.sectors !== 0)) return 'protective';
  if (looksLikeFatBootSector(sector0)) return 'none';
  return 'mbr';
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}

function partUuid(diskSignature: number, number: number): string {
  return `${diskSignature.toString(16).padStart(8, '0')}-${hex2(number)}`;
}

interface Range {
  readonly what: string;
  readonly start: number;
  readonly end: number;
}

function checkNoOverlap(ranges: Range[]): void {
  const sorted = [...ranges].sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1];
    const b = sorted[i];
    if (b.start < a.end) throw new CorruptImageError(`MBR: ${b.what} overlaps ${a.what}`);
  }
}

/** Read the MBR partition table of `dev`, given its sector 0 already classified as 'mbr'. */
export async function readMbr(dev: BlockDevice, sector0: Buffer, sectorBytes = 512): Promise<PartitionTable> {
  const mbr = decodeMbrSector(sector0);
  if (!mbr) throw new CorruptImageError('MBR: sector 0 has no 0x55AA signature');
  const deviceSectors = Math.floor(dev.sizeBytes / sectorBytes);
  const partitions: Partition[] = [];
  const warnings: string[] = [];
  const primaries: Range[] = [];
  const data: Range[] = [];
  const extendeds: Array<{ entry: MbrEntry; number: number }> = [];

  for (const e of mbr.entries) {
    if (e.sectors === 0) continue;
    const number = e.slot + 1;
    const what = `primary entry ${number} (sectors ${e.startLba}+${e.sectors})`;
    if (e.startLba === 0) throw new CorruptImageError(`MBR: ${what} starts at sector 0, over the partition table`);
    if (e.startLba + e.sectors > deviceSectors) {
      throw new CorruptImageError(`MBR: ${what} ends past the device's last sector ${deviceSectors - 1}`);
    }
    const extended = isExtendedType(e.systemId);
    const range = { what, start: e.startLba, end: e.startLba + e.sectors };
    primaries.push(range);
    if (extended) extendeds.push({ entry: e, number });
    else data.push(range);
    partitions.push({
      number,
      startBytes: e.startLba * sectorBytes,
      sizeBytes: e.sectors * sectorBytes,
      type: hex2(e.systemId),
      uuid: partUuid(mbr.diskSignature, number),
      bootable: e.bootIndicator === 0x80,
      ...(extended ? { extended: true } : {}),
    });
  }
  checkNoOverlap(primaries);

  let next = 5;
  let ebrCount = 0;
  const ebrSectors: Range[] = [];
  const logicals: Range[] = [];
  // Linux walks every extended primary in slot order, numbering on from where the last stopped.
  for (const { entry: ext, number: extNumber } of extendeds) {
    const extStart = ext.startLba;
    const extEnd = ext.startLba + ext.sectors;
    const visited = new Set<number>();
    let ebr = extStart;
    for (;;) {
      if (++ebrCount > MAX_EBRS) throw new CorruptImageError(`MBR: more than ${MAX_EBRS} extended boot records in the chain`);
      if (visited.has(ebr)) throw new CorruptImageError(`MBR: the EBR chain of extended partition ${extNumber} loops back to sector ${ebr}`);
      visited.add(ebr);
      ebrSectors.push({ what: `the EBR at sector ${ebr}`, start: ebr, end: ebr + 1 });
      const sector = await readRange(dev, ebr * sectorBytes, sectorBytes, `EBR of extended partition ${extNumber}`);
      const decoded = decodeMbrSector(sector);
      if (!decoded) {
        // Linux stops the walk silently here; say so, since partitions may be missing.
        warnings.push(`the EBR at sector ${ebr} has no 0x55AA signature; no logical partitions after it were read`);
        break;
      }
      for (const e of decoded.entries) {
        if (e.sectors === 0 || isExtendedType(e.systemId)) continue;
        const start = ebr + e.startLba;
        const end = start + e.sectors;
        const what = `logical partition ${next} (EBR at sector ${ebr}, entry ${e.slot + 1}: sectors ${start}+${e.sectors})`;
        if (e.startLba === 0 || end > extEnd) {
          // Entries 3 and 4 of an EBR often hold garbage; Linux skips them when out of range.
          if (e.slot >= 2) continue;
          throw new CorruptImageError(`MBR: ${what} is not inside extended partition ${extNumber} (sectors ${extStart}-${extEnd - 1})`);
        }
        data.push({ what, start, end });
        logicals.push({ what, start, end });
        partitions.push({
          number: next,
          startBytes: start * sectorBytes,
          sizeBytes: e.sectors * sectorBytes,
          type: hex2(e.systemId),
          uuid: partUuid(mbr.diskSignature, next),
          bootable: e.bootIndicator === 0x80,
        });
        next++;
      }
      const link = decoded.entries.find((e) => e.sectors !== 0 && isExtendedType(e.systemId));
      if (!link) break;
      const linkStart = extStart + link.startLba;
      // A link to offset 0 points back at the first EBR: the visited check reports it as a loop.
      if (linkStart + link.sectors > extEnd) {
        throw new CorruptImageError(
          `MBR: the link in the EBR at sector ${ebr} (entry ${link.slot + 1}: sectors ${linkStart}+${link.sectors}) leaves extended partition ${extNumber} (sectors ${extStart}-${extEnd - 1})`,
        );
      }
      ebr = linkStart;
    }
  }
  checkNoOverlap(data);
  // A logical partition covering a later EBR would be rewritten by the filesystem inside it.
  checkNoOverlap([...logicals, ...ebrSectors]);

  return {
    scheme: 'mbr',
    sectorBytes,
    partitions,
    diskId: `0x${mbr.diskSignature.toString(16).padStart(8, '0')}`,
    warnings,
  };
}

// GPT header and partition entry decoding (UEFI 2.10 §5.3), pure: bytes in, records out.
//
// Header (at LBA 1, backup at the last LBA; all fields little-endian):
//   0x00  8    signature "EFI PART"
//   0x08  u32  revision (0x00010000)
//   0x0C  u32  header size in bytes (92 ..= logical block size)
//   0x10  u32  CRC32 of the header's first `header size` bytes, this field taken as zero
//   0x14  u32  reserved, zero
//   0x18  u64  MyLBA: the LBA holding this header
//   0x20  u64  AlternateLBA: the LBA of the other header
//   0x28  u64  FirstUsableLBA
//   0x30  u64  LastUsableLBA (inclusive)
//   0x38  16   DiskGUID
//   0x48  u64  PartitionEntryLBA: first LBA of the entry array
//   0x50  u32  NumberOfPartitionEntries
//   0x54  u32  SizeOfPartitionEntry: 128 × 2^n bytes
//   0x58  u32  PartitionEntryArrayCRC32 over NumberOfPartitionEntries × SizeOfPartitionEntry bytes
//
// Entry (SizeOfPartitionEntry bytes, only the first 128 defined):
//   0x00  16   PartitionTypeGUID (all zero: unused entry)
//   0x10  16   UniquePartitionGUID
//   0x20  u64  StartingLBA
//   0x28  u64  EndingLBA (inclusive)
//   0x30  u64  Attributes (bit 0 required, bit 1 no block IO protocol, bit 2 legacy BIOS bootable)
//   0x38  72   PartitionName, UTF-16LE, NUL-padded

import { CorruptImageError } from '../errors.js';
import { crc32 } from '../util/crc32.js';
import { formatGuid, isZeroGuid } from './guid.js';
import type { Partition } from './types.js';

export const GPT_SIGNATURE = Buffer.from('EFI PART', 'latin1');
export const GPT_HEADER_MIN_BYTES = 92;
export const GPT_ENTRY_MIN_BYTES = 128;
/** Largest entry array we read (8192 entries of 128 bytes, 64× the spec's minimum); more is hostile. */
export const GPT_MAX_ARRAY_BYTES = 1024 * 1024;
export const GPT_ATTR_LEGACY_BIOS_BOOTABLE = 1n << 2n;

export interface GptHeader {
  readonly myLba: number;
  readonly alternateLba: number;
  readonly firstUsableLba: number;
  readonly lastUsableLba: number;
  readonly diskGuid: string;
  readonly entryLba: number;
  readonly entryCount: number;
  readonly entryBytes: number;
  readonly entryArrayCrc: number;
}

export type Decoded<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly reason: string };

function u64le(buf: Buffer, pos: number): number | null {
  const hi = buf.readUInt32LE(pos + 4);
  if (hi > 0x1fffff) return null;
  return hi * 0x1_0000_0000 + buf.readUInt32LE(pos);
}

function fail<T>(reason: string): Decoded<T> {
  return { ok: false, reason };
}

/**
 * Decode and validate the header in `sector` (read from `lba`) of a device of `deviceSectors`
 * logical blocks of `sectorBytes`. Invalid headers are not errors here: the caller falls back
 * to the other copy and only then reports both reasons.
 */
export function decodeGptHeader(sector: Buffer, lba: number, sectorBytes: number, deviceSectors: number): Decoded<GptHeader> {
  if (sector.length < GPT_HEADER_MIN_BYTES) return fail('sector too short');
  if (!sector.subarray(0, 8).equals(GPT_SIGNATURE)) return fail('no "EFI PART" signature');
  const headerSize = sector.readUInt32LE(0x0c);
  // "HeaderSize ... must be greater than or equal to 92 and must be less than or equal to the logical block size."
  if (headerSize < GPT_HEADER_MIN_BYTES || headerSize > sectorBytes || headerSize > sector.length) {
    return fail(`header size ${headerSize} is outside 92..${sectorBytes}`);
  }
  const stored = sector.readUInt32LE(0x10);
  const copy = Buffer.from(sector.subarray(0, headerSize));
  copy.writeUInt32LE(0, 0x10);
  const computed = crc32(copy);
  if (computed !== stored) return fail(`header CRC32 mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`);

  const myLba = u64le(sector, 0x18);
  const alternateLba = u64le(sector, 0x20);
  const firstUsableLba = u64le(sector, 0x28);
  const lastUsableLba = u64le(sector, 0x30);
  const entryLba = u64le(sector, 0x48);
  if (myLba === null || alternateLba === null || firstUsableLba === null || lastUsableLba === null || entryLba === null) {
    return fail('an LBA field is above 2^53-1');
  }
  // "Check that the MyLBA entry points to the LBA that contains the GUID Partition Table."
  if (myLba !== lba) return fail(`MyLBA is ${myLba}, but the header was read from LBA ${lba}`);
  if (firstUsableLba > lastUsableLba + 1 || lastUsableLba >= deviceSectors) {
    return fail(`usable LBAs ${firstUsableLba}..${lastUsableLba} do not fit a ${deviceSectors}-sector device`);
  }
  if (firstUsableLba <= lba && lba <= lastUsableLba) return fail(`the header LBA ${lba} lies inside the usable area`);
  const entryCount = sector.readUInt32LE(0x50);
  const entryBytes = sector.readUInt32LE(0x54);
  // "SizeOfPartitionEntry ... must be set to a value of 128 x 2^n where n is an integer greater than or equal to zero."
  if (entryBytes < GPT_ENTRY_MIN_BYTES || entryBytes % GPT_ENTRY_MIN_BYTES !== 0 || ((entryBytes / GPT_ENTRY_MIN_BYTES) & (entryBytes / GPT_ENTRY_MIN_BYTES - 1)) !== 0) {
    return fail(`partition entry size ${entryBytes} is not 128 × 2^n`);
  }
  if (entryCount * entryBytes > GPT_MAX_ARRAY_BYTES) {
    return fail(`partition entry array of ${entryCount} × ${entryBytes} bytes exceeds the ${GPT_MAX_ARRAY_BYTES}-byte limit`);
  }
  const arraySectors = Math.ceil((entryCount * entryBytes) / sectorBytes);
  if (arraySectors > 0) {
    const arrayEnd = entryLba + arraySectors;
    if (entryLba < 1 || arrayEnd > deviceSectors) return fail(`partition entry array at LBA ${entryLba} (+${arraySectors}) lies outside the device`);
    if (entryLba <= lastUsableLba && firstUsableLba < arrayEnd) return fail(`partition entry array at LBA ${entryLba} (+${arraySectors}) overlaps the usable area`);
    if (entryLba <= lba && lba < arrayEnd) return fail(`partition entry array at LBA ${entryLba} (+${arraySectors}) overlaps the header`);
  }
  return {
    ok: true,
    value: {
      myLba,
      alternateLba,
      firstUsableLba,
      lastUsableLba,
      diskGuid: formatGuid(sector, 0x38),
      entryLba,
      entryCount,
      entryBytes,
      entryArrayCrc: sector.readUInt32LE(0x58),
    },
  };
}

/** Check the entry array against the header's CRC32. */
export function checkGptEntryArray(header: GptHeader, array: Buffer): Decoded<true> {
  const bytes = header.entryCount * header.entryBytes;
  if (array.length < bytes) return fail('partition entry array is short');
  const computed = crc32(array.subarray(0, bytes));
  if (computed !== header.entryArrayCrc) {
    return fail(`partition entry array CRC32 mismatch (stored 0x${header.entryArrayCrc.toString(16)}, computed 0x${computed.toString(16)})`);
  }
  return { ok: true, value: true };
}

/**
 * Decode the used entries of a CRC-checked array. Entries are numbered as Linux numbers them
 * (array index + 1, gaps kept); an entry outside the usable area, ending before it starts, or
 * overlapping another is a CorruptImageError naming it.
 */
export function decodeGptEntries(header: GptHeader, array: Buffer, sectorBytes: number): Partition[] {
  const out: Partition[] = [];
  const ranges: Array<{ number: number; start: number; end: number }> = [];
  for (let i = 0; i < header.entryCount; i++) {
    const p = i * header.entryBytes;
    if (isZeroGuid(array, p)) continue;
    const number = i + 1;
    const start = u64le(array, p + 0x20);
    const end = u64le(array, p + 0x28);
    if (start === null || end === null) throw new CorruptImageError(`GPT entry ${number}: an LBA is above 2^53-1`);
    if (end < start) throw new CorruptImageError(`GPT entry ${number}: ends at LBA ${end} before it starts at LBA ${start}`);
    if (start < header.firstUsableLba || end > header.lastUsableLba) {
      throw new CorruptImageError(
        `GPT entry ${number}: LBAs ${start}..${end} are outside the usable area ${header.firstUsableLba}..${header.lastUsableLba}`,
      );
    }
    const nameRaw = array.toString('utf16le', p + 0x38, p + 0x38 + 72);
    const nul = nameRaw.indexOf('\0');
    const name = nul < 0 ? nameRaw : nameRaw.slice(0, nul);
    const attributes = array.readBigUInt64LE(p + 0x30);
    ranges.push({ number, start, end: end + 1 });
    out.push({
      number,
      startBytes: start * sectorBytes,
      sizeBytes: (end + 1 - start) * sectorBytes,
      type: formatGuid(array, p),
      uuid: formatGuid(array, p + 0x10),
      name,
      attributes,
      bootable: (attributes & GPT_ATTR_LEGACY_BIOS_BOOTABLE) !== 0n,
    });
  }
  ranges.sort((a, b) => a.start - b.start);
  for (let i = 1; i < ranges.length; i++) {
    if (ranges[i].start < ranges[i - 1].end) {
      throw new CorruptImageError(`GPT entry ${ranges[i].number} overlaps GPT entry ${ranges[i - 1].number}`);
    }
  }
  return out;
}

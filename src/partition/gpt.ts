// Reading a GPT (UEFI 2.10 §5.3.2, "GPT Header" validation): the primary header at LBA 1 and
// its entry array, falling back to the backup header at the last LBA when the primary (or its
// array) fails validation, as Linux's find_valid_gpt does; using the backup is reported as a
// warning so the user knows the primary needs repair.

import type { BlockDevice } from '../block/device.js';
import { CorruptImageError } from '../errors.js';
import { checkGptEntryArray, decodeGptEntries, decodeGptHeader, type Decoded, type GptHeader } from './gpt-codec.js';
import { readRange, type PartitionTable } from './types.js';

interface ValidGpt {
  readonly header: GptHeader;
  readonly array: Buffer;
}

async function readCopy(dev: BlockDevice, lba: number, sectorBytes: number, deviceSectors: number): Promise<Decoded<ValidGpt>> {
  if (lba < 1 || lba >= deviceSectors) return { ok: false, reason: `LBA ${lba} is outside the device` };
  const sector = await readRange(dev, lba * sectorBytes, sectorBytes, 'GPT header');
  const h = decodeGptHeader(sector, lba, sectorBytes, deviceSectors);
  if (!h.ok) return h;
  // decodeGptHeader bounded the array (count × size) and placed it inside the device.
  const array = await readRange(dev, h.value.entryLba * sectorBytes, h.value.entryCount * h.value.entryBytes, 'GPT partition entry array');
  const c = checkGptEntryArray(h.value, array);
  if (!c.ok) return c;
  return { ok: true, value: { header: h.value, array } };
}

/**
 * Read the GPT of `dev` with `sectorBytes` logical blocks. Throws CorruptImageError when
 * neither copy is valid (naming both reasons) or when the chosen entries are inconsistent.
 */
export async function readGpt(dev: BlockDevice, sectorBytes: number): Promise<PartitionTable> {
  const deviceSectors = Math.floor(dev.sizeBytes / sectorBytes);
  if (deviceSectors < 3) throw new CorruptImageError(`GPT: a ${dev.sizeBytes}-byte device is too small for a GPT with ${sectorBytes}-byte sectors`);
  const warnings: string[] = [];
  const lastLba = deviceSectors - 1;
  const primary = await readCopy(dev, 1, sectorBytes, deviceSectors);
  let chosen: ValidGpt;
  if (primary.ok) {
    chosen = primary.value;
    const backupLba = primary.value.header.alternateLba;
    const backup = await readCopy(dev, backupLba, sectorBytes, deviceSectors);
    if (!backup.ok) warnings.push(`the backup GPT header at LBA ${backupLba} is invalid: ${backup.reason}`);
    else if (backupLba !== lastLba) warnings.push(`the backup GPT header is at LBA ${backupLba}, not at the last LBA ${lastLba}`);
  } else {
    // The primary's AlternateLBA cannot be trusted when its CRC is bad: look at the last LBA.
    const backup = await readCopy(dev, lastLba, sectorBytes, deviceSectors);
    if (!backup.ok) {
      throw new CorruptImageError(`GPT: no valid header: primary (LBA 1): ${primary.reason}; backup (LBA ${lastLba}): ${backup.reason}`);
    }
    chosen = backup.value;
    warnings.push(`the primary GPT header at LBA 1 is invalid (${primary.reason}); using the backup at LBA ${lastLba}`);
  }
  return {
    scheme: 'gpt',
    sectorBytes,
    partitions: decodeGptEntries(chosen.header, chosen.array, sectorBytes),
    diskId: chosen.header.diskGuid,
    warnings,
  };
}

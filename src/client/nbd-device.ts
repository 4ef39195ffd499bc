// A remote export as a BlockDevice, so copy/info/map treat nbd:// like a local image.
// Extents come from base:allocation and allocation depth from qemu:allocation-depth when
// the server offers them; methods the server cannot do are left out, as the interface
// expects, so the backend wrapper emulates or refuses them.

import type { BlockDevice, Capabilities, DepthExtent, Extent, ExtentsOptions, WriteOptions, ZeroOptions } from '../block/device.js';
import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH } from '../protocol/constants.js';
import type { BlockDescriptor } from '../protocol/transmission.js';
import { NbdClient, type NbdConnectOptions, type NbdTargetInput } from './nbd-client.js';

/** Clip descriptors to end at `end` (the server may describe more than was asked). */
function clip(descriptors: readonly BlockDescriptor[], offset: number, length: number): BlockDescriptor[] {
  const out: BlockDescriptor[] = [];
  let pos = offset;
  const end = offset + length;
  for (const d of descriptors) {
    if (pos >= end) break;
    const len = Math.min(d.length, end - pos);
    out.push({ length: len, flags: d.flags });
    pos += len;
  }
  return out;
}

export function nbdDevice(client: NbdClient): BlockDevice {
  const hasAllocation = client.metaContexts.has(BASE_ALLOCATION);
  const hasDepth = client.metaContexts.has(QEMU_ALLOCATION_DEPTH);
  const caps: Capabilities = {
    writable: client.canWrite,
    flush: client.canFlush,
    fua: client.canFua,
    trim: client.canWrite && client.canTrim,
    zero: client.canWrite && client.canZero,
    fastZero: client.canWrite && client.canFastZero,
    extents: hasAllocation,
    allocationDepth: hasDepth,
    cache: client.canCache,
    multiConn: client.canMultiConn,
    rotational: client.isRotational,
  };
  const blockSizes = { ...client.blockSizes, maximum: Math.min(client.blockSizes.maximum, 32 * 1024 * 1024) };

  async function status(name: string, offset: number, length: number, one: boolean): Promise<BlockDescriptor[]> {
    const reply = await client.blockStatus(offset, length, { reqOne: one });
    return clip(reply.get(name)!, offset, length);
  }

  const device: BlockDevice = {
    sizeBytes: client.sizeBytes,
    capabilities: () => caps,
    blockSizes: () => blockSizes,
    pread: (buf, offset) => client.pread(buf, offset),
    close: () => client.disconnect(),
  };
  const d = device as { -readonly [K in keyof BlockDevice]: BlockDevice[K] };
  if (caps.writable) d.pwrite = (buf: Buffer, offset: number, opts?: WriteOptions) => client.pwrite(buf, offset, { fua: opts?.fua === true });
  if (caps.flush) d.flush = () => client.flush();
  if (caps.trim) d.trim = (offset: number, length: number, opts?: WriteOptions) => client.trim(offset, length, { fua: opts?.fua === true });
  if (caps.zero) {
    d.zero = (offset: number, length: number, opts?: ZeroOptions) =>
      client.zero(offset, length, { fua: opts?.fua === true, noHole: opts?.mayTrim !== true, fast: opts?.fast === true });
  }
  if (caps.cache) d.cache = (offset: number, length: number) => client.cache(offset, length);
  if (hasAllocation) {
    d.extents = async (offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> => status(BASE_ALLOCATION, offset, length, opts?.one === true);
  }
  if (hasDepth) {
    d.allocationDepth = async (offset: number, length: number): Promise<DepthExtent[]> =>
      (await status(QEMU_ALLOCATION_DEPTH, offset, length, false)).map((x) => ({ length: x.length, depth: x.flags }));
  }
  return device;
}

/** Connect to an export and present it as a BlockDevice (close() disconnects). */
export async function openNbdDevice(target: NbdTargetInput, opts: NbdConnectOptions = {}): Promise<BlockDevice> {
  const client = await NbdClient.connect(target, { metaContexts: [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH], ...opts });
  return nbdDevice(client);
}

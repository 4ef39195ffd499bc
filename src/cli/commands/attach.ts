// imgbd attach IMAGE[:N | :name=LABEL]: the image as /dev/nbdN, served by a supervisor that
// outlives this command. Prints the device (or JSON) once it is usable.

import type { Command } from 'commander';
import { parseImageSpec } from '../../container/spec.js';
import { UsageError } from '../../errors.js';
import { attachImage } from '../../kernel/attach.js';
import type { InterfaceChoice } from '../../kernel/attach-link.js';
import { parseCount } from '../parse.js';
import { MAX_POLL_US } from '../../server/idle-poller.js';

function parseInterface(v: unknown): InterfaceChoice {
  if (v === undefined) return 'auto';
  if (v === 'auto' || v === 'netlink' || v === 'ioctl') return v;
  throw new UsageError(`--interface must be auto, netlink or ioctl, not ${String(v)}`);
}

export async function run(args: string[], opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  const spec = parseImageSpec(args[0] ?? '');
  if (opts.options !== undefined && opts.mount === undefined) throw new UsageError('-o/--options needs --mount DIR');
  const info = await attachImage({
    image: spec.image,
    ...(spec.partition !== undefined && { partition: spec.partition }),
    ...(typeof opts.format === 'string' && { format: opts.format }),
    readOnly: opts.readOnly === true,
    ...(Array.isArray(opts.allowBacking) && { allowBacking: opts.allowBacking as string[] }),
    ...(typeof opts.mount === 'string' && { mount: { dir: opts.mount, ...(typeof opts.options === 'string' && { options: opts.options }) } }),
    connections: parseCount(String(opts.connections ?? '1'), '--connections', 1, 16),
    timeoutSeconds: parseCount(String(opts.timeout ?? '30'), '--timeout', 1, 3600),
    ...(opts.watchPid !== undefined && { watchPid: parseCount(String(opts.watchPid), '--watch-pid', 1) }),
    ...(opts.pollMaxUs !== undefined && { pollMaxUs: parseCount(String(opts.pollMaxUs), '--poll-max-us', 0, MAX_POLL_US) }),
    interface: parseInterface(opts.interface ?? process.env.IMGBD_NBD_INTERFACE),
  });
  if (opts.json) {
    process.stdout.write(
      `${JSON.stringify({
        device: info.device,
        index: info.index,
        image: info.image,
        format: info.format,
        partition: info.partition,
        supervisorPid: info.supervisorPid,
        mountpoint: info.mountpoint,
        fstype: info.fstype,
        partitions: info.partitions,
        sizeBytes: info.sizeBytes,
        connections: info.connections,
        interface: info.interface,
        log: info.log,
      })}\n`,
    );
  } else {
    process.stdout.write(`${info.device}\n`);
  }
  return 0;
}

// imgbd run [options] nbd:IMAGE[:PART] [--] CMD [ARGS...]: CMD in new namespaces with the
// image as its root; exits with CMD's status. Nothing is written to stdout: it belongs to CMD.

import type { Command } from 'commander';
import { runContainer } from '../../container/run.js';
import { parseNbdRootSpec } from '../../container/spec.js';
import { UsageError } from '../../errors.js';
import type { InterfaceChoice } from '../../kernel/attach-link.js';

function parseInterface(v: unknown): InterfaceChoice | undefined {
  if (v === undefined) return undefined;
  if (v === 'auto' || v === 'netlink' || v === 'ioctl') return v;
  throw new UsageError(`--interface must be auto, netlink or ioctl, not ${String(v)}`);
}

export async function run(args: string[], opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  const [rootfs, ...rest] = args;
  // Options stop at ROOTFS, so a `--` after it is only a separator that commander passes on.
  const argv = rest[0] === '--' ? rest.slice(1) : rest;
  const spec = parseNbdRootSpec(rootfs ?? '');
  const iface = parseInterface(opts.interface ?? process.env.IMGBD_NBD_INTERFACE);
  const r = await runContainer({
    spec,
    argv,
    readWrite: opts.rw === true,
    ...(typeof opts.format === 'string' && { format: opts.format }),
    ...(Array.isArray(opts.allowBacking) && { allowBacking: opts.allowBacking as string[] }),
    ...(typeof opts.options === 'string' && { mountOptions: opts.options }),
    ...(Array.isArray(opts.env) && { env: opts.env as string[] }),
    ...(typeof opts.workdir === 'string' && { cwd: opts.workdir }),
    ...(typeof opts.hostname === 'string' && { hostname: opts.hostname }),
    ...(iface !== undefined && { interface: iface }),
  });
  if (r.startFailure) process.stderr.write(`imgbd run: ${r.startFailure.message}\n`);
  return r.status;
}

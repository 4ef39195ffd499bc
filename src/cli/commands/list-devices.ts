// imgbd list (no URI): the devices imgbd attached, with their supervisor's state, partitions
// and mounts.

import type { Command } from 'commander';
import { listAttached } from '../../kernel/attach-list.js';
import { runDir } from '../../kernel/state.js';

export async function run(_args: string[], opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  const { devices, errors } = listAttached(runDir());
  for (const e of errors) process.stderr.write(`imgbd: ${e.message}\n`);
  if (opts.json) {
    const out = devices.map((d) => ({
      device: d.state.device,
      index: d.state.index,
      image: d.state.image,
      format: d.state.format,
      partition: d.state.partition,
      readOnly: d.state.readOnly,
      supervisorPid: d.state.pid,
      supervisorAlive: d.supervisorAlive,
      connected: d.connected,
      partitions: d.partitions,
      mountpoint: d.state.mountpoint,
      mounts: d.mounts,
      connections: d.state.connections,
      interface: d.state.interface,
      created: d.state.created,
      log: d.state.log,
    }));
    process.stdout.write(`${JSON.stringify(out)}\n`);
    return 0;
  }
  if (devices.length === 0) return 0;
  const rows = [['DEVICE', 'IMAGE', 'FORMAT', 'SUPERVISOR', 'PARTITIONS', 'MOUNTS']];
  for (const d of devices) {
    const part = d.state.partition === null ? '' : typeof d.state.partition === 'number' ? `:${d.state.partition}` : `:name=${d.state.partition.name}`;
    rows.push([
      d.state.device,
      `${d.state.image}${part}`,
      d.state.format,
      `${d.state.pid} ${d.supervisorAlive ? 'alive' : 'dead'}`,
      d.partitions.map((p) => p.replace('/dev/', '')).join(',') || '-',
      d.mounts.map((m) => `${m.device}:${m.mountPoint}`).join(',') || '-',
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) process.stdout.write(`${r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')}\n`);
  return 0;
}

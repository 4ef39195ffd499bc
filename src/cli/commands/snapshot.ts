// imgbd snapshot: qemu-img snapshot's -c/-a/-d/-l on qcow2 internal snapshots.

import { UsageError } from '../../errors.js';
import { probeFormat, readProbeHead } from '../../formats/probe.js';
import { openQcow2Path, type Qcow2Device } from '../../formats/qcow2/index.js';

interface SnapshotOptions {
  create?: string;
  apply?: string;
  delete?: string;
  list?: boolean;
  format?: string;
  json?: boolean;
}

function listText(dev: Qcow2Device): string {
  if (dev.snapshots.length === 0) return '';
  const lines = ['Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of dev.snapshots) {
    const date = new Date(s.dateSec * 1000).toISOString().replace('T', ' ').slice(0, 19);
    const clock = Number(s.vmClockNsec / 1_000_000n);
    const hms = `${String(Math.floor(clock / 3_600_000)).padStart(2, '0')}:${String(Math.floor(clock / 60_000) % 60).padStart(2, '0')}:${String(Math.floor(clock / 1000) % 60).padStart(2, '0')}.${String(clock % 1000).padStart(3, '0')}`;
    lines.push(`${s.id.padEnd(10)}${s.name.padEnd(18)}${`${s.vmStateSize} B`.padStart(7)} ${date} ${hms}${(s.icount !== null && s.icount >= 0n ? String(s.icount) : '').padStart(11)}`);
  }
  return `${lines.join('\n')}\n`;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as SnapshotOptions;
  const file = args[0]!;
  const chosen = [o.create !== undefined, o.apply !== undefined, o.delete !== undefined, o.list === true].filter(Boolean).length;
  if (chosen !== 1) throw new UsageError('give exactly one of -c NAME (create), -a NAME (apply), -d NAME (delete) or -l (list)');
  const format = o.format ?? probeFormat(await readProbeHead(file));
  if (format !== 'qcow2') throw new UsageError(`${file} is ${format}: internal snapshots exist only in qcow2 images (convert it, or use 'imgbd clone' for an overlay)`);
  // Snapshots live in this image's own tables; the backing file is not needed.
  const dev = await openQcow2Path(file, { readOnly: o.list === true, ignoreBacking: true });
  try {
    if (o.list) {
      if (o.json) {
        const { describeQcow2 } = await import('../../formats/qcow2/index.js');
        process.stdout.write(`${JSON.stringify(describeQcow2(dev.header, dev.snapshots).snapshots, null, 4)}\n`);
      } else {
        process.stdout.write(listText(dev));
      }
    } else if (o.create !== undefined) {
      if (o.create === '') throw new UsageError('a snapshot needs a non-empty name');
      if (dev.snapshots.some((s) => s.name === o.create)) throw new UsageError(`a snapshot named ${JSON.stringify(o.create)} already exists: pick another name or delete it with -d`);
      await dev.createSnapshot(o.create);
    } else if (o.apply !== undefined) {
      await dev.applySnapshot(o.apply);
    } else {
      await dev.deleteSnapshot(o.delete!);
    }
    await dev.flush();
  } finally {
    await dev.close();
  }
  return 0;
}

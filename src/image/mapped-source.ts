// A copy's source bytes straight from the page cache: where the source device stores a range
// as is in a host file (BlockDevice.hostRun: raw images, plain qcow2 data clusters) and those
// pages are cached, the range is mapped rather than read, and the target's write copies from
// the page cache itself (see sys/mmap.ts).

import type { BlockDevice } from '../block/device.js';
import { MappedFile, type MappedView } from '../sys/mmap.js';

/** Guest bytes from `offset` on, as a view of the file that holds them. */
export interface MappedPiece {
  readonly offset: number;
  readonly view: MappedView;
}

/** The mapped host files of one copy, by descriptor. */
export class SourceMappings {
  private readonly files = new Map<number, MappedFile>();

  /**
   * [offset, offset+length) of `src` as views, in order and covering it, or null when any of it
   * is not plain cached host data (read it instead). Release the pieces once nothing uses them.
   */
  map(src: BlockDevice, offset: number, length: number): MappedPiece[] | null {
    if (src.hostRun === undefined) return null;
    const pieces: MappedPiece[] = [];
    for (let done = 0; done < length; ) {
      const run = src.hostRun(offset + done, length - done);
      const view = run === null ? null : this.file(run.fd).view(run.offset, run.length);
      if (view === null) {
        releasePieces(pieces);
        return null;
      }
      pieces.push({ offset: offset + done, view });
      done += view.buf.length;
    }
    return pieces;
  }

  /** Unmap everything: every piece must have been released. */
  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }

  private file(fd: number): MappedFile {
    let f = this.files.get(fd);
    if (f === undefined) this.files.set(fd, (f = new MappedFile(fd)));
    return f;
  }
}

export function releasePieces(pieces: readonly MappedPiece[]): void {
  for (const p of pieces) p.view.release();
}

// Incremental parser of the client→server byte stream, both phases (nbd-proto.md
// "Fixed newstyle negotiation" and "Request message"). Pure: bytes are pushed in arbitrary
// chunks, messages are pulled out one at a time with next(). Pulling (rather than emitting
// everything that is buffered) lets the consumer switch phase exactly between two messages:
// after NBD_OPT_GO is acknowledged the next bytes are requests, after NBD_OPT_STARTTLS they
// are TLS records that must not be parsed at all.
//
// Limits are enforced before anything is buffered for a message: option data above
// `maxOptionBytes` is skipped as it arrives (the consumer answers NBD_REP_ERR_TOO_BIG), a
// write payload above `maxPayloadBytes` is drained up to `maxDrainBytes` so the stream stays
// in sync, and anything larger than that breaks the connection.

import { ProtocolError } from '../errors.js';
import { ChunkQueue } from './chunk-queue.js';
import { NBD_CMD, NBD_REQUEST_MAGIC, OPTION_HEADER_SIZE, REQUEST_SIZE } from './constants.js';
import { decodeOptionHeader } from './handshake.js';
import { decodeRequest } from './transmission.js';

export type ParserPhase = 'client-flags' | 'options' | 'transmission';

export type ClientMessage =
  | { readonly kind: 'client-flags'; readonly flags: number }
  /** An option whose data fit the limit; `data` may be a view into pushed chunks. */
  | { readonly kind: 'option'; readonly option: number; readonly data: Buffer }
  /** An option whose data exceeded the limit; the data is being skipped. */
  | { readonly kind: 'option-too-big'; readonly option: number; readonly length: number }
  | {
      readonly kind: 'request';
      readonly flags: number;
      readonly type: number;
      readonly cookie: bigint;
      readonly offset: number;
      readonly length: number;
      /** NBD_CMD_WRITE payload, present unless `oversized`. */
      readonly payload: Buffer | undefined;
      /** The buffer from `allocPayload` that holds `payload`, to give back once written. */
      readonly payloadOwner?: Buffer;
      /** A write longer than maxPayloadBytes: its payload is drained, never buffered. */
      readonly oversized: boolean;
      /**
       * A write whose payload the consumer takes from the stream itself (see `takePayload`):
       * these are its first bytes, already read; the rest follows in the stream, unparsed.
       */
      readonly taken?: Buffer;
    };

export type RequestMessage = Extract<ClientMessage, { kind: 'request' }>;

export interface RequestParserLimits {
  /** Largest option data kept; larger data is skipped. */
  readonly maxOptionBytes: number;
  /** Largest write payload accepted. */
  readonly maxPayloadBytes: number;
  /** Largest oversized write payload that is drained rather than dropping the connection. */
  readonly maxDrainBytes: number;
  /**
   * Where a payload that straddles chunks is assembled: a reusable buffer of at least the
   * given size. Without it, a fresh buffer each time (whose pages the kernel must fault in).
   */
  readonly allocPayload?: (length: number) => Buffer;
  /**
   * Write payloads at least this long (with `allocPayload`) are filled in place: their buffer
   * is taken when the header is parsed and what arrives is copied, or read (fillTarget), into
   * it directly. Default: never.
   */
  readonly fillInPlaceMinBytes?: number;
  /**
   * Asked of each write whose payload has not all arrived: true when the consumer reads the
   * rest of that payload from the stream itself (splicing it to a file), before it pushes
   * anything more. The write is returned at once, with `taken` set.
   */
  readonly takePayload?: (offset: number, length: number, flags: number) => boolean;
}

export const DEFAULT_PARSER_LIMITS: RequestParserLimits = {
  maxOptionBytes: 64 * 1024,
  maxPayloadBytes: 32 * 1024 * 1024,
  maxDrainBytes: 64 * 1024 * 1024,
};

const EMPTY = Buffer.alloc(0);

export class RequestParser {
  private readonly queue = new ChunkQueue();
  private phaseValue: ParserPhase;
  private readonly limits: RequestParserLimits;
  /** Bytes still to drop (oversized option data or write payload). */
  private skipping = 0;
  /** Option header seen, waiting for its data. */
  private pendingOption: { option: number; length: number } | null = null;
  /** Write request header seen, waiting for its payload. */
  private pendingWrite: RequestMessage | null = null;
  /** The payload of pendingWrite being filled in place, and how much of it has arrived. */
  private fill: { owner: Buffer; payload: Buffer; at: number } | null = null;
  /**
   * Write payloads handed out as views into pushed chunks and not given back (returnView):
   * while it is unchanged and nothing is buffered, no chunk pushed before is referenced any
   * more and its memory may be reused for the next read.
   */
  viewsOut = 0;
  /** The last message was a large write (filled in place or taken): the stream is probably one of them. */
  private lastFilled = false;

  constructor(phase: ParserPhase = 'client-flags', limits: Partial<RequestParserLimits> = {}) {
    this.phaseValue = phase;
    this.limits = { ...DEFAULT_PARSER_LIMITS, ...limits };
  }

  get phase(): ParserPhase {
    return this.phaseValue;
  }

  /** Bytes pushed but not yet returned or skipped. */
  get buffered(): number {
    return this.queue.length;
  }

  /** True when no message is partially parsed and nothing is buffered. */
  get idle(): boolean {
    return this.queue.length === 0 && this.skipping === 0 && this.pendingOption === null && this.pendingWrite === null;
  }

  push(chunk: Buffer): void {
    const f = this.fill;
    if (f !== null && f.at < f.payload.length) {
      const take = Math.min(chunk.length, f.payload.length - f.at);
      chunk.copy(f.payload, f.at, 0, take);
      f.at += take;
      chunk = chunk.subarray(take);
    }
    this.queue.push(chunk);
  }

  /**
   * Where the next bytes of the stream belong when they are the rest of a payload being filled
   * in place: the caller may read the socket straight into it, then call filled(). Null otherwise.
   */
  fillTarget(): Buffer | null {
    const f = this.fill;
    return f !== null && f.at < f.payload.length ? f.payload.subarray(f.at) : null;
  }

  /** `n` bytes were read into the buffer fillTarget() returned. */
  filled(n: number): void {
    const f = this.fill;
    if (f === null || f.at + n > f.payload.length) throw new RangeError('filled() beyond the payload being filled');
    f.at += n;
  }

  /**
   * How much to read next when not filling: after a large write, the next message is likely
   * another one, and reading just its header lets the payload after it be read in place.
   */
  nextReadBytes(defaultBytes: number): number {
    return this.lastFilled && this.queue.length === 0 ? REQUEST_SIZE : defaultBytes;
  }

  /** Switch to option haggling (after the client flags; again after STARTTLS on the new stream). */
  enterOptions(): void {
    this.assertBoundary();
    this.phaseValue = 'options';
  }

  /** Switch to transmission (after NBD_OPT_EXPORT_NAME or an acknowledged NBD_OPT_GO). */
  enterTransmission(): void {
    this.assertBoundary();
    this.phaseValue = 'transmission';
  }

  /** Remove and return everything buffered, at a message boundary: the stream goes on elsewhere. */
  takeBuffered(): Buffer {
    this.assertBoundary();
    return Buffer.from(this.queue.consume(this.queue.length));
  }

  /** Drop everything buffered: the byte stream is being replaced (STARTTLS). */
  reset(phase: ParserPhase): void {
    this.queue.clear();
    this.skipping = 0;
    this.pendingOption = null;
    this.pendingWrite = null;
    this.fill = null;
    this.phaseValue = phase;
  }

  /** The next complete message, or null when more bytes are needed. Throws ProtocolError on broken framing. */
  next(): ClientMessage | null {
    if (this.skipping > 0) {
      this.skipping -= this.queue.skip(this.skipping);
      if (this.skipping > 0) return null;
    }
    switch (this.phaseValue) {
      case 'client-flags':
        return this.nextClientFlags();
      case 'options':
        return this.nextOption();
      case 'transmission':
        return this.nextRequest();
    }
  }

  private nextClientFlags(): ClientMessage | null {
    if (this.queue.length < 4) return null;
    const flags = this.queue.consume(4).readUInt32BE(0);
    // The client flags are followed by options; the consumer decides whether to carry on.
    this.phaseValue = 'options';
    return { kind: 'client-flags', flags };
  }

  private nextOption(): ClientMessage | null {
    let pending = this.pendingOption;
    if (pending === null) {
      if (this.queue.length < OPTION_HEADER_SIZE) return null;
      const header = decodeOptionHeader(this.queue.consume(OPTION_HEADER_SIZE));
      if (header.length > this.limits.maxOptionBytes) {
        // Refuse before buffering: the data is dropped as it arrives.
        this.skipping = header.length - this.queue.skip(header.length);
        return { kind: 'option-too-big', option: header.option, length: header.length };
      }
      pending = { option: header.option, length: header.length };
      this.pendingOption = pending;
    }
    if (this.queue.length < pending.length) return null;
    this.pendingOption = null;
    const data = pending.length === 0 ? EMPTY : this.queue.consume(pending.length);
    return { kind: 'option', option: pending.option, data };
  }

  private nextRequest(): ClientMessage | null {
    let pending = this.pendingWrite;
    if (pending === null) {
      if (this.queue.length < REQUEST_SIZE) {
        // A wrong magic is known after 4 bytes: do not wait for a request that is not coming
        // (an option sent after NBD_OPT_GO is only 16 bytes long).
        if (this.queue.length >= 4) {
          const magic = this.queue.peekU32(0);
          if (magic !== NBD_REQUEST_MAGIC) throw new ProtocolError('ERR_NBD_BAD_MAGIC', `bad request magic 0x${magic.toString(16)}`);
        }
        return null;
      }
      const req = decodeRequest(this.queue.consume(REQUEST_SIZE));
      this.lastFilled = false;
      if (req.type !== NBD_CMD.WRITE || req.length === 0) {
        return { kind: 'request', ...req, payload: req.type === NBD_CMD.WRITE ? EMPTY : undefined, oversized: false };
      }
      if (req.length > this.limits.maxPayloadBytes) {
        // "the server MAY initiate a hard disconnect if a payload length ... would be large
        // enough to be deemed a denial of service attack"; below that, drain and refuse.
        if (req.length > this.limits.maxDrainBytes) {
          throw new ProtocolError('ERR_NBD_PAYLOAD_TOO_BIG', `write of ${req.length} bytes is beyond any acceptable payload`);
        }
        this.skipping = req.length - this.queue.skip(req.length);
        return { kind: 'request', ...req, payload: undefined, oversized: true };
      }
      const take = this.limits.takePayload;
      if (take !== undefined && this.queue.length < req.length && take(req.offset, req.length, req.flags)) {
        const taken = this.queue.length === 0 ? EMPTY : this.queue.consume(this.queue.length);
        // Only a view into a read buffer keeps it from being reused (the usual case, a header
        // read alone, hands out none).
        if (taken.length > 0) this.viewsOut++;
        this.lastFilled = true;
        return { kind: 'request', ...req, payload: undefined, oversized: false, taken };
      }
      pending = { kind: 'request', ...req, payload: undefined, oversized: false };
      this.pendingWrite = pending;
      this.startFill(pending.length);
    }
    const f = this.fill;
    if (f !== null) {
      if (f.at < f.payload.length) return null;
      this.fill = null;
      this.pendingWrite = null;
      this.lastFilled = true;
      return { ...pending, payload: f.payload, payloadOwner: f.owner };
    }
    if (this.queue.length < pending.length) return null;
    this.pendingWrite = null;
    const alloc = this.limits.allocPayload;
    if (alloc === undefined || this.queue.contiguous(pending.length)) {
      this.viewsOut++;
      return { ...pending, payload: this.queue.consume(pending.length) };
    }
    const owner = alloc(pending.length);
    const payload = owner.subarray(owner.length - pending.length);
    this.queue.copyOut(payload, 0, pending.length);
    return { ...pending, payload, payloadOwner: owner };
  }

  /** The payload last handed out as a view (no payloadOwner) is no longer referenced. */
  returnView(): void {
    this.viewsOut--;
  }

  private startFill(length: number): void {
    const alloc = this.limits.allocPayload;
    if (alloc === undefined || length < (this.limits.fillInPlaceMinBytes ?? Infinity) || this.queue.length >= length) return;
    const owner = alloc(length);
    const payload = owner.subarray(owner.length - length);
    const at = this.queue.length;
    this.queue.copyOut(payload, 0, at);
    this.fill = { owner, payload, at };
  }

  private assertBoundary(): void {
    if (this.skipping > 0 || this.pendingOption !== null || this.pendingWrite !== null || this.fill !== null) {
      throw new ProtocolError('ERR_NBD_PHASE', 'phase change in the middle of a message');
    }
  }
}

// One socket plus its reply parser. During the handshake replies are pulled one at a time
// with next(); in transmission a handler takes them as they arrive. Any parse error or
// socket failure is terminal and reported once.

import type { Socket } from 'node:net';
import { ProtocolError } from '../errors.js';
import { ReplyParser, type ReplyEvent } from '../protocol/reply-parser.js';

export interface WireHandler {
  onEvent(ev: ReplyEvent): void;
  onFail(err: Error): void;
}

export class Wire {
  readonly socket: Socket;
  readonly parser: ReplyParser;
  private readonly queue: ReplyEvent[] = [];
  private waiter: { resolve: (ev: ReplyEvent) => void; reject: (err: Error) => void } | null = null;
  private handler: WireHandler | null = null;
  private failure: Error | null = null;
  private readonly onDataFn: (chunk: Buffer) => void;
  private readonly onEndFn: () => void;
  private readonly onErrorFn: (err: Error) => void;

  constructor(socket: Socket, parser: ReplyParser) {
    this.socket = socket;
    this.parser = parser;
    this.onDataFn = (chunk) => this.onData(chunk);
    this.onEndFn = () => this.fail(new ProtocolError('ERR_NBD_CLOSED', 'the server closed the connection'));
    this.onErrorFn = (err) => this.fail(new ProtocolError('ERR_NBD_CONNECTION', `connection failed: ${err.message}`, { cause: err }));
    socket.on('data', this.onDataFn).on('end', this.onEndFn).on('close', this.onEndFn).on('error', this.onErrorFn);
  }

  get failed(): Error | null {
    return this.failure;
  }

  /** The next reply during the handshake. */
  next(): Promise<ReplyEvent> {
    const ev = this.queue.shift();
    if (ev !== undefined) return Promise.resolve(ev);
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('Wire.next() called twice concurrently'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** Hand every further reply to `handler` (transmission phase). */
  setHandler(handler: WireHandler): void {
    this.handler = handler;
    for (let ev = this.queue.shift(); ev !== undefined; ev = this.queue.shift()) handler.onEvent(ev);
    if (this.failure) handler.onFail(this.failure);
  }

  /** Header and payload leave in one corked write, without concatenating them. */
  write(header: Buffer, payload?: Buffer): boolean {
    if (payload === undefined || payload.length === 0) return this.socket.write(header);
    this.socket.cork();
    this.socket.write(header);
    const ok = this.socket.write(payload);
    this.socket.uncork();
    return ok;
  }

  /** Stop listening (before the socket is wrapped in TLS); returns the bare socket. */
  detach(): Socket {
    this.socket.off('data', this.onDataFn).off('end', this.onEndFn).off('close', this.onEndFn).off('error', this.onErrorFn);
    return this.socket;
  }

  /** Fail with `err` and drop the connection (a hard disconnect). */
  abort(err: Error): void {
    this.fail(err);
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    if (this.failure) return;
    let events: ReplyEvent[];
    try {
      events = this.parser.push(chunk);
    } catch (err) {
      this.abort(err instanceof ProtocolError ? err : new ProtocolError('ERR_NBD_PROTOCOL', String(err), { cause: err }));
      return;
    }
    for (const ev of events) {
      if (this.handler) {
        this.handler.onEvent(ev);
      } else if (this.waiter) {
        const w = this.waiter;
        this.waiter = null;
        w.resolve(ev);
      } else {
        this.queue.push(ev);
      }
      if (this.failure) return;
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
    this.handler?.onFail(err);
  }
}

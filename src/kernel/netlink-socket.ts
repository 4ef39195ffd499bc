// A netlink socket speaking request/ACK with the kernel: one request in flight at a time,
// replies matched by sequence number, NLMSG_ERROR turned into NetlinkError with the errno
// (and the kernel's extended-ack text when it gave one).

import { ImgbdError } from '../errors.js';
import { SyscallError } from '../sys/errno.js';
import {
  AF_NETLINK,
  bindNetlink,
  closeFd,
  NETLINK_CAP_ACK,
  NETLINK_EXT_ACK,
  openSocket,
  recvDatagram,
  sendToKernel,
  setSockOptInt,
  SOCK_CLOEXEC,
  SOCK_RAW,
  SOL_NETLINK,
  waitReadable,
} from '../sys/socket.js';
import { decodeNlMsgErr, decodeNlMsgs, encodeNlMsg, NetlinkProtocolError, NLM_F, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, type NlMsg } from './netlink-codec.js';

/** The kernel refused a netlink request; `code` is the errno name ('ENOENT', 'EBUSY', ...). */
export class NetlinkError extends SyscallError {
  /** The kernel's extended-ack explanation, when it gave one. */
  readonly extAck: string | undefined;

  constructor(what: string, errno: number, extAck?: string) {
    super(what, errno);
    this.extAck = extAck;
    if (extAck) this.message += `: ${extAck}`;
  }
}

export class NetlinkTimeoutError extends ImgbdError {
  constructor(what: string, timeoutMs: number) {
    super('ERR_NETLINK_TIMEOUT', `${what}: no reply from the kernel within ${timeoutMs} ms`);
  }
}

const RECV_BUFFER_BYTES = 64 * 1024;
const DEFAULT_TIMEOUT_MS = 30_000;
const POLL_SLICE_MS = 250;

export interface NetlinkRequestOptions {
  /** Names the request in errors, e.g. "NBD_CMD_CONNECT". */
  readonly what: string;
  /** A dump: replies end with NLMSG_DONE instead of the ACK. */
  readonly dump?: boolean;
  readonly timeoutMs?: number;
}

export class NetlinkSocket {
  private readonly fd: number;
  private readonly recvBuf = Buffer.alloc(RECV_BUFFER_BYTES);
  private seq = Math.floor(Math.random() * 0x7fffffff);
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(fd: number) {
    this.fd = fd;
  }

  static open(protocol: number): NetlinkSocket {
    const fd = openSocket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol);
    try {
      bindNetlink(fd);
      // Optional extras (kernel 4.12+): error text, and errors without the echoed request.
      for (const opt of [NETLINK_EXT_ACK, NETLINK_CAP_ACK]) {
        try {
          setSockOptInt(fd, SOL_NETLINK, opt, 1);
        } catch {
          // Older kernels: plain errno only.
        }
      }
    } catch (err) {
      closeFd(fd);
      throw err;
    }
    return new NetlinkSocket(fd);
  }

  /**
   * Send one message (flags gain REQUEST and ACK, and DUMP for a dump) and collect the replies carrying its
   * sequence number, up to the ACK (or NLMSG_DONE for a dump). Requests are serialized.
   */
  request(type: number, flags: number, payload: readonly Uint8Array[], opts: NetlinkRequestOptions): Promise<NlMsg[]> {
    const run = this.queue.then(() => this.exchange(type, flags, payload, opts));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async exchange(type: number, flags: number, payload: readonly Uint8Array[], opts: NetlinkRequestOptions): Promise<NlMsg[]> {
    if (this.closed) throw new ImgbdError('ERR_NETLINK_CLOSED', `${opts.what}: netlink socket is closed`);
    this.seq = (this.seq + 1) >>> 0;
    const seq = this.seq;
    const allFlags = flags | NLM_F.REQUEST | NLM_F.ACK | (opts.dump ? NLM_F.DUMP : 0);
    await sendToKernel(this.fd, encodeNlMsg({ type, flags: allFlags, seq, pid: 0 }, payload));
    if (this.closed) throw new ImgbdError('ERR_NETLINK_CLOSED', `${opts.what}: netlink socket closed while sending`);
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const replies: NlMsg[] = [];
    for (;;) {
      const n = recvDatagram(this.fd, this.recvBuf);
      if (n === null) {
        const left = deadline - Date.now();
        if (left <= 0) throw new NetlinkTimeoutError(opts.what, timeoutMs);
        // In slices, so that close() ends a wait promptly (closing an fd wakes no poller).
        await waitReadable(this.fd, Math.min(left, POLL_SLICE_MS));
        // The fd number may have been reused after close(): never touch it again.
        if (this.closed) throw new ImgbdError('ERR_NETLINK_CLOSED', `${opts.what}: netlink socket closed while waiting`);
        continue;
      }
      if (n > this.recvBuf.length) throw new NetlinkProtocolError(`${opts.what}: reply of ${n} bytes exceeds the ${this.recvBuf.length}-byte buffer`);
      // Copy out: the receive buffer is reused for the next datagram.
      for (const msg of decodeNlMsgs(Buffer.from(this.recvBuf.subarray(0, n)))) {
        // Stale replies to an earlier request that timed out carry an older sequence number.
        if (msg.seq !== seq) continue;
        if (msg.type === NLMSG_NOOP) continue;
        if (msg.type === NLMSG_ERROR) {
          const e = decodeNlMsgErr(msg.payload, msg.flags);
          if (e.errno !== 0) throw new NetlinkError(opts.what, e.errno, e.message);
          return replies;
        }
        if (msg.type === NLMSG_DONE && opts.dump) return replies;
        if (msg.type !== NLMSG_DONE) replies.push(msg);
      }
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeFd(this.fd);
  }
}

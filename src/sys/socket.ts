// Socket syscalls Node does not expose, through koffi: netlink sockets (socket(2) with
// AF_NETLINK, bind(2) to a sockaddr_nl, sendto(2)/recv(2) of whole datagrams) and
// socketpair(2) for handing one end of a stream to the kernel.
//
// Nothing blocks the main thread: sendto(2) and waiting poll(2)s run on the libuv thread pool,
// then recv runs on the main thread with MSG_DONTWAIT; a poll(2) that does not wait runs inline.
//
// struct sockaddr_nl (12 bytes, host order)
//   0  u16 nl_family (AF_NETLINK)   2  u16 nl_pad   4  u32 nl_pid (0 = kernel)   8  u32 nl_groups

import koffi from 'koffi';
import { endianness } from 'node:os';
import { SyscallError } from './errno.js';

export const AF_UNIX = 1;
export const AF_NETLINK = 16;
export const SOCK_STREAM = 1;
export const SOCK_RAW = 3;
export const SOCK_CLOEXEC = 0o2000000;
export const NETLINK_GENERIC = 16;
export const SOL_NETLINK = 270;
export const NETLINK_CAP_ACK = 10;
export const NETLINK_EXT_ACK = 11;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
const POLLIN = 0x1;
const EAGAIN = 11;
const EINTR = 4;

type SyncFn = (...args: unknown[]) => number;
type AsyncFn = { async: (...args: unknown[]) => void };

interface Bindings {
  socket: SyncFn;
  socketpair: SyncFn;
  bind: SyncFn;
  sendto: AsyncFn;
  recv: SyncFn;
  setsockopt: SyncFn;
  poll: SyncFn & AsyncFn;
  close: SyncFn;
}

let bindings: Bindings | undefined;

function lib(): Bindings {
  if (!bindings) {
    const c = koffi.load('libc.so.6');
    const f = (sig: string) => c.func(sig) as unknown as SyncFn & AsyncFn;
    bindings = {
      socket: f('int socket(int domain, int type, int protocol)'),
      socketpair: f('int socketpair(int domain, int type, int protocol, void *sv)'),
      bind: f('int bind(int fd, const void *addr, uint32_t addrlen)'),
      sendto: f('intptr_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)'),
      recv: f('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
      setsockopt: f('int setsockopt(int fd, int level, int name, const void *value, uint32_t len)'),
      poll: f('int poll(void *fds, unsigned long nfds, int timeout)'),
      close: f('int close(int fd)'),
    };
  }
  return bindings;
}

function check(r: number, syscall: string): number {
  if (r < 0) throw new SyscallError(syscall, koffi.errno());
  return r;
}

function sockaddrNl(pid: number, groups: number): Buffer {
  const b = Buffer.alloc(12);
  const le = endianness() === 'LE';
  if (le) {
    b.writeUInt16LE(AF_NETLINK, 0);
    b.writeUInt32LE(pid >>> 0, 4);
    b.writeUInt32LE(groups >>> 0, 8);
  } else {
    b.writeUInt16BE(AF_NETLINK, 0);
    b.writeUInt32BE(pid >>> 0, 4);
    b.writeUInt32BE(groups >>> 0, 8);
  }
  return b;
}

/** socket(2); add SOCK_CLOEXEC to `type` so children never inherit it. */
export function openSocket(domain: number, type: number, protocol: number): number {
  return check(lib().socket(domain, type, protocol), 'socket');
}

/**
 * socketpair(2), close-on-exec. Either end can become a Node stream with
 * `new net.Socket({ fd })`; the other can be handed to the kernel.
 */
export function socketPair(domain = AF_UNIX, type = SOCK_STREAM): [number, number] {
  const sv = Buffer.alloc(8);
  check(lib().socketpair(domain, type | SOCK_CLOEXEC, 0, sv), 'socketpair');
  return [sv.readInt32LE(0), sv.readInt32LE(4)];
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
/** SO_SNDBUF past net.core.wmem_max; needs CAP_NET_ADMIN. */
const SO_SNDBUFFORCE = 32;
/** Room for a few maximal kernel requests (blk-mq sends up to max_sectors_kb, 1280 KiB by default). */
const NBD_PAIR_SEND_BUFFER = 8 * 1024 * 1024;

/**
 * Ask for a send buffer of `bytes`: the kernel caps it at net.core.wmem_max (and doubles it)
 * unless `pastSystemLimit` and the process may exceed it. Best effort: the default buffer still
 * works, only with more wakeups and copies.
 */
export function growSendBuffer(fd: number, bytes: number, opts: { pastSystemLimit?: boolean } = {}): void {
  for (const name of opts.pastSystemLimit ? [SO_SNDBUFFORCE, SO_SNDBUF] : [SO_SNDBUF]) {
    try {
      setSockOptInt(fd, SOL_SOCKET, name, bytes);
      return;
    } catch {
      // Not allowed, or not a socket: try the next, or keep the default.
    }
  }
}

/**
 * A socketpair between the kernel's NBD driver and the server, with send buffers that hold
 * whole large requests and replies: with the default (about 200 KiB) a 1 MiB write reaches the
 * server in many small reads, each a wakeup of both sides.
 */
export function nbdSocketPair(): [user: number, kernel: number] {
  const pair = socketPair();
  for (const fd of pair) growSendBuffer(fd, NBD_PAIR_SEND_BUFFER, { pastSystemLimit: true });
  return pair;
}

/** bind(2) a netlink socket; pid 0 lets the kernel assign the port id. */
export function bindNetlink(fd: number, pid = 0, groups = 0): void {
  const addr = sockaddrNl(pid, groups);
  check(lib().bind(fd, addr, addr.length), 'bind');
}

export function setSockOptInt(fd: number, level: number, name: number, value: number): void {
  const v = Buffer.alloc(4);
  v.writeInt32LE(value);
  check(lib().setsockopt(fd, level, name, v, 4), 'setsockopt');
}

/**
 * Send one datagram to the kernel (nl_pid 0); a short send is an error. Runs on the thread
 * pool: the kernel handles a generic netlink request inside sendto(2), and a command such as
 * NBD disconnect may wait on I/O that this very process serves on its event loop.
 */
export function sendToKernel(fd: number, datagram: Buffer): Promise<void> {
  const addr = sockaddrNl(0, 0);
  const attempt = (resolve: () => void, reject: (e: unknown) => void): void => {
    lib().sendto.async(fd, datagram, datagram.length, 0, addr, addr.length, (err: unknown, r: number) => {
      if (err) return reject(err);
      if (r < 0) {
        // koffi restores the worker thread's errno around this callback.
        const errno = koffi.errno();
        if (errno === EINTR) return attempt(resolve, reject);
        return reject(new SyscallError('sendto', errno));
      }
      if (r !== datagram.length) return reject(new SyscallError('sendto', 90 /* EMSGSIZE */));
      resolve();
    });
  };
  return new Promise(attempt);
}

/**
 * Receive one datagram into `buf` without blocking: its full length (MSG_TRUNC reports the
 * datagram's real size, so a result above buf.length means it was cut), or null when none is queued.
 */
export function recvDatagram(fd: number, buf: Buffer): number | null {
  for (;;) {
    const r = lib().recv(fd, buf, buf.length, MSG_DONTWAIT | MSG_TRUNC);
    if (r >= 0) return r;
    const errno = koffi.errno();
    if (errno === EINTR) continue;
    if (errno === EAGAIN) return null;
    throw new SyscallError('recv', errno);
  }
}

/** Wait on the thread pool until `fd` is readable; false on timeout. */
export function waitReadable(fd: number, timeoutMs: number): Promise<boolean> {
  const pfd = Buffer.alloc(8);
  pfd.writeInt32LE(fd, 0);
  pfd.writeInt16LE(POLLIN, 4);
  return new Promise((resolve, reject) => {
    lib().poll.async(pfd, 1, Math.max(0, Math.trunc(timeoutMs)), (err: unknown, r: number) => {
      if (err) reject(err);
      // EINTR from a stray signal only means "look again".
      else resolve(r !== 0);
    });
  });
}

/** An array of struct pollfd (8 bytes each: i32 fd, i16 events, i16 revents) and how many are in use. */
export interface PollSet {
  fds: Buffer;
  count: number;
}

/** poll(2) without waiting: how many of the set are ready (negative on error, e.g. EINTR). */
export function pollReadableNow(set: PollSet): number {
  return lib().poll(set.fds, set.count, 0);
}

export function closeFd(fd: number): void {
  check(lib().close(fd), 'close');
}

// Namespaces and the process plumbing a container init needs, through koffi: unshare(2),
// setns(2), mount(2)/umount2(2), pivot_root(2) (no glibc wrapper: syscall(2)), mknod(2),
// sethostname(2), prctl(PR_SET_PDEATHSIG), fcntl(2) on fd flags, and execve(2).
//
// Everything here is synchronous on purpose. unshare(CLONE_NEWNS) and pivot_root change the
// namespaces and root of the calling *thread* only (CLONE_NEWNS implies CLONE_FS): a call made
// on a libuv pool thread would act on the wrong mount namespace, and the pool threads keep
// the old root. Callers of this module therefore only use synchronous fs APIs afterwards.

import koffi from 'koffi';
import { SyscallError } from './errno.js';

/** linux/sched.h */
export const CLONE = {
  NEWNS: 0x00020000,
  NEWUTS: 0x04000000,
  NEWIPC: 0x08000000,
  NEWPID: 0x20000000,
} as const;

/** sys/mount.h flags used for container setup (the filesystem-option ones live in mount.ts). */
export const MS_NS = {
  RDONLY: 1,
  NOSUID: 2,
  NODEV: 4,
  NOEXEC: 8,
  BIND: 4096,
  REC: 16384,
  PRIVATE: 1 << 18,
  STRICTATIME: 1 << 24,
} as const;

export const MNT_DETACH = 2;
export const S_IFCHR = 0o020000;
const PR_SET_PDEATHSIG = 1;
const F_GETFD = 1;
const F_SETFD = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const F_DUPFD_CLOEXEC = 1030;
const FD_CLOEXEC = 1;
const O_NONBLOCK = 0o4000;
const SIG_SETMASK = 2;

/** SYS_pivot_root by architecture (asm/unistd_64.h; asm-generic/unistd.h for arm64). */
const SYS_PIVOT_ROOT: Partial<Record<NodeJS.Architecture, number>> = { x64: 155, arm64: 41 };

type Fn = (...args: unknown[]) => number;
interface Bindings {
  unshare: Fn;
  setns: Fn;
  mount: Fn;
  umount2: Fn;
  syscall: Fn;
  mknod: Fn;
  sethostname: Fn;
  prctl: Fn;
  fcntl: Fn;
  signal: Fn;
  sigprocmask: Fn;
  execve: Fn;
}

let bindings: Bindings | undefined;

/**
 * Bind every function now. A container init must call this before pivot_root: afterwards
 * libc.so.6 is no longer reachable by path.
 */
export function loadNamespaceBindings(): void {
  if (bindings) return;
  const c = koffi.load('libc.so.6');
  const f = (sig: string) => c.func(sig) as unknown as Fn;
  bindings = {
    unshare: f('int unshare(int flags)'),
    setns: f('int setns(int fd, int nstype)'),
    mount: f('int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)'),
    umount2: f('int umount2(const char *target, int flags)'),
    syscall: f('long syscall(long number, ...)'),
    mknod: f('int mknod(const char *path, uint32_t mode, uint64_t dev)'),
    sethostname: f('int sethostname(const char *name, size_t len)'),
    prctl: f('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)'),
    // fcntl is variadic; every command used here takes an int, which has the same calling
    // convention as the fixed declaration on the Linux ABIs we support.
    fcntl: f('int fcntl(int fd, int cmd, int arg)'),
    signal: f('void *signal(int sig, void *handler)'),
    sigprocmask: f('int sigprocmask(int how, const void *set, void *old)'),
    execve: f('int execve(const char *path, const char **argv, const char **envp)'),
  };
}

function lib(): Bindings {
  loadNamespaceBindings();
  return bindings!;
}

function check(r: number, what: string): number {
  if (r < 0) throw new SyscallError(what, koffi.errno());
  return r;
}

/** unshare(2) on the calling thread (the main thread: see the file comment). */
export function unshare(flags: number): void {
  check(lib().unshare(flags), `unshare(0x${flags.toString(16)})`);
}

/** setns(2): join the namespace `fd` refers to (nstype 0: whatever kind it is). */
export function setns(fd: number, nstype: number): void {
  check(lib().setns(fd, nstype), 'setns');
}

export function mountSync(source: string | null, target: string, fstype: string | null, flags: number, data: string | null): void {
  check(lib().mount(source, target, fstype, flags, data), `mount(${source ?? 'none'} on ${target})`);
}

export function umountSync(target: string, flags: number): void {
  check(lib().umount2(target, flags), `umount2(${target})`);
}

export function pivotRoot(newRoot: string, putOld: string): void {
  const nr = SYS_PIVOT_ROOT[process.arch];
  if (nr === undefined) throw new SyscallError(`pivot_root (no syscall number known for ${process.arch})`, 38 /* ENOSYS */);
  check(lib().syscall(nr, 'const char *', newRoot, 'const char *', putOld), `pivot_root(${newRoot}, ${putOld})`);
}

/** glibc's makedev() (sys/sysmacros.h) for major/minor numbers below 2^32. */
export function makeDev(major: number, minor: number): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffff000n) << 32n) | ((ma & 0xfffn) << 8n) | ((mi & 0xffffff00n) << 12n) | (mi & 0xffn);
}

export function mknodChar(path: string, mode: number, major: number, minor: number): void {
  check(lib().mknod(path, S_IFCHR | mode, makeDev(major, minor)), `mknod(${path})`);
}

export function setHostname(name: string): void {
  check(lib().sethostname(name, Buffer.byteLength(name)), 'sethostname');
}

/** The signal this process gets when the thread that forked it exits; survives execve. */
export function setParentDeathSignal(signo: number): void {
  check(lib().prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0), 'prctl(PR_SET_PDEATHSIG)');
}

export function setCloseOnExec(fd: number, on: boolean): void {
  const flags = check(lib().fcntl(fd, F_GETFD, 0), 'fcntl(F_GETFD)');
  check(lib().fcntl(fd, F_SETFD, on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC), 'fcntl(F_SETFD)');
}

/** A new descriptor for the same open file (F_DUPFD_CLOEXEC), which outlives closing `fd`. */
export function duplicateFd(fd: number): number {
  return check(lib().fcntl(fd, F_DUPFD_CLOEXEC, 0), 'fcntl(F_DUPFD_CLOEXEC)');
}

/** Back to blocking mode: a program given a non-blocking stdio fails its writes with EAGAIN. */
export function clearNonBlocking(fd: number): void {
  const flags = check(lib().fcntl(fd, F_GETFL, 0), 'fcntl(F_GETFL)');
  if (flags & O_NONBLOCK) check(lib().fcntl(fd, F_SETFL, flags & ~O_NONBLOCK), 'fcntl(F_SETFL)');
}

/**
 * What Node changes and execve keeps: ignored signals stay ignored (Node ignores SIGPIPE, and
 * a shell pipeline then misbehaves) and the signal mask is inherited. Reset both.
 */
export function resetSignalsForExec(): void {
  const l = lib();
  for (const sig of [13 /* SIGPIPE */, 25 /* SIGXFSZ */]) l.signal(sig, null);
  check(l.sigprocmask(SIG_SETMASK, Buffer.alloc(128), null), 'sigprocmask');
}

/** execve(2); returns only by throwing. */
export function execve(path: string, argv: readonly string[], env: readonly string[]): never {
  lib().execve(path, [...argv, null], [...env, null]);
  throw new SyscallError(`execve(${path})`, koffi.errno());
}

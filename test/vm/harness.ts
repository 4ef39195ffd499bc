// Boots Debian's kernel in qemu (TCG: this host's KVM cannot run it) with a busybox
// initramfs, mounts the host root read-only over virtio-9p, chroots into it and runs one
// shell script as root, so kernel tests (nbd, mounts) run against a real kernel while using
// this project's code and the host's tools unchanged.
//
// One boot costs a few seconds: tests batch many checks into one script and report them as
// JSON lines appended to $IMGBD_VM_RESULTS, which runInVm parses into `results`.

import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ImgbdError } from '../../src/errors.js';
import { encodeCpioNewc, type CpioEntry } from './cpio.js';
import { BOOT_MODULES, GUEST_INIT, GUEST_MODPROBE } from './init-script.js';
import { extractVmlinux } from './kernel-image.js';

/** Debian packages the harness needs on the host, with a file that proves each is there. */
const HOST_PACKAGES: ReadonlyArray<readonly [pkg: string, probe: string]> = [
  ['qemu-system-x86', '/usr/bin/qemu-system-x86_64'],
  ['linux-image-amd64', '/boot'],
  ['busybox-static', '/bin/busybox'],
  ['fdisk', '/usr/sbin/sfdisk'],
  ['e2fsprogs', '/usr/sbin/mkfs.ext4'],
  ['kmod', '/usr/bin/kmod'],
  ['xz-utils', '/usr/bin/xz'],
];

export class VmError extends ImgbdError {}

/** The VM cannot be set up on this host (missing packages, no kernel). */
export class VmUnavailableError extends VmError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_VM_UNAVAILABLE', message, options);
  }
}

export interface VmAssets {
  readonly kernelVersion: string;
  /** The uncompressed ELF kernel, or the bzImage when extraction failed. */
  readonly kernelPath: string;
  readonly initramfsPath: string;
}

export interface VmShare {
  /** Host directory; mounted at the same absolute path in the guest unless guestPath is set. */
  readonly hostPath: string;
  /** Must already exist in the host root, or lie under a guest tmpfs (/tmp, /run): the root is read-only. */
  readonly guestPath?: string;
  readonly readOnly?: boolean;
}

export interface RunInVmOptions {
  /** POSIX sh script run as root in the chroot (cwd: `cwd`, default the project root). */
  readonly script: string;
  readonly timeoutMs: number;
  readonly memoryMb?: number;
  readonly cpus?: number;
  /** Writable share mounted at the same path in the guest; a temp dir (removed after) when omitted. */
  readonly scratchDir?: string;
  readonly extraShares?: readonly VmShare[];
  readonly cwd?: string;
}

export interface VmResult {
  /** The script's exit status; null when the guest died before reporting one. */
  readonly exitCode: number | null;
  /** The serial console (kernel messages and the init's own lines). */
  readonly console: string;
  /** The script's stdout and stderr. */
  readonly output: string;
  /** One value per JSON line the script appended to $IMGBD_VM_RESULTS. */
  readonly results: unknown[];
  /** Wall time from spawning qemu to its exit. */
  readonly elapsedMs: number;
}

function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'node_modules'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new VmUnavailableError('cannot find the project root above the harness');
    dir = up;
  }
}

function compareVersions(a: string, b: string): number {
  const pa = a.split(/[.-]/);
  const pb = b.split(/[.-]/);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? '';
    const y = pb[i] ?? '';
    const nx = Number(x);
    const ny = Number(y);
    const c = Number.isInteger(nx) && Number.isInteger(ny) && x !== '' && y !== '' ? nx - ny : x.localeCompare(y);
    if (c !== 0) return c;
  }
  return 0;
}

function newestKernel(): string | null {
  if (!existsSync('/boot')) return null;
  const versions = readdirSync('/boot')
    .filter((n) => n.startsWith('vmlinuz-'))
    .map((n) => n.slice('vmlinuz-'.length))
    .filter((v) => existsSync(join('/lib/modules', v)))
    .sort(compareVersions);
  return versions.at(-1) ?? null;
}

function packageInstalled(pkg: string): boolean {
  try {
    return execFileSync('dpkg-query', ['-W', '-f=${Status}', pkg], { stdio: ['ignore', 'pipe', 'ignore'] })
      .toString()
      .includes('install ok installed');
  } catch {
    return false;
  }
}

function installMissingPackages(): void {
  const missing = HOST_PACKAGES.filter(([pkg, probe]) => !existsSync(probe) || !packageInstalled(pkg)).map(([pkg]) => pkg);
  if (missing.length === 0 && newestKernel() !== null) return;
  const wanted = missing.length > 0 ? missing : ['linux-image-amd64'];
  if (process.getuid?.() !== 0) {
    throw new VmUnavailableError(`missing host packages for the kernel VM: ${wanted.join(' ')} (install them as root)`);
  }
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  try {
    execFileSync('apt-get', ['update', '-qq'], { stdio: 'ignore', env, timeout: 600_000 });
    execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...wanted], { stdio: 'ignore', env, timeout: 1_200_000 });
  } catch (cause) {
    throw new VmUnavailableError(`apt-get install ${wanted.join(' ')} failed`, { cause });
  }
}

function findModule(kernelVersion: string, name: string): string {
  const base = join('/lib/modules', kernelVersion);
  const want = new Set([`${name}.ko`, `${name}.ko.xz`, `${name}.ko.zst`]);
  const stack = [join(base, 'kernel')];
  while (stack.length > 0) {
    const dir = stack.pop()!;
    for (const ent of readdirSync(dir, { withFileTypes: true })) {
      if (ent.isDirectory()) stack.push(join(dir, ent.name));
      else if (want.has(ent.name)) return join(dir, ent.name);
    }
  }
  throw new VmUnavailableError(`kernel module ${name} not found under ${base}`);
}

function readModule(path: string): Buffer {
  if (path.endsWith('.xz')) return execFileSync('xz', ['-dc', path], { maxBuffer: 64 << 20 });
  if (path.endsWith('.zst')) return execFileSync('zstd', ['-dc', path], { maxBuffer: 64 << 20 });
  return readFileSync(path);
}

function buildInitramfs(kernelVersion: string): Buffer {
  const entries: CpioEntry[] = [];
  for (const d of ['bin', 'sbin', 'dev', 'proc', 'sys', 'scratch', 'newroot', 'modules', 'tmp']) entries.push({ kind: 'dir', path: d });
  entries.push({ kind: 'chardev', path: 'dev/console', major: 5, minor: 1 });
  entries.push({ kind: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
  entries.push({ kind: 'file', path: 'bin/busybox', data: readFileSync('/bin/busybox'), mode: 0o755 });
  entries.push({ kind: 'symlink', path: 'bin/sh', target: 'busybox' });
  entries.push({ kind: 'file', path: 'init', data: Buffer.from(GUEST_INIT), mode: 0o755 });
  entries.push({ kind: 'file', path: 'sbin/modprobe', data: Buffer.from(GUEST_MODPROBE), mode: 0o755 });
  for (const m of BOOT_MODULES) {
    entries.push({ kind: 'file', path: `modules/${m}.ko`, data: readModule(findModule(kernelVersion, m)) });
  }
  entries.push({ kind: 'file', path: 'modules/order', data: Buffer.from(`${BOOT_MODULES.join('\n')}\n`) });
  return encodeCpioNewc(entries);
}

function writeAtomically(path: string, data: Buffer): void {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, data);
  renameSync(tmp, path);
}

/**
 * Install what is missing (as root, through apt-get), then build or reuse the cached
 * uncompressed kernel and initramfs for the newest kernel under /boot.
 */
export function ensureVmAssets(): VmAssets {
  installMissingPackages();
  const kernelVersion = newestKernel();
  if (kernelVersion === null) throw new VmUnavailableError('no kernel under /boot with modules in /lib/modules');
  const cacheDir = join(projectRoot(), 'node_modules', '.cache', 'imgbd-vm', kernelVersion);
  mkdirSync(cacheDir, { recursive: true });

  // Same-version rebuilds (and a reinstalled busybox) must not reuse stale files.
  const bzImagePath = join('/boot', `vmlinuz-${kernelVersion}`);
  const stamp = (p: string) => {
    const st = statSync(p);
    return `${st.size}:${st.mtimeMs}`;
  };
  const kernelKey = createHash('sha256').update(stamp(bzImagePath)).digest('hex').slice(0, 12);
  let kernelPath = join(cacheDir, `vmlinux-${kernelKey}`);
  if (!existsSync(kernelPath)) {
    const bzImage = readFileSync(bzImagePath);
    const elf = extractVmlinux(bzImage);
    if (elf) writeAtomically(kernelPath, elf);
    else kernelPath = bzImagePath;
  }

  const key = createHash('sha256')
    .update(GUEST_INIT)
    .update(GUEST_MODPROBE)
    .update(BOOT_MODULES.join(','))
    .update(stamp('/bin/busybox'))
    .digest('hex')
    .slice(0, 16);
  const initramfsPath = join(cacheDir, `initramfs-${key}.cpio`);
  if (!existsSync(initramfsPath)) writeAtomically(initramfsPath, buildInitramfs(kernelVersion));
  return { kernelVersion, kernelPath, initramfsPath };
}

/**
 * For tests: the assets, or null after marking the test skipped. Under CI=true a missing
 * piece fails the test instead.
 */
export function requireVm(t: TestContext): VmAssets | null {
  try {
    return ensureVmAssets();
  } catch (err) {
    if (process.env.CI === 'true' || !(err instanceof VmUnavailableError)) throw err;
    t.skip(`kernel VM unavailable: ${err.message}`);
    return null;
  }
}

/** Single-quote for sh. */
export function shQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/**
 * The shell command that runs a guest node script living next to a test, the way the test
 * itself runs: `base` is the script's URL without extension (new URL('./guest/x', import.meta.url)),
 * resolved to .ts under tsx and to the compiled .js under dist.
 */
export function guestNodeCommand(base: URL, args: readonly string[] = []): string {
  const self = fileURLToPath(import.meta.url);
  const ts = self.endsWith('.ts');
  const script = `${fileURLToPath(base)}${ts ? '.ts' : '.js'}`;
  const node = ts ? ['node', '--import', 'tsx'] : ['node', '--enable-source-maps'];
  return [...node, script, ...args].map(shQuote).join(' ');
}

function guestConfig(scratch: string, cwd: string, shares: readonly VmShare[]): string {
  const lines = [`IMGBD_SCRATCH=${shQuote(scratch)}`, `IMGBD_CWD=${shQuote(cwd)}`, 'mount_extra_shares() {'];
  shares.forEach((s, i) => {
    const at = `"$1"${shQuote(s.guestPath ?? s.hostPath)}`;
    lines.push(`  mkdir -p ${at} 2>/dev/null`);
    lines.push(`  mount -t 9p -o "$2"${s.readOnly ? ',ro' : ''} x${i} ${at} || return 1`);
  });
  lines.push('  return 0', '}', '');
  return lines.join('\n');
}

function fsdevArgs(id: string, path: string, tag: string, readOnly: boolean): string[] {
  if (/[,\s]/.test(path)) throw new VmError('ERR_VM_SHARE', `share path must not contain commas or spaces: ${path}`);
  return [
    '-fsdev',
    `local,id=${id},path=${path},security_model=none,multidevs=remap${readOnly ? ',readonly=on' : ''}`,
    '-device',
    `virtio-9p-pci,fsdev=${id},mount_tag=${tag}`,
  ];
}

function parseResults(text: string): unknown[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      try {
        return JSON.parse(l) as unknown;
      } catch (cause) {
        throw new VmError('ERR_VM_RESULTS', `malformed result line from the guest: ${l}`, { cause });
      }
    });
}

/**
 * Boot the guest, run `script` as root in the chroot (the nbd module loadable), power off and
 * collect what the script reported. qemu is killed when `timeoutMs` passes, and the promise
 * then rejects with ERR_VM_TIMEOUT carrying the console tail.
 */
export async function runInVm(opts: RunInVmOptions): Promise<VmResult> {
  const assets = ensureVmAssets();
  const ownScratch = opts.scratchDir === undefined;
  const scratch = resolve(opts.scratchDir ?? mkdtempSync(join(tmpdir(), 'imgbd-vm-')));
  try {
    const ctl = join(scratch, '.imgbd-vm');
    rmSync(ctl, { recursive: true, force: true });
    rmSync(join(scratch, 'results.jsonl'), { force: true });
    mkdirSync(ctl, { recursive: true });
    const shares = [...(opts.extraShares ?? [])];
    // The guest mounts fresh tmpfs on /tmp, /run and /dev/shm, which would hide a checkout
    // living there (CI may clone anywhere): share the project again at its own path.
    const root = projectRoot();
    if (/^\/(tmp|run|dev\/shm)(\/|$)/.test(root)) shares.unshift({ hostPath: root, readOnly: true });
    writeFileSync(join(ctl, 'config.sh'), guestConfig(scratch, resolve(opts.cwd ?? root), shares));
    writeFileSync(join(ctl, 'script.sh'), opts.script);

    const args = [
      '-accel', 'tcg,thread=multi',
      '-cpu', 'max',
      '-M', 'pc',
      '-m', String(opts.memoryMb ?? 1024),
      '-smp', String(opts.cpus ?? Math.min(4, availableParallelism())),
      '-display', 'none',
      '-nodefaults',
      '-no-reboot',
      '-nic', 'none',
      '-serial', 'stdio',
      '-kernel', assets.kernelPath,
      '-initrd', assets.initramfsPath,
      '-append', 'console=ttyS0 quiet panic=-1 oops=panic rdinit=/init',
      ...fsdevArgs('r', '/', 'root', true),
      ...fsdevArgs('s', scratch, 'scratch', false),
      ...shares.flatMap((s, i) => fsdevArgs(`x${i}`, resolve(s.hostPath), `x${i}`, s.readOnly ?? false)),
    ];
    const started = Date.now();
    const consoleText = await new Promise<string>((resolveRun, rejectRun) => {
      const child = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] });
      const chunks: Buffer[] = [];
      child.stdout.on('data', (d: Buffer) => chunks.push(d));
      child.stderr.on('data', (d: Buffer) => chunks.push(d));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        const tail = Buffer.concat(chunks).toString().slice(-4000);
        rejectRun(new VmError('ERR_VM_TIMEOUT', `guest did not power off within ${opts.timeoutMs} ms; console tail:\n${tail}`));
      }, opts.timeoutMs);
      child.on('error', (cause) => {
        clearTimeout(timer);
        rejectRun(new VmError('ERR_VM_SPAWN', 'cannot start qemu-system-x86_64', { cause }));
      });
      child.on('close', () => {
        clearTimeout(timer);
        resolveRun(Buffer.concat(chunks).toString());
      });
    });
    const elapsedMs = Date.now() - started;
    const read = (p: string) => (existsSync(p) ? readFileSync(p, 'utf8') : '');
    const exitText = read(join(ctl, 'exit-code')).trim();
    return {
      exitCode: exitText === '' ? null : Number(exitText),
      console: consoleText,
      output: read(join(ctl, 'output.log')),
      results: parseResults(read(join(scratch, 'results.jsonl'))),
      elapsedMs,
    };
  } finally {
    if (ownScratch) rmSync(scratch, { recursive: true, force: true });
  }
}

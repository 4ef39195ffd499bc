// The command table: every command's flags and help live here, implementations load
// lazily so `imgbd --help` and a typo cost nothing.

import { Command, Option } from 'commander';
import { reportError, EXIT } from './exit.js';

type Loader = (args: string[]) => Promise<{ run(args: string[], opts: Record<string, unknown>, cmd: Command): Promise<number | void> }>;

function lazy(load: Loader) {
  return async function (this: Command, ...all: unknown[]): Promise<void> {
    const cmd = all[all.length - 1] as Command;
    const opts = cmd.opts();
    const args = cmd.args;
    const mod = await load(args);
    const code = await mod.run(args, opts, cmd);
    if (typeof code === 'number' && code !== 0) process.exitCode = code;
  };
}

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

/** Each command's definition, by name: a command line names one, and only it is defined. */
const COMMANDS: Readonly<Record<string, (p: Command) => void>> = {
  serve: (p) => {
    p
      .command('serve')
      .summary('serve images over NBD')
      .description(
        'Serve one or more images over NBD. By default on a unix socket (mode 0600); with -p/--port on TCP,\n' +
          'bound to 127.0.0.1 unless -b says otherwise. Several images make several named exports (-x per image).\n' +
          'Backing files must lie in the image\'s own directory tree unless --allow-backing allows more.\n\n' +
          'Examples:\n' +
          '  imgbd serve -f qcow2 -k /tmp/vm.sock vm.qcow2\n' +
          '  imgbd serve -f qcow2 -l before-upgrade -k /tmp/snap.sock vm.qcow2\n' +
          '  imgbd serve -f qcow2 --allow-backing /srv/golden -p 10809 vm.qcow2',
      )
      .argument('<image...>', 'image file(s) or block device(s)')
      .option('-f, --format <fmt>', 'image format (raw); probed by magic when omitted')
      .option('-r, --read-only', 'export read-only')
      .option('-x, --export-name <name>', 'export name, once per image (default: "" for a single image)', collect)
      .option('-D, --description <text>', 'export description, once per image', collect)
      .option('-k, --socket <path>', 'listen on this unix socket')
      .option('-p, --port <port>', 'listen on this TCP port (default 10809 when -b is given)')
      .option('-b, --bind <addr>', 'TCP address to bind (default 127.0.0.1)')
      .option('-e, --shared <n>', 'allow at most N clients at once (default 1, 0 = unlimited)')
      .option('-t, --persistent', "keep serving after the last client disconnects")
      .option('-s, --snapshot', 'throw away all writes: they go to a temporary overlay')
      .option('-o, --offset <bytes>', 'export only the image from this offset')
      .option('--size <bytes>', 'export only this many bytes')
      .option('--tls <mode>', 'off | on (allow) | require', 'off')
      .option('--tls-certificates <dir>', 'directory with ca-cert.pem, server-cert.pem, server-key.pem')
      .option('--tls-verify-peer', 'require a client certificate signed by the CA')
      .option('--tls-psk <file>', 'PSK file with username:hexkey lines')
      .option('--handshake-timeout <seconds>', 'drop clients that do not finish the handshake in time', '10')
      .option('--poll-max-us <us>', 'when idle, watch the sockets this long before sleeping: lower latency for ' +
        'one-at-a-time clients, at the cost of CPU (0 = never; default 50, 0 on a single CPU)')
      .option('--threads <n>', 'serve clients of raw images on up to N threads, the main one included ' +
        '(default: one per core, up to --shared; 1 = all on one thread)')
      .option('--fork', 'go to the background once the server is ready')
      .option('--pid-file <path>', 'write the server pid here')
      .option('-v, --verbose', 'log connections')
      .option('-l, --load-snapshot <name>', 'serve this qcow2 internal snapshot (id or name), read-only')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable; default: only the image\'s own directory tree)', collect)
      .addHelpText('after', `
  Examples:
    imgbd serve -k /run/disk.sock disk.qcow2        serve on a unix socket until the client leaves
    imgbd serve -t -e 4 -k /run/disk.sock disk.raw  keep serving, up to 4 clients (multi-conn)
    imgbd serve -p 10809 -b 0.0.0.0 --tls=require --tls-certificates /etc/imgbd/tls disk.raw
    imgbd serve -s disk.qcow2                       writes go to a throwaway overlay
    nbdinfo 'nbd+unix:///?socket=/run/disk.sock'    then any NBD client can use it`)
      .action(lazy(() => import('./commands/serve.js')));
  },
  info: (p) => {
    p
      .command('info')
      .summary('show an image or an NBD export')
      .description(
        'Describe an image with qemu-img info\'s fields (--json: the same JSON keys), or an NBD export ' +
          'as nbdinfo does. The backing file is named, not opened; --backing-chain opens and describes ' +
          'every image of the chain, refusing backing files outside the overlay\'s directory tree unless ' +
          '--allow-backing allows them.\n\n' +
          'Examples:\n' +
          '  imgbd info disk.qcow2\n' +
          '  imgbd info --json --backing-chain vm1.qcow2\n' +
          '  imgbd info nbd+unix:///?socket=/run/imgbd/serve.sock',
      )
      .argument('<image-or-uri>', 'image file, or nbd:// / nbd+unix:// URI')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('--json', 'print JSON')
      .option('--backing-chain', 'describe every image of the backing chain, top first (a JSON array with --json)')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable)', collect)
      .addHelpText('after', `
  Examples:
    imgbd info disk.qcow2 --json                     qemu-img info's JSON keys
    imgbd info 'nbd+unix:///?socket=/run/disk.sock'  an export: size, flags, block sizes`)
      .action(lazy(() => import('./commands/info.js')));
  },
  list: (p) => {
    p
      .command('list')
      .summary('list the exports of an NBD server, or (no URI) the attached devices')
      .argument('[uri]', 'nbd:// or nbd+unix:// URI of the server; omitted: list the devices imgbd attached')
      .option('--json', 'print JSON')
      .action(lazy((args) => (args.length === 0 ? import('./commands/list-devices.js') : import('./commands/list.js'))));
  },
  attach: (p) => {
    p
      .command('attach')
      .summary('attach an image (or one of its partitions) as /dev/nbdN')
      .description(
        'Attach IMAGE as /dev/nbdN through the kernel NBD driver, served by a supervisor process that stays ' +
          'in the background (state in /run/imgbd). IMAGE:N attaches only partition N; IMAGE:name=LABEL the GPT ' +
          'partition so named. Prints the device once it (and every partition node) is usable.',
      )
      .argument('<image>', 'IMAGE, IMAGE:N or IMAGE:name=LABEL')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('-r, --read-only', 'attach read-only (and mount read-only)')
      .option('--mount <dir>', 'mount the filesystem (type detected from its superblock) on DIR')
      .option('-o, --options <opts>', 'mount options, as mount -o')
      .option('--connections <n>', 'NBD connections to the kernel (the image must allow multi-conn)', '1')
      .option('--timeout <seconds>', 'fail I/O when the server does not answer within this time', '30')
      .option('--watch-pid <pid>', 'detach when this process exits')
      .option('--poll-max-us <us>', 'when idle, the supervisor watches the kernel\'s sockets this long before ' +
        'sleeping: lower latency for one-at-a-time I/O, at the cost of CPU (default 0 = never)')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable; default: only the image\'s own directory tree)', collect)
      .option('--json', 'print JSON')
      .addOption(new Option('--interface <kind>', 'kernel interface: auto, netlink or ioctl').hideHelp())
      .action(lazy(() => import('./commands/attach.js')));
  },
  detach: (p) => {
    p
      .command('detach')
      .summary('detach a device attached with imgbd attach')
      .argument('<target>', '/dev/nbdN, its mount point, or the attached image')
      .option('--force', 'detach even when mounted or held by others')
      .action(lazy(() => import('./commands/detach.js')));
  },
  run: (p) => {
    p
      .command('run')
      .summary('run a command in new namespaces with an image as its root filesystem')
      .description(
        'Attach ROOTFS (read-only unless --rw), mount it, and run CMD as PID 1 of new mount, pid, uts and ipc\n' +
          'namespaces with the image as its root (pivot_root, a fresh /proc, a minimal /dev). Exits with CMD\'s\n' +
          'status (128+N when signal N ended it), once the filesystem is unmounted and the device detached;\n' +
          'if imgbd itself is killed, CMD is killed and the supervisor unmounts and detaches. Options go before\n' +
          'ROOTFS: everything after it belongs to CMD.\n\n' +
          'Examples:\n' +
          "  imgbd run nbd:rootfs.qcow2:1 -- sh -c 'cat /etc/os-release'\n" +
          '  imgbd run --rw -e LANG=C nbd:disk.img:name=root /bin/sh',
      )
      .argument('<rootfs>', 'nbd:IMAGE, nbd:IMAGE:N or nbd:IMAGE:name=LABEL')
      .argument('<command...>', 'CMD [ARGS...]')
      .option('--rw', 'attach and mount read-write (default read-only)')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('-o, --options <opts>', 'mount options for the root filesystem, as mount -o')
      .option('-e, --env <KEY=VALUE>', 'environment variable for CMD (repeatable)', collect)
      .option('-w, --workdir <dir>', 'working directory inside the container', '/')
      .option('--hostname <name>', 'hostname inside the container', 'imgbd')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable; default: only the image\'s own directory tree)', collect)
      .addOption(new Option('--interface <kind>', 'kernel interface: auto, netlink or ioctl').hideHelp())
      .passThroughOptions()
      .action(lazy(() => import('./commands/run.js')));
  },
  'qemu-nbd': (p) => {
    p
      .command('qemu-nbd')
      .summary('qemu-nbd -c / -d for tools that call it (LXC nbd: root filesystems), without QEMU')
      .description(
        'qemu-nbd -c DEV IMAGE connects IMAGE to DEV (/dev/nbdN) and serves it from this process, in the\n' +
          'foreground, until DEV is disconnected (exit 0). qemu-nbd -d DEV flushes and disconnects DEV, and waits\n' +
          'until the kernel has released it. Install as `qemu-nbd` with --install-shim DIR (a symlink to the\n' +
          'bin/qemu-nbd shim) and put DIR first in PATH.',
      )
      .argument('[args...]', 'IMAGE with -c; DEV with -d')
      .option('-c, --connect <dev>', 'connect IMAGE to this device')
      .option('-d, --disconnect', 'disconnect the device given as argument')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('-r, --read-only', 'export read-only')
      .option('--pid-file <path>', 'write the serving process id here')
      .option('-v, --verbose', 'log to stderr')
      .option('--install-shim <dir>', 'create DIR/qemu-nbd, a symlink to the bin/qemu-nbd shim, and exit')
      .addOption(new Option('--interface <kind>', 'kernel interface: auto, netlink or ioctl').hideHelp())
      .action(lazy(() => import('./commands/qemu-nbd.js')));
  },
  gc: (p) => {
    p
      .command('gc')
      .summary('reclaim attached devices whose supervisor has died')
      .action(lazy(() => import('./commands/gc.js')));
  },
  map: (p) => {
    p
      .command('map')
      .summary('show which ranges hold data, zeros or holes')
      .argument('<image-or-uri>', 'image file, or NBD URI')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('--json', 'print JSON (qemu-img map --output=json shape)')
      .addHelpText('after', `
  Examples:
    imgbd map disk.qcow2                             offsets, lengths, depth in the backing chain
    imgbd map --json 'nbd://127.0.0.1/'              qemu-img map --output=json shape`)
      .action(lazy(() => import('./commands/map.js')));
  },
  copy: (p) => {
    p
      .command('copy')
      .summary('copy between images and NBD exports, sparse-aware')
      .argument('<src>', 'source image file or NBD URI')
      .argument('<dst>', 'destination file (created if missing) or NBD URI')
      .option('-f, --format <fmt>', 'source format; probed when omitted')
      .option('-C, --connections <n>', 'NBD connections per side when the export allows multi-conn', '4')
      .option('-R, --requests <n>', 'requests in flight per connection', '16')
      .option('--request-size <bytes>', 'bytes per request', '4M')
      .option('-p, --progress', 'show a progress bar even when not on a terminal')
      .addOption(new Option('--no-progress', 'never show a progress bar'))
      .option('--flush', 'flush the destination at the end (always done for files)')
      .addHelpText('after', `
  Examples:
    imgbd copy 'nbd+unix:///?socket=/run/a.sock' backup.raw   export to a sparse file
    imgbd copy disk.raw 'nbd://127.0.0.1/' -C 4               file into an export, 4 connections`)
      .action(lazy(() => import('./commands/copy.js')));
  },
  create: (p) => {
    p
      .command('create')
      .summary('create a qcow2 or raw image')
      .description(
        'Create an image, as qemu-img create does. SIZE takes k, M, G, T suffixes; with -b it may be left out ' +
          'and is then the backing file\'s size. A relative -b is relative to the new image\'s directory.\n\n' +
          'qcow2 options (-o key=value,...): cluster_size (512..2M), compat (0.10 | 1.1), extended_l2 (on|off), ' +
          'compression_type (zlib|zstd), lazy_refcounts (on|off), refcount_bits (1..64), ' +
          'preallocation (off|metadata|falloc|full), data_file (external raw data file).\n' +
          'raw options: preallocation (off|falloc|full).\n\n' +
          'Examples:\n' +
          '  imgbd create -f qcow2 disk.qcow2 20G\n' +
          '  imgbd create -f qcow2 -o cluster_size=2M,extended_l2=on big.qcow2 1T\n' +
          '  imgbd create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2\n' +
          '  imgbd create -f raw -o preallocation=falloc disk.img 4G',
      )
      .argument('<file>', 'the image to create (overwritten if it exists)')
      .argument('[size]', 'virtual size, e.g. 10G (optional with -b)')
      .option('-f, --format <fmt>', 'qcow2 or raw', 'raw')
      .option('-b, --backing <file>', 'backing file (qcow2 only)')
      .option('-F, --backing-format <fmt>', 'format of the backing file, recorded in the image (required with -b)')
      .option('-o, --options <opts>', 'format options, key=value[,key=value...] (repeatable)', collect)
      .option('--allow-backing <path>', 'allow the backing file under PATH when reading its size', collect)
      .option('-u, --unsafe', 'do not open the backing file (SIZE required; -F may then be left out)')
      .option('-q, --quiet', 'print nothing on success')
      .option('--partition <scheme>', 'write a partition table (gpt or mbr) with one partition holding --fs')
      .option('--fs <type>', 'format that partition: ext4, xfs or vfat (any -f format, qcow2, qed, vdi too)')
      .option('--from-dir <dir>', 'with --fs: populate the filesystem from DIR (no root, no kernel device needed)')
      .option('--label <label>', 'with --fs: filesystem label (also the GPT partition name)')
      .action(lazy(() => import('./commands/create.js')));
  },
  check: (p) => {
    p
      .command('check')
      .summary('check a qcow2, qed or vdi image for corruptions and leaked clusters')
      .description(
        'Check the metadata of a qcow2 (or qed, vdi) image, as qemu-img check does. Exit status: 0 no problems, ' +
          '2 corruptions, 3 leaked clusters only, 1 the check could not be completed, 63 the format has ' +
          'nothing to check (raw). -r leaks reclaims leaked clusters (safe); -r all also repairs ' +
          'corruptions (work on a copy first).\n\n' +
          'Examples:\n' +
          '  imgbd check disk.qcow2\n' +
          '  imgbd check -r leaks --json disk.qcow2',
      )
      .argument('<file>', 'the image')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('-r, --repair <what>', 'leaks | all')
      .option('--json', 'print qemu-img check --output=json keys')
      .option('-q, --quiet', 'print nothing; the exit status tells')
      .action(lazy(() => import('./commands/check.js')));
  },
  clone: (p) => {
    p
      .command('clone')
      .summary('create a qcow2 overlay over an image')
      .description(
        'Create NEW, a qcow2 image whose unwritten parts read from BASE. BASE\'s format is recorded in NEW, ' +
          'so it is never guessed later; BASE is named relatively when both are in one directory (move them ' +
          'together), otherwise by absolute path. BASE is never written through NEW.\n\n' +
          'Examples:\n' +
          '  imgbd clone golden.qcow2 vm1.qcow2\n' +
          '  imgbd clone -f raw golden.img vm1.qcow2 -o cluster_size=64k',
      )
      .argument('<base>', 'existing image (any format)')
      .argument('<new>', 'the overlay to create (must not exist)')
      .option('-f, --format <fmt>', 'BASE\'s format; probed by magic when omitted, then recorded (give -f raw for a raw disk whose data could look like an image)')
      .option('-o, --options <opts>', 'qcow2 options for NEW, as for create (repeatable)', collect)
      .option('--allow-backing <path>', 'allow BASE\'s own backing files under PATH', collect)
      .option('-q, --quiet', 'print nothing on success')
      .action(lazy(() => import('./commands/clone.js')));
  },
  resize: (p) => {
    p
      .command('resize')
      .summary('grow (or, with --shrink, shrink) a qcow2 or raw image')
      .description(
        'Change the virtual size, as qemu-img resize does: SIZE is absolute, or relative with + or -. ' +
          'Shrinking needs --shrink and is refused while the part that would be cut off holds data. ' +
          'Write a negative size after --, e.g. imgbd resize --shrink disk.img -- -1G.\n\n' +
          'Examples:\n' +
          '  imgbd resize disk.qcow2 +10G\n' +
          '  imgbd resize --shrink disk.img 1G',
      )
      .argument('<file>', 'the image')
      .argument('<size>', '[+|-]SIZE')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('--shrink', 'allow making the image smaller')
      .option('-q, --quiet', 'print nothing on success')
      .allowUnknownOption()
      .action(lazy(() => import('./commands/resize.js')));
  },
  snapshot: (p) => {
    p
      .command('snapshot')
      .summary('create, apply, delete or list qcow2 internal snapshots')
      .description(
        'Manage internal snapshots, as qemu-img snapshot does. Exactly one of -c, -a, -d, -l. ' +
          'Do not use it on an image that a running server has open for writing. ' +
          'Serve a snapshot read-only with imgbd serve -l NAME.\n\n' +
          'Examples:\n' +
          '  imgbd snapshot -c before-upgrade disk.qcow2\n' +
          '  imgbd snapshot -l disk.qcow2\n' +
          '  imgbd snapshot -a before-upgrade disk.qcow2',
      )
      .argument('<file>', 'a qcow2 image')
      .option('-c, --create <name>', 'create a snapshot of the current state')
      .option('-a, --apply <name>', 'revert the image to the snapshot (id or name)')
      .option('-d, --delete <name>', 'delete the snapshot (id or name)')
      .option('-l, --list', 'list the snapshots')
      .option('-f, --format <fmt>', 'image format; probed when omitted')
      .option('--json', 'with -l: print JSON')
      .action(lazy(() => import('./commands/snapshot.js')));
  },
  convert: (p) => {
    p
      .command('convert')
      .summary('convert an image to another format (raw, qcow2, qed, vdi, NBD), sparse, optionally compressed')
      .description(
        'Copy SRC into a new image DST, as qemu-img convert does. Holes, zero ranges\n' +
          'and all-zero data are not written. -c compresses every data cluster of a\n' +
          'qcow2 target (zlib, or zstd with -o compression_type=zstd) on one thread per\n' +
          'core. -B makes DST an overlay of BACKING holding only what differs from it.\n' +
          'Either side may be an NBD URI (an NBD target must exist; so must DST with -n).\n' +
          'As with qemu-img, DST is left to the page cache (-t unsafe): the kernel writes\n' +
          'it out in its own time. With -t writeback, imgbd flushes DST to disk before\n' +
          'it exits, so a crash or power loss right after cannot take it.\n\n' +
          'Examples:\n' +
          '  imgbd convert -O qcow2 disk.img disk.qcow2\n' +
          '  imgbd convert -c -O qcow2 -o compression_type=zstd disk.img small.qcow2\n' +
          '  imgbd convert -O qcow2 -B base.qcow2 -F qcow2 vm.img vm-delta.qcow2\n' +
          '  imgbd convert disk.qcow2 nbd+unix:///?socket=/tmp/nbd.sock',
      )
      .argument('<src>', 'source image or NBD URI')
      .argument('<dst>', 'target image (created, overwritten) or NBD URI')
      .option('-f, --format <fmt>', 'source format; probed when omitted')
      .option('-O, --output-format <fmt>', 'target format: raw, qcow2, qed, vdi', 'raw')
      .option('-c, --compress', 'compress data clusters (qcow2 target)')
      .option('-o, --options <opts>', 'target format options, key=value[,key=value...] (repeatable)', collect)
      .option('-B, --backing <file>', 'backing file of the target; only what differs from it is written')
      .option('-F, --backing-format <fmt>', 'format of the backing file (required with -B)')
      .option('-m, --coroutines <n>', 'requests in flight (default 8; 4 into a local image without -c)')
      .option('-W, --out-of-order', 'allow out-of-order writes (always done: accepted for qemu-img compatibility)')
      .option('-n, --skip-create', 'write into the existing target instead of creating it')
      .option('--threads <n>', 'compression threads (default: one per core; one fewer for zstd)')
      .option('--allow-backing <path>', "also allow the source's backing files under PATH (repeatable)", collect)
      .option('-t, --cache <mode>', 'unsafe: no flush (default, as qemu-img); writeback: flush the target before exiting')
      .option('-p, --progress', 'show a progress bar even when not on a terminal')
      .option('-q, --quiet', 'no progress bar')
      .option('--json', 'print what was read and written as JSON')
      .action(lazy(() => import('./commands/convert.js')));
  },
  compare: (p) => {
    p
      .command('compare')
      .summary('compare the guest-visible contents of two images')
      .description(
        'Compare A and B as qemu-img compare does. Exit status: 0 identical,\n' +
          '1 different (the first differing offset is printed), 2 an error. Images of\n' +
          'different sizes compare equal when the extra part of the larger one reads as\n' +
          'zeros, unless -s (strict) is given.',
      )
      .argument('<a>', 'first image or NBD URI')
      .argument('<b>', 'second image or NBD URI')
      .option('-f, --format <fmt>', 'format of A; probed when omitted')
      .option('-F, --format-b <fmt>', 'format of B; probed when omitted')
      .option('-s, --strict', 'sizes and allocation must match too')
      .option('-p, --progress', 'show a progress bar')
      .option('-q, --quiet', 'print nothing; the exit status tells')
      .option('--json', 'print {"identical": bool, "offset": N} as JSON')
      .action(lazy(() => import('./commands/compare.js')));
  },
  commit: (p) => {
    p
      .command('commit')
      .summary("write an overlay's changes into its backing file")
      .description(
        'Copy the data OVERLAY holds itself into its backing file (or, with -b, into\n' +
          'BASE further down the chain, with everything in between), then empty OVERLAY\n' +
          'as qemu-img commit does, unless -d (-b implies -d).',
      )
      .argument('<overlay>', 'qcow2 or qed overlay')
      .option('-f, --format <fmt>', "OVERLAY's format; probed when omitted")
      .option('-b, --base <file>', 'commit into this image of the backing chain (default: the backing file)')
      .option('-d, --keep', 'do not empty OVERLAY afterwards')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable)', collect)
      .option('-p, --progress', 'show a progress bar')
      .option('-q, --quiet', 'print nothing on success')
      .action(lazy(() => import('./commands/commit.js')));
  },
  rebase: (p) => {
    p
      .command('rebase')
      .summary('change the backing file of an overlay')
      .description(
        'Make NEW the backing file of OVERLAY. Safe mode (the default) first copies\n' +
          'into OVERLAY every range where the old backing chain and NEW differ, so the\n' +
          'guest sees the same data. -u only rewrites the header (NEW must hold the same\n' +
          'data). -b "" removes the backing file (safe mode copies it all in).',
      )
      .argument('<overlay>', 'qcow2 or qed overlay')
      .requiredOption('-b, --backing <file>', 'the new backing file ("" for none)')
      .option('-F, --backing-format <fmt>', 'format of the new backing file (recorded; probed when omitted)')
      .option('-f, --format <fmt>', "OVERLAY's format; probed when omitted")
      .option('-u, --unsafe', 'only rewrite the header')
      .option('--allow-backing <path>', 'also allow backing files under PATH (repeatable)', collect)
      .option('-p, --progress', 'show a progress bar')
      .option('-q, --quiet', 'print nothing on success')
      .action(lazy(() => import('./commands/rebase.js')));
  },
  measure: (p) => {
    p
      .command('measure')
      .summary('how large a new image would be (qemu-img measure)')
      .argument('[src]', 'the image to measure a conversion of')
      .option('--size <size>', 'measure a new empty image of this size instead')
      .option('-f, --format <fmt>', 'source format; probed when omitted')
      .option('-O, --output-format <fmt>', 'target format: raw or qcow2', 'raw')
      .option('-o, --options <opts>', 'target format options (repeatable)', collect)
      .option('--json', 'print JSON (required, fully-allocated)')
      .option('--output <fmt>', 'human or json (qemu-img spelling)')
      .action(lazy(() => import('./commands/measure.js')));
  },
  destroy: (p) => {
    p
      .command('destroy')
      .summary('delete an image, refusing while it is attached or is the backing file of another image')
      .argument('<image>', 'the image file')
      .option('--force', 'delete even when attached or used as a backing file')
      .option('-q, --quiet', 'print nothing on success')
      .action(lazy(() => import('./commands/destroy.js')));
  },
};

/**
 * The program with every command, or only `command` when it names one: defining the other twenty
 * costs each command ~2 ms, and commander needs them only for the top-level help and for
 * suggesting a command for a typo.
 */
export function buildProgram(command?: string): Command {
  const program = new Command('imgbd')
    .description('Disk images (raw, qcow2, qed, vdi) as block devices: an NBD server, client and image tools.')
    .version('0.1.0')
    .showHelpAfterError("(run 'imgbd <command> --help' for usage)")
    .configureOutput({ outputError: (str, write) => write(str) })
    .exitOverride()
    // `run` passes everything after its root filesystem to CMD untouched.
    .enablePositionalOptions();

  const only = command !== undefined && Object.hasOwn(COMMANDS, command) ? [COMMANDS[command]!] : Object.values(COMMANDS);
  for (const define of only) define(program);
  return program;
}

export async function runCli(argv: string[]): Promise<void> {
  const program = buildProgram(argv[0]);
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (err) {
    process.exitCode = reportError(err);
    return;
  }
  if (process.exitCode === undefined) process.exitCode = EXIT.OK;
}

// The guest's /init (busybox sh) and its /sbin/modprobe. Kept as strings so the compiled
// test tree carries them; the initramfs cache key hashes them, so an edit rebuilds it.
//
// Boot contract with harness.ts:
//   - virtio-9p tag "scratch": the host scratch dir; /.imgbd-vm/config.sh in it sets
//     IMGBD_SCRATCH (its host path), IMGBD_CWD, and defines mount_extra_shares.
//   - virtio-9p tag "root": the host's / (read-only), chrooted into at /newroot.
//   - The script's combined output goes to .imgbd-vm/output.log, its exit status to
//     .imgbd-vm/exit-code, both in the scratch share.

export const GUEST_INIT = `#!/bin/sh
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "imgbd-vm: $*" > /dev/console; }
die() { say "FATAL: $*"; poweroff -f; sleep 5; reboot -f; }
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || die "insmod $m failed"
done
P9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $P9 scratch /scratch || die "cannot mount scratch share"
. /scratch/.imgbd-vm/config.sh || die "cannot read config.sh"
R=/newroot
mount -t 9p -o $P9,ro root $R || die "cannot mount root share"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
mkdir -p $R/run/lock
mount -t tmpfs -o size=512m tmpfs $R/tmp
mkdir -p "$R$IMGBD_SCRATCH" 2>/dev/null
mount --bind /scratch "$R$IMGBD_SCRATCH" || die "cannot bind scratch at $IMGBD_SCRATCH"
mount_extra_shares "$R" "$P9" || die "cannot mount extra shares"
echo /sbin/modprobe > /proc/sys/kernel/modprobe
say "running script"
chroot $R /usr/bin/env -i \\
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb \\
  IMGBD_VM=1 IMGBD_VM_SCRATCH="$IMGBD_SCRATCH" IMGBD_VM_RESULTS="$IMGBD_SCRATCH/results.jsonl" \\
  /bin/sh -c 'cd "$1" && exec /bin/sh "$2"' sh "$IMGBD_CWD" "$IMGBD_SCRATCH/.imgbd-vm/script.sh" \\
  > /scratch/.imgbd-vm/output.log 2>&1 < /dev/null
echo $? > /scratch/.imgbd-vm/exit-code
sync
say "script done"
poweroff -f
`;

// The kernel runs this for request_module() (ext4 on mount, nbd on open of a missing node):
// the modules and their dependency data live in the host root, not in the initramfs.
export const GUEST_MODPROBE = `#!/bin/sh
exec /bin/chroot /newroot /sbin/modprobe "$@"
`;

/** Loaded in this order by /init: the 9p transport needs virtio-pci, 9p needs netfs/fscache. */
export const BOOT_MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_legacy_dev',
  'virtio_pci_modern_dev',
  'virtio_pci',
  '9pnet',
  '9pnet_virtio',
  'netfs',
  'fscache',
  '9p',
] as const;

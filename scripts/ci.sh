#!/usr/bin/env bash
# The one command that tests imgbd on a fresh machine: installs the Debian peers the tests
# talk to when they are missing, the npm dependencies, then lints, typechecks and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

peers=(qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin
       nbdsh:libnbd-bin nbdkit:nbdkit nbd-client:nbd-client fio:fio openssl:openssl
       sfdisk:fdisk partx:util-linux blkid:util-linux mkswap:util-linux mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs
       mkfs.btrfs:btrfs-progs mkfs.vfat:dosfstools mksquashfs:squashfs-tools mkfs.erofs:erofs-utils cryptsetup:cryptsetup-bin
       mcopy:mtools debugfs:e2fsprogs e2fsck:e2fsprogs xfs_db:xfsprogs
       qemu-system-x86_64:qemu-system-x86 busybox:busybox-static modprobe:kmod)
missing=()
for p in "${peers[@]}"; do
  command -v "${p%%:*}" >/dev/null 2>&1 || missing+=("${p#*:}")
done
# The kernel tests boot Debian's kernel (it has the nbd module; the host's may not).
ls /lib/modules/*/kernel/drivers/block/nbd.ko* >/dev/null 2>&1 || missing+=(linux-image-amd64)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing test peers: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

npm ci --no-audit --no-fund
npm run lint
npm run typecheck
CI=${CI:-true} npm test

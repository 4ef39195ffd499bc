// The guest half of run.test.ts, as sh (kept in a .ts module so the compiled test tree
// carries it). Expects SH_CHECK_PRELUDE, $IMGBD (the CLI command), $HELLO and $SHIM_MODE.

export const GUEST_HELPERS = String.raw`
S="$IMGBD_VM_SCRATCH"
modprobe nbd nbds_max=16 max_part=16
mkdir -p /tmp/m5

# pid of the process whose argv is exactly "$*"
pid_of() {
  want="$* "
  for p in /proc/[0-9]*; do
    [ "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" = "$want" ] && { basename "$p"; return 0; }
  done
  return 1
}
no_nbd_connected() { ! ls /sys/block/nbd*/pid >/dev/null 2>&1; }
no_ext4_mounted() { ! grep -q ' - ext4 ' /proc/self/mountinfo; }
sleep_gone() { ! pid_of sleep "$1" >/dev/null; }
# Exited: no /proc entry, or a zombie (orphans wait for this guest's minimal init to reap them).
exited() { st=$(cat "/proc/$1/stat" 2>/dev/null) || return 0; case "$st" in *") Z "*) return 0;; esac; return 1; }
line() { printf '%s\n' "$1" | sed -n "$2p"; }
`;

export const RUN_SUITE = String.raw`
SUITE=run
A=$($IMGBD run nbd:$S/rootfs.qcow2:1 -- sh -c 'cat /etc/hello; echo "pid=$$ host=$(hostname) mnt=$(readlink /proc/self/ns/mnt) pidns=$(readlink /proc/self/ns/pid)"; echo "dev=$(ls /dev | tr "\n" " ")"; if touch /etc/x 2>/dev/null; then echo rw; else echo ro; fi; exit 7' 2>/tmp/runA.err)
rcA=$?
timing run-first
check run-output test "$(line "$A" 1)" = "$HELLO"
check run-status-7 sh -c "test $rcA -eq 7 || { echo rc=$rcA; cat /tmp/runA.err; exit 1; }"
L2=$(line "$A" 2)
check run-pid1-and-namespaces sh -c "case '$L2' in 'pid=1 host=imgbd mnt='*) ;; *) echo '$L2'; exit 1;; esac; test '$(readlink /proc/self/ns/mnt)' != \"\$(echo '$L2' | sed 's/.*mnt=\([^ ]*\).*/\1/')\" && test '$(readlink /proc/self/ns/pid)' != \"\$(echo '$L2' | sed 's/.*pidns=//')\""
check run-dev-minimal test "$(line "$A" 3)" = "dev=fd full null ptmx pts random shm stderr stdin stdout tty urandom zero "
check run-readonly-root test "$(line "$A" 4)" = ro
$IMGBD run nbd:$S/rootfs.qcow2:1 no-such-command 2>/tmp/run127.err
rc=$?
check run-not-found-127 sh -c "test $rc -eq 127 && grep -q 'no-such-command' /tmp/run127.err || { echo rc=$rc; cat /tmp/run127.err; exit 1; }"
check after-run-nothing-left sh -c 'no_nbd_connected() { ! ls /sys/block/nbd*/pid >/dev/null 2>&1; }; no_nbd_connected && ! grep -q " - ext4 " /proc/self/mountinfo && ! ls /run/imgbd/nbd*.json 2>/dev/null'
timing run-checks

imgbd_bg run nbd:$S/rootfs.qcow2:1 sleep 300 2>/tmp/runT.err &
P=$!
wait_for 60 pid_of sleep 300 >/dev/null
kill -TERM $P; sleep 1; kill -TERM $P
wait $P
rc=$?
check run-sigterm-twice-137 sh -c "test $rc -eq 137 || { echo rc=$rc; cat /tmp/runT.err; exit 1; }"

$IMGBD run --rw nbd:$S/rw.qcow2:1 -- sh -c 'echo "written inside the container" > /root/written' 2>/tmp/runW.err
rc=$?
check run-rw-write sh -c "test $rc -eq 0 || { echo rc=$rc; cat /tmp/runW.err; exit 1; }"
timing run-signal-rw

imgbd_bg run nbd:$S/rootfs.qcow2:1 sleep 600 2>/tmp/runK.err &
P=$!
check sigkill-cmd-running wait_for 60 pid_of sleep 600
SUP=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/imgbd/nbd*.json | head -1)
kill -9 $P
timing sigkill-start
check sigkill-cmd-gone wait_for 20 sleep_gone 600
check sigkill-device-released wait_for 30 no_nbd_connected
check sigkill-supervisor-found sh -c "test -n '$SUP' || { echo 'no supervisor pid in /run/imgbd'; exit 1; }" && check sigkill-supervisor-gone wait_for 20 exited "$SUP"
check sigkill-nothing-mounted no_ext4_mounted
timing sigkill-teardown
wait $P 2>/dev/null
`;

export const SHIM_SUITE = String.raw`
SUITE=shim
rm -rf /tmp/shimbin
check install-shim $IMGBD qemu-nbd --install-shim /tmp/shimbin
QN=/tmp/shimbin/qemu-nbd
export IMGBD_SHIM_MODE="$SHIM_MODE"
$QN -c /dev/nbd5 $S/shim.qcow2 2>/tmp/qn5.err &
QP=$!
check c-partition-node wait_for 60 sh -c 'test -e /sys/block/nbd5/pid && test -b /dev/nbd5p1 && test -e /sys/block/nbd5/nbd5p1'
check c-busy-refused sh -c "! $QN -c /dev/nbd5 $S/rootfs.qcow2 2>&1 | grep -q . || $QN -c /dev/nbd5 $S/rootfs.qcow2 2>&1 | grep -qi 'connected\|busy'; ! $QN -c /dev/nbd5 $S/rootfs.qcow2 >/dev/null 2>&1"
check c-mount-read sh -c "mount /dev/nbd5p1 /tmp/m5 && test \"\$(cat /tmp/m5/etc/hello)\" = '$HELLO' && echo shim > /tmp/m5/root/shim && umount /tmp/m5"
timing shim-connect
check d-disconnects sh -c "test \"\$($QN -d /dev/nbd5)\" = '/dev/nbd5 disconnected'"
wait $QP
rc=$?
check c-exit-0 sh -c "test $rc -eq 0 || { echo rc=$rc; cat /tmp/qn5.err; exit 1; }"
check d-released sh -c 'test ! -e /sys/block/nbd5/pid && test "$(cat /sys/block/nbd5/size)" = 0'
check d-unconnected-ok $QN -d /dev/nbd5
timing shim-disconnect
`;

export const LXC_SUITE = String.raw`
SUITE=lxc
test -x /tmp/shimbin/qemu-nbd || $IMGBD qemu-nbd --install-shim /tmp/shimbin >/dev/null
export IMGBD_SHIM_MODE="$SHIM_MODE"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /tmp/lxcbin /tmp/lxcreal /tmp/lxc/c1
# Each PATH directory LXC gets holds only a qemu-nbd that records its arguments, then runs
# the drop-in (lxcbin) or QEMU's own (lxcreal), so both runs can be compared call by call.
printf '#!/bin/sh\necho "$*" >> /tmp/lxc-shim.calls\nexec /tmp/shimbin/qemu-nbd "$@"\n' > /tmp/lxcbin/qemu-nbd
printf '#!/bin/sh\necho "$*" >> /tmp/lxc-real.calls\nexec /usr/bin/qemu-nbd "$@"\n' > /tmp/lxcreal/qemu-nbd
chmod +x /tmp/lxcbin/qemu-nbd /tmp/lxcreal/qemu-nbd
# LXC 5.0's rootfs pinning (conf.c lxc_rootfs_init) opens lxc.rootfs.path minus "nbd:" but with
# the ":1" suffix, and aborts on ENOENT ("Failed to handle rootfs pinning") before the nbd
# backend runs: a file of that literal name lets it through (a non-directory is not pinned).
ln -sf lxc.qcow2 "$S/lxc.qcow2:1"
cat > /tmp/lxc/c1/config <<EOF
lxc.uts.name = c1
lxc.rootfs.path = nbd:$S/lxc.qcow2:1
lxc.init.cmd = /etc/lxc-init
lxc.apparmor.profile = unconfined
lxc.net.0.type = empty
lxc.console.path = none
lxc.tty.max = 0
lxc.pty.max = 1
lxc.mount.auto = proc:mixed sys:ro
lxc.autodev = 1
EOF
errors() { grep ' ERROR ' "$1" | sed 's/^.* ERROR *//' | head -3 | tr '\n' ' '; }
lxc_run() { # PATH-dir log
  # LXC polls for /dev/nbdNpM to exist: nodes left by earlier attaches (no udev) would fool it.
  rm -f /dev/nbd*p*
  PATH=$1 /usr/bin/timeout 240 /usr/bin/lxc-start -n c1 -P /tmp/lxc -F -l DEBUG -o "$2" </dev/null >/tmp/lxc-out 2>&1
}
if [ -x /usr/bin/lxc-start ]; then
  lxc_run /tmp/lxcreal /tmp/lxc/real.log
  RC_REAL=$?
  wait_for 30 no_nbd_connected
  timing lxc-with-qemu-nbd
  printf '#!/bin/sh\necho "$0 $*" >> /tmp/real-qemu-nbd-called\nexit 1\n' > /tmp/fake-qemu-nbd
  chmod +x /tmp/fake-qemu-nbd
  # From here the real qemu-nbd only leaves a trace: it must not be what LXC runs.
  mount --bind /tmp/fake-qemu-nbd /usr/bin/qemu-nbd
  lxc_run /tmp/lxcbin /tmp/lxc/shim.log
  RC_SHIM=$?
  timing lxc-with-shim
  SUITE=lxc-info
  report lxc-start-qemu-nbd "$([ $RC_REAL -eq 0 ] && echo true || echo false)" "rc=$RC_REAL $(errors /tmp/lxc/real.log)"
  report lxc-start-shim "$([ $RC_SHIM -eq 0 ] && echo true || echo false)" "rc=$RC_SHIM $(errors /tmp/lxc/shim.log)"
  touch /tmp/lxc-real.calls /tmp/lxc-shim.calls
  report lxc-qemu-nbd-calls true "with qemu-nbd: [$(tr '\n' ';' < /tmp/lxc-real.calls)] with the drop-in: [$(tr '\n' ';' < /tmp/lxc-shim.calls)]"
  SUITE=lxc
  # An LXC that runs qemu-nbd at all (5.0.2 does not: see run.test.ts) must run the drop-in the same way.
  if [ -s /tmp/lxc-real.calls ]; then
    check lxc-called-shim-c grep -q "^-c /dev/nbd[0-9]* $S/lxc.qcow2\$" /tmp/lxc-shim.calls
    check lxc-called-shim-d grep -q "^-d /dev/nbd[0-9]*\$" /tmp/lxc-shim.calls
  fi
  check lxc-calls-same-as-qemu-nbd diff /tmp/lxc-real.calls /tmp/lxc-shim.calls
  check lxc-real-qemu-nbd-unused sh -c 'test ! -e /tmp/real-qemu-nbd-called || cat /tmp/real-qemu-nbd-called'
  check lxc-device-released wait_for 40 no_nbd_connected
  check lxc-same-outcome-as-qemu-nbd test "$RC_REAL $(errors /tmp/lxc/real.log)" = "$RC_SHIM $(errors /tmp/lxc/shim.log)"
  if [ $RC_SHIM -eq 0 ]; then check lxc-output grep -qx "$HELLO" /tmp/lxc-out; fi
  cp /tmp/lxc/real.log /tmp/lxc/shim.log /tmp/lxc-out "$S/" 2>/dev/null
  umount /usr/bin/qemu-nbd
fi
true
`;

export const RUN_GUEST_SCRIPT = [GUEST_HELPERS, RUN_SUITE, SHIM_SUITE, LXC_SUITE].join('\n');

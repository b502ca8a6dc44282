#!/bin/busybox sh
# PID 1 of the flyio test guest; tests/vm/harness.py packs it into the initramfs as /init.
#
# It loads the modules listed in /modules/order (already in dependency order), mounts the
# host's root read-only over 9p on /host, mounts the writable share at the same absolute
# path inside it (so host and guest paths line up), chroots there and runs the command
# script named on the kernel command line. The host finds the exit code in the marker
# line printed on the serial console. Nothing here may read from stdin: there is none.
#
# Kernel command line parameters (written by the harness, validated there: no spaces,
# no glob or shell characters):
#   flyio.run=NONCE       tags the marker lines, so a command printing a look-alike
#                         marker cannot fool the host
#   flyio.share=PATH      absolute path of the writable share, on host and guest alike
#   flyio.script=PATH     the command script (inside the share), run with /bin/sh
#   flyio.rootcache=MODE  9p cache mode of the read-only host root (loose|none)
#   flyio.sharecache=MODE 9p cache mode of the writable share (mmap|none)

/bin/busybox --install -s /bin
export PATH=/bin
set -f  # the command line is split on spaces below; never glob it

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

run=unknown share="" script="" rootcache=loose sharecache=mmap repo=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    flyio.run=*) run="${arg#flyio.run=}" ;;
    flyio.share=*) share="${arg#flyio.share=}" ;;
    flyio.script=*) script="${arg#flyio.script=}" ;;
    flyio.rootcache=*) rootcache="${arg#flyio.rootcache=}" ;;
    flyio.sharecache=*) sharecache="${arg#flyio.sharecache=}" ;;
    flyio.repo=*) repo="${arg#flyio.repo=}" ;;
  esac
done

# A harness failure (not the command's): tell the host why, then power off.
fail() {
  printf '\nFLYIO-VM-FAIL %s %s\n' "$run" "$*"
  sleep 0.1
  poweroff -f
}

# Modules: no modprobe and no udev here, so insmod in the order the harness computed.
# Keep going on a failure (the command may not need that module) but say so.
while read -r mod; do
  insmod "/modules/$mod.ko" || echo "flyio-vm: insmod $mod failed"
done < /modules/order

ip link set lo up 2>/dev/null
hostname flyio-vm

[ -n "$share" ] && [ -n "$script" ] || fail "kernel command line lacks flyio.share or flyio.script"

R=/host
# msize: the largest 9p message virtio takes on 6.1; bigger messages mean fewer round trips.
mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=$rootcache,ro" hostroot "$R" \
  || fail "cannot mount the host root (9p tag hostroot)"
mount -t proc proc "$R/proc" || fail "cannot mount proc in the chroot"
mount -t sysfs sysfs "$R/sys" || fail "cannot mount sysfs in the chroot"
mount -t devtmpfs devtmpfs "$R/dev" || fail "cannot mount devtmpfs in the chroot"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts"
mount -t tmpfs tmpfs "$R/dev/shm"
# A checkout under /tmp or /run (CI clones anywhere) would vanish under the tmpfs mounts:
# keep a handle on it first and bind it back at the same path afterwards (read-only).
case "$repo" in
  /tmp/*|/run/*) mkdir -p /keep-repo && mount -o bind "$R$repo" /keep-repo || fail "cannot keep the checkout $repo" ;;
  *) repo="" ;;
esac
mount -t tmpfs tmpfs "$R/tmp" || fail "cannot mount tmpfs on /tmp"
mount -t tmpfs tmpfs "$R/run" || fail "cannot mount tmpfs on /run"
if [ -n "$repo" ]; then
  mkdir -p "$R$repo" && mount -o bind /keep-repo "$R$repo" || fail "cannot bind the checkout back on $repo"
fi
# After the tmpfs mounts: a share under /tmp needs its mount point created in the tmpfs;
# elsewhere it already exists on the (read-only) host root. cache=mmap: write() still goes
# straight to the host file, so what the guest wrote survives a power cut (QEMU killed),
# but shared mmap works, which SQLite's WAL index (images.db-shm) needs: under cache=none
# every SQLite open in WAL mode fails with "disk I/O error".
mkdir -p "$R$share" 2>/dev/null
mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=$sharecache" share "$R$share" \
  || fail "cannot mount the writable share on $share (9p tag share)"

# Own line: the firmware leaves its last line unterminated.
printf '\nFLYIO-VM-BEGIN %s\n' "$run"
# env -i: the command sees only what the script exports, not the kernel's init environment.
chroot "$R" /usr/bin/env -i /bin/sh "$script"
rc=$?
# Own line too: the command's output may not end with a newline.
printf '\nFLYIO-VM-EXIT %s %s\n' "$run" "$rc"
# Let the serial port drain the marker before the power goes.
sleep 0.1
poweroff -f

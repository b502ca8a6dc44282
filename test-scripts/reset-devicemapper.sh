#!/usr/bin/env bash
# Emergency reset after a reboot or panic (OPERATIONS.md, Emergency Recovery, Step 2).
# Safely unmounts all devices (with timeouts), deactivates all thin devices (with timeouts),
# removes the thin pool and recreates it from scratch.
# WARNING: this destroys all unpacked images; they must be downloaded and unpacked again.
#
#   sudo ./test-scripts/reset-devicemapper.sh [--state-dir DIR] [--yes]
#
# Works on both backends: device-mapper (dmsetup) where /dev/mapper/control answers, and
# the blockfile pool (loop devices on an XFS file) elsewhere. Afterwards clean the database
# as the guide's Step 3 says (the commands are printed at the end).
set -uo pipefail

state_dir="${FLYIO_STATE_DIR:-/var/lib/flyio}"
assume_yes=0
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) state_dir="$2"; shift 2 ;;
    --yes) assume_yes=1; shift ;;
    *) echo "usage: $0 [--state-dir DIR] [--yes]" >&2; exit 2 ;;
  esac
done
step_timeout=30
failures=0

if [ "$assume_yes" -ne 1 ]; then
  read -r -p "This destroys every unpacked image in ${state_dir}. Type 'reset' to go on: " answer
  [ "$answer" = "reset" ] || { echo "nothing done"; exit 1; }
fi

run() {  # a step with a timeout; a failure is reported and counted, the reset goes on
  if ! timeout "$step_timeout" "$@"; then
    echo "WARN: '$*' failed or timed out; a reboot may be needed" >&2
    failures=$((failures + 1))
  fi
}

unmount_backing() {  # unmount whatever is mounted from device $1
  findmnt -rn -S "$1" -o TARGET 2>/dev/null | while read -r target; do
    echo "unmounting ${target}"
    run umount "$target"
  done
}

detach_loops_of() {  # detach every loop device backed by file $1
  [ -e "$1" ] || return 0
  losetup -j "$1" -O NAME -n 2>/dev/null | while read -r dev; do
    echo "detaching ${dev} ($1)"
    run losetup -d "$dev"
  done
}

if [ -e /dev/mapper/control ] && dmsetup version >/dev/null 2>&1; then
  echo "== device-mapper pool in ${state_dir}"
  for dev in $(dmsetup ls --target thin 2>/dev/null | awk '$1 ~ /^thin-/ {print $1}'); do
    unmount_backing "/dev/mapper/${dev}"
    echo "deactivating ${dev}"
    run dmsetup remove "$dev"
  done
  if dmsetup info pool >/dev/null 2>&1; then
    echo "removing pool"
    run dmsetup remove pool
  fi
else
  echo "== blockfile pool in ${state_dir} (no device-mapper on this kernel)"
  if [ -d "${state_dir}/pool" ]; then
    for image in "${state_dir}"/pool/thin-*.img; do
      [ -e "$image" ] || continue
      for dev in $(losetup -j "$image" -O NAME -n 2>/dev/null); do
        unmount_backing "$dev"
      done
      detach_loops_of "$image"
    done
    if findmnt -rn "${state_dir}/pool" >/dev/null 2>&1; then
      echo "unmounting pool"
      run umount "${state_dir}/pool"
    fi
  fi
fi
detach_loops_of "${state_dir}/pool_data"
detach_loops_of "${state_dir}/pool_meta"
if [ "$failures" -gt 0 ]; then
  echo "ERROR: ${failures} step(s) failed; pool files kept. Check for D-state processes and reboot." >&2
  exit 1
fi
rm -f "${state_dir}/pool_data" "${state_dir}/pool_meta"
# Every device is gone with the pool, so are the records they kept of themselves (the
# images' records stay: processing an image again finds it).
rm -rf "${state_dir}/records/devices"
# The blockfile pool's directory mode (no XFS) keeps device files in pool/ itself.
if [ -d "${state_dir}/pool" ] && ! findmnt -rn "${state_dir}/pool" >/dev/null 2>&1; then
  rm -f "${state_dir}"/pool/thin-*.img
fi

cli=(flyio-image-manager)
command -v flyio-image-manager >/dev/null 2>&1 || cli=("$(dirname "$0")/../.venv/bin/python" -m cli)
echo "== recreating the pool"
(cd "$(dirname "$0")/.." && "${cli[@]}" --state-dir "$state_dir" setup-pool) || exit 1
cat <<MSG
== pool recreated; every unpacked image is gone. Clean the database (OPERATIONS.md, Step 3):
sqlite3 ${state_dir}/images.db "DELETE FROM unpacked_images;"
sqlite3 ${state_dir}/images.db "DELETE FROM snapshots;"
MSG

# Sourced by the scripts here: re-run the calling script as root through sudo when it is
# not root already (as root, sudo is never needed, so a box without it works too).
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: $(basename "$0") needs root: run it as root, or install sudo" >&2
    exit 1
  fi
  exec sudo --preserve-env=FLYIO_STATE_DIR,FLYIO_BACKEND,AWS_ENDPOINT_URL "$PWD/scripts/$(basename "$0")" "$@"
fi

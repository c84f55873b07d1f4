#!/bin/sh
# Set up a development/test environment on Debian bookworm (run as root):
# apt packages, then a virtualenv in .venv with replicator installed editable.
# Idempotent: a second run only checks that everything is there.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="python3-venv python3-dev gcc pkg-config libsystemd-dev iproute2 rsync lsyncd acl
  systemd systemd-container debootstrap dpkg-dev debhelper build-essential fakeroot lintian man-db gdb util-linux"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "dev-setup: installing apt packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -e '.[test,systemd,metrics,blake3]' >.venv/pip.log 2>&1 \
    || { cat .venv/pip.log >&2; echo "dev-setup: pip install failed" >&2; exit 1; }
.venv/bin/python -c "import replicator, watchdog, pydantic, systemd.daemon, xxhash, blake3" \
    || { echo "dev-setup: the virtualenv is incomplete" >&2; exit 1; }
echo "dev-setup: ready (.venv)"

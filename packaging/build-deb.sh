#!/bin/sh
# Build replicator_<version>_<arch>.deb from this work tree (committed and
# uncommitted files alike, ignored ones left out) into packaging/out/.
#
#   ./packaging/build-deb.sh              always build
#   ./packaging/build-deb.sh --if-changed reuse packaging/out/*.deb if its
#                                         inputs are unchanged
#
# Needs (Debian bookworm, see packaging/dev-setup.sh): dpkg-dev debhelper
# python3-venv python3-dev libsystemd-dev pkg-config gcc, and PyPI (pip
# fetches pydantic, watchdog, systemd-python, ... into the bundled venv).
# Prints the path of the .deb on the last line.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
out="$top/packaging/out"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' replicator/__init__.py)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb="$out/replicator_${version}_${arch}.deb"

# The inputs: every file git would commit, by content, less what the package
# never contains (tests, benchmarks, CI), so editing a test reuses the .deb.
files=$(git ls-files -co --exclude-standard | grep -Ev '^(packaging/out|tests|bench|\.ci)/' | LC_ALL=C sort)
inputs=$(printf '%s\n' "$files" | while IFS= read -r f; do
    [ -f "$f" ] && printf '%s  %s\n' "$(sha256sum <"$f" | cut -c1-64)" "$f"
done | sha256sum | cut -c1-64)
if [ "${1:-}" = "--if-changed" ] && [ -f "$deb" ] && [ "$(cat "$deb.inputs" 2>/dev/null)" = "$inputs" ]; then
    echo "build-deb: $deb is up to date"
    echo "$deb"
    exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/replicator-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
src="$tmp/replicator-$version"
mkdir -p "$src"
printf '%s\n' "$files" | while IFS= read -r f; do
    [ -f "$f" ] && printf '%s\n' "$f"
done | tar -cf - -T - | tar -xf - -C "$src"
cp -r packaging/debian "$src/debian"

# A reproducible date: the last commit's (or now, outside git).
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -qv '^?? packaging/out' && echo " plus uncommitted changes" || true)
maint=$(sed -n 's/^Maintainer: //p' packaging/debian/control)
cat >"$src/debian/changelog" <<EOF
replicator ($version) unstable; urgency=medium

  * Built from git $rev$dirty.

 -- $maint  $(date -R -u -d "@$SOURCE_DATE_EPOCH")
EOF

echo "build-deb: building replicator $version for $arch in $tmp"
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$tmp/build.log" 2>&1 || {
    tail -n 60 "$tmp/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
mkdir -p "$out"
cp "$tmp/replicator_${version}_${arch}.deb" "$deb"
cp "$tmp/build.log" "$out/build.log"
echo "$inputs" >"$deb.inputs"
echo "$deb"

#!/bin/sh
# Build the subgraph-metaproxy .deb from a copy of the working tree.
#
#   tools/build-deb.sh [-o OUTDIR] [--nocheck] [--no-lintian]
#
# The copy keeps dpkg-buildpackage's debian/ scratch files and its output in
# the parent directory out of the tree. Debian's tools run with PATH limited
# to the system directories and an emptied environment: pybuild calls
# python3.X by name, and the first one on this machine's PATH is not
# Debian's and cannot import the Debian modules.
#
# Output: OUTDIR (default build/deb) holds subgraph-metaproxy_*.deb, the
# .changes and .buildinfo files, and the source package (.dsc, .tar.xz).
# Unless --no-lintian, both must then pass
# `lintian --fail-on error,warning --pedantic` with nothing printed.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out="$top/build/deb"
nocheck=
lint=yes
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out=$2; shift 2 ;;
        --nocheck) nocheck=yes; shift ;;
        --no-lintian) lint=; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument: $1 (see --help)" >&2; exit 64 ;;
    esac
done

syspath=/usr/sbin:/usr/bin:/sbin:/bin
for tool in dpkg-buildpackage dh pybuild; do
    if ! PATH=$syspath command -v "$tool" >/dev/null; then
        echo "build-deb.sh: $tool is missing: apt-get install dpkg-dev debhelper dh-python pybuild-plugin-pyproject" >&2
        exit 69
    fi
done
if [ -n "$lint" ] && ! PATH=$syspath command -v lintian >/dev/null; then
    echo "build-deb.sh: lintian is missing: apt-get install lintian (or pass --no-lintian)" >&2
    exit 69
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/metaproxy-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/subgraph-metaproxy"
mkdir "$src"
# The working tree as it is, less VCS data, caches and earlier output.
tar -C "$top" -cf - \
    --exclude=./.git --exclude=./build --exclude=./.pybuild \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude='*.egg-info' . | tar -C "$src" -xf -

# The source package first, from the clean copy (native: one .tar.xz), so
# that lintian checks debian/control, debian/copyright and debian/tests too.
(
    cd "$work"
    env -i PATH=$syspath HOME="$work" LANG=C.UTF-8 \
        timeout 300 dpkg-source --build subgraph-metaproxy >/dev/null
)

opts=${DEB_BUILD_OPTIONS:-}
[ -n "$nocheck" ] && opts="$opts nocheck"
buildprof=
case " $opts " in *" nocheck "*) buildprof=-Pnocheck ;; esac

(
    cd "$src"
    env -i PATH=$syspath HOME="$work" LANG=C.UTF-8 TMPDIR="$work" \
        DEB_BUILD_OPTIONS="$opts" \
        timeout 1200 dpkg-buildpackage -us -uc -b $buildprof
)

mkdir -p "$out"
rm -f "$out"/subgraph-metaproxy_*
cp "$work"/subgraph-metaproxy_*.deb "$work"/subgraph-metaproxy_*.changes \
   "$work"/subgraph-metaproxy_*.buildinfo "$work"/subgraph-metaproxy_*.dsc \
   "$work"/subgraph-metaproxy_*.tar.xz "$out"/

if [ -n "$lint" ]; then
    # lintian warns on stderr when run as root: run it as nobody, on a copy
    # that nobody can read (the tree may live in a directory it cannot).
    lintdir="$work/lintian"
    mkdir -m 0755 "$lintdir"
    cp "$out"/subgraph-metaproxy_* "$lintdir"/
    chmod 0755 "$work"
    chmod 0644 "$lintdir"/*
    runas=
    if [ "$(id -u)" = 0 ]; then
        runas="setpriv --reuid=nobody --regid=nogroup --clear-groups --"
    fi
    report=$(cd "$lintdir" && env -i PATH=$syspath HOME="$lintdir" LANG=C.UTF-8 \
        timeout 600 $runas lintian --fail-on error,warning --pedantic \
        subgraph-metaproxy_*.changes subgraph-metaproxy_*.dsc 2>&1) || {
        printf '%s\n' "$report" >&2
        echo "build-deb.sh: lintian failed" >&2
        exit 1
    }
    if [ -n "$report" ]; then
        printf '%s\n' "$report" >&2
        echo "build-deb.sh: lintian printed the lines above; the package must be lintian-clean" >&2
        exit 1
    fi
    echo "lintian --fail-on error,warning --pedantic: clean"
fi
ls -l "$out"/subgraph-metaproxy_*.deb

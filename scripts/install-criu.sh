#!/bin/sh
# Provide a working CRIU >= 4.0 for xos-sshd, idempotently and quietly.
#
#   scripts/install-criu.sh            install (or confirm) and print nothing when already there
#   scripts/install-criu.sh --print    also print the path of the criu to use
#
# 1. A system `criu` (on PATH) of version >= 4.0 is preferred: nothing is installed.
# 2. Otherwise CRIU 4.1.1 comes from Debian trixie: `apt-get download` with a PRIVATE sources
#    list and private state/cache/lists dirs (the system's apt setup, lists and dpkg database are
#    never touched), the .deb set resolved with `apt-cache depends --recurse` under the same
#    private options (criu, libcompel1 and every library below them, libc6 included), each
#    unpacked with `dpkg -x` into $XOS_CRIU_PREFIX (default /opt/xos-criu), and a wrapper
#    PREFIX/bin/criu runs the unpacked binary through the unpacked dynamic loader with
#    `--library-path`, so the host's older glibc is never mixed in.  Why: Debian 12's criu 3.17
#    fails on kernels >= 6.x here ("vdso: Unexpected rt vDSO area bounds").
# The install is staged in PREFIX.new and renamed into place, so a failed run leaves no half
# prefix; PREFIX/.xos-criu-packages lists the packages and versions, and PREFIX/.xos-criu-installed
# (the same list) appears only once `criu --version` and `criu check` passed.
# Environment: XOS_CRIU_PREFIX, XOS_CRIU_MIRROR (default: the Debian mirror the system's apt
# uses), XOS_CRIU_SUITE (default trixie), XOS_CRIU_CHECK=0 to skip `criu check`.
set -eu

PREFIX=${XOS_CRIU_PREFIX:-/opt/xos-criu}
SUITE=${XOS_CRIU_SUITE:-trixie}
PRINT=""
[ "${1:-}" = "--print" ] && PRINT=1

say() { echo "install-criu: $*" >&2; }
die() { say "$*"; exit 1; }

# version_ok CRIU_COMMAND...: true when `criu --version` says 4.0 or newer.
version_ok() {
  v=$("$@" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 4 ]
}

done_with() {
  [ -n "$PRINT" ] && echo "$1"
  exit 0
}

# 1. a system criu >= 4.0
for sys in "$(command -v criu 2>/dev/null)" /usr/sbin/criu; do
  if [ -n "$sys" ] && [ -x "$sys" ] && version_ok "$sys"; then done_with "$sys"; fi
done

# 2. already installed here (quiet)
if [ -x "$PREFIX/bin/criu" ] && [ -f "$PREFIX/.xos-criu-installed" ] && version_ok "$PREFIX/bin/criu"; then
  done_with "$PREFIX/bin/criu"
fi

case "$PREFIX" in
  /?*) ;;
  *) die "XOS_CRIU_PREFIX must be an absolute path other than / (got '$PREFIX')" ;;
esac
# Never replace a directory this script did not make (a mistyped XOS_CRIU_PREFIX=/usr ...).
if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/.xos-criu-prefix" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
  die "$PREFIX exists and was not made by install-criu.sh; refusing to replace it"
fi
[ "$(id -u)" = 0 ] || die "CRIU >= 4.0 is missing and installing it into $PREFIX needs root"
for tool in apt-get apt-cache dpkg dpkg-deb; do
  command -v "$tool" >/dev/null || die "$tool is needed (a Debian-based system) to fetch CRIU"
done
arch=$(dpkg --print-architecture)

mirror=${XOS_CRIU_MIRROR:-}
if [ -z "$mirror" ]; then
  # The mirror the system already uses for Debian (deb822 or one-line format), never security.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | sed -n 's/^URIs: *\([^ ]*\/debian\/*\)$/\1/p' | head -n1)
  [ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
             | sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian\/*\) .*/\2/p' | head -n1)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring is missing (package debian-archive-keyring)"

work=$(mktemp -d /tmp/xos-criu-apt.XXXXXX)
stage="$PREFIX.new"
cleanup() { rm -rf "$work" "$stage"; }
trap cleanup EXIT INT TERM
mkdir -p "$work/etc" "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs"
: > "$work/status"
echo "deb [arch=$arch signed-by=$keyring] $mirror $SUITE main" > "$work/etc/sources.list"
# apt drops to _apt for downloads: let it write the download dir.
if id _apt >/dev/null 2>&1; then chown _apt "$work/debs" "$work/state/lists/partial" "$work/cache/archives/partial"; fi

# Private everything: sources, parts, lists, cache, and an empty dpkg status so the resolver
# lists the whole closure instead of what the host happens to have installed.
set -- -o "Dir::Etc::SourceList=$work/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null \
       -o "Dir::State=$work/state" -o "Dir::State::Lists=$work/state/lists" \
       -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache" \
       -o "APT::Architecture=$arch" -o "APT::Architectures=$arch"

say "fetching CRIU from Debian $SUITE ($mirror) into $PREFIX"
apt-get -qq "$@" update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "private apt-get update failed"; }
pkgs=$(apt-cache "$@" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances criu libcompel1 | sed -n 's/^\([a-z0-9][a-z0-9.+-]*\)$/\1/p' | sort -u)
echo "$pkgs" | grep -qx criu || die "criu is not in $SUITE at $mirror"
echo "$pkgs" | grep -qx libc6 || die "dependency resolution did not reach libc6: $pkgs"
(cd "$work/debs" && apt-get -qq "$@" download $pkgs) >"$work/download.log" 2>&1 \
  || { cat "$work/download.log" >&2; die "apt-get download failed"; }

rm -rf "$stage"
mkdir -p "$stage/bin"
echo "made by xos-sshd scripts/install-criu.sh; safe to delete" > "$stage/.xos-criu-prefix"
: > "$stage/.xos-criu-packages"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$stage"
  dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >> "$stage/.xos-criu-packages"
done

# Find the unpacked loader and library directories (multiarch triplet, merged /usr or not).
loader=$(cd "$stage" && ls usr/lib64/ld-linux*.so.* lib64/ld-linux*.so.* usr/lib/*/ld-linux*.so.* \
           lib/*/ld-linux*.so.* 2>/dev/null | head -n1)
[ -n "$loader" ] || die "no dynamic loader in the unpacked libc6"
libdirs=$(cd "$stage" && for d in usr/lib/*-linux-gnu lib/*-linux-gnu usr/lib64 lib64; do
            if [ -d "$d" ]; then echo "$d"; fi; done)
[ -n "$libdirs" ] || die "no library directory in the unpacked packages"
libpath() { for d in $libdirs; do printf '%s:' "$1/$d"; done | sed 's/:$//'; }
[ -x "$stage/usr/sbin/criu" ] || die "no usr/sbin/criu in the unpacked criu package"
# Try the staged binary before anything replaces a working prefix.
if ! version_ok "$stage/$loader" --library-path "$(libpath "$stage")" "$stage/usr/sbin/criu"; then
  "$stage/$loader" --library-path "$(libpath "$stage")" "$stage/usr/sbin/criu" --version >&2 || true
  die "the unpacked criu does not run or is older than 4.0"
fi

cat > "$stage/bin/criu" <<EOF
#!/bin/sh
# CRIU from Debian $SUITE unpacked by xos-sshd's scripts/install-criu.sh: run it with its own
# glibc (the host's is older).  --library-path takes precedence over LD_LIBRARY_PATH; callers
# (xos_sshd.cr.criu) run it with a clean environment all the same.
exec $PREFIX/$loader --library-path $(libpath "$PREFIX") --argv0 criu $PREFIX/usr/sbin/criu "\$@"
EOF
chmod 0755 "$stage/bin/criu" "$stage"

# Swap into place: the old prefix (if any) is removed only once the new one is complete.
if [ -e "$PREFIX" ]; then rm -rf "$PREFIX.old"; mv "$PREFIX" "$PREFIX.old"; fi
mv "$stage" "$PREFIX"
rm -rf "$PREFIX.old"

version_ok "$PREFIX/bin/criu" || { "$PREFIX/bin/criu" --version >&2 || true; die "$PREFIX/bin/criu does not run or is older than 4.0"; }
say "$("$PREFIX/bin/criu" --version | head -n1) installed in $PREFIX from: $(echo $pkgs)"
if [ "${XOS_CRIU_CHECK:-1}" != 0 ]; then
  if out=$("$PREFIX/bin/criu" check 2>&1); then
    say "criu check: $(echo "$out" | tail -n1)"
  else
    echo "$out" >&2
    die "criu check failed on this kernel (output above); CRIU is unusable here"
  fi
fi
cp "$PREFIX/.xos-criu-packages" "$PREFIX/.xos-criu-installed"
done_with "$PREFIX/bin/criu"

#!/bin/sh
# Install the Debian packages xos-sshd needs, idempotently and quietly.
#   system-deps.sh run   what `make run` needs (a Python with venv, a C compiler for the
#                        session exec shim)
#   system-deps.sh test  everything the test suite and benchmarks use (with the PostgreSQL
#                        server: the tests of the cluster store start private servers of their
#                        own; no system cluster is created or started)
# Nothing is installed when every package is already there; apt-get update runs at most once.
set -eu

RUN_PKGS="python3 python3-venv gcc libc6-dev make"
TEST_PKGS="$RUN_PKGS python3-dev gcc make libc6-dev libpam0g libpam0g-dev libpam-modules openssh-client openssh-server util-linux bsdutils procps iproute2 valgrind sqlite3 postgresql"

case "${1:-test}" in
  run) wanted=$RUN_PKGS ;;
  test) wanted=$TEST_PKGS ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=""
for pkg in $wanted; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing Debian packages:$missing (run as root to install them)" >&2
  exit 1
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Installing openssh-server must not start a system sshd on port 22 here: a policy-rc.d
# that forbids service starts is put in place for the install only (when none exists).
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1
fi
trap '[ -n "$own_policy" ] && rm -f "$policy"' EXIT
apt-get update -qq >/dev/null
case " $missing " in
  *" postgresql "*)
    # Debian's postgresql makes and enables a "main" cluster on first install unless
    # createcluster.conf says not to: the tests run their own servers (tests/pgserver.py).
    apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    pg_conftool /etc/postgresql-common/createcluster.conf set create_main_cluster false ;;
esac
apt-get install -y -qq --no-install-recommends $missing >/dev/null

#!/bin/sh
# Installs prima on a Linux distribution without the .deb: copies primad and
# primactl to /usr/local/bin, then lets `primad service install` create the
# prima user, /var/lib/prima, /etc/prima/primad.toml (kept if present) and
# the systemd unit, and start it. Run as root.
#
#   packaging/linux/install.sh [--from DIR]          # DIR holds primad and primactl
#   packaging/linux/install.sh --uninstall [--purge]  # --purge also removes state, config, user
#
# Default DIR: target/release of this checkout (cargo build --release -p primad -p primactl).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
from="$here/../../target/release"
action=install
purge=
while [ $# -gt 0 ]; do
    case "$1" in
        --from) from=$2; shift 2 ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=--purge; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (sudo $0 ...)" >&2
    exit 1
fi
bindir=${PRIMA_BINDIR:-/usr/local/bin}
if [ "$action" = uninstall ]; then
    if [ -x "$bindir/primad" ]; then
        "$bindir/primad" service uninstall $purge
    fi
    rm -f "$bindir/primad" "$bindir/primactl"
    echo "removed $bindir/primad and $bindir/primactl"
    exit 0
fi
for b in primad primactl; do
    if [ ! -x "$from/$b" ]; then
        echo "install.sh: $from/$b is missing (build with: cargo build --release -p primad -p primactl)" >&2
        exit 1
    fi
done
install -d "$bindir"
install -m 0755 "$from/primad" "$from/primactl" "$bindir/"
echo "installed primad and primactl in $bindir"
exec "$bindir/primad" service install

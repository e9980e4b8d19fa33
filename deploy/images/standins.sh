#!/usr/bin/env bash
# Stand-ins for the images gemmaq's compose file pulls, for hosts that cannot reach a registry:
# built from Debian bookworm's own packages with debootstrap, then `docker import`ed.
#
#   deploy/images/standins.sh            # builds the four below (skips those already present)
#   deploy/images/standins.sh --force    # rebuilds them
#
#   gemmaq-standin/python:3.11       the Dockerfile's BASE_IMAGE (python3.11 with venv, as `python`)
#   gemmaq-standin/postgres:15       POSTGRES_IMAGE: initdb -E UTF8 from POSTGRES_USER/PASSWORD/DB
#   gemmaq-standin/redis:7           REDIS_IMAGE: redis-server and redis-cli
#   gemmaq-standin/prometheus:2      PROMETHEUS_IMAGE: /usr/bin/prometheus as the entrypoint
#
# Grafana has no Debian package, so it has no stand-in: leave the `monitoring` profile off.
# Needs root (debootstrap, chroot), debootstrap, and a Debian mirror (DEBIAN_MIRROR).
set -euo pipefail
cd "$(dirname "$0")/../.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
WORK=${STANDIN_WORK:-build/standins}
PREFIX=gemmaq-standin
force=${1:-}

have() { [ -z "$force" ] && docker image inspect "$1" >/dev/null 2>&1; }

# apt_in ROOT PACKAGES: Debian's packages (and what they depend on) installed in ROOT.
apt_in() {
  cp /etc/resolv.conf "$1/etc/resolv.conf"
  chroot "$1" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $2 >/dev/null && apt-get clean"
  rm -rf "$1/var/lib/apt/lists"/*
}

# One minimal root, copied for each image; apt runs in a chroot of the copy.
base_root() {
  if [ ! -f "$WORK/root.done" ]; then
    rm -rf "$WORK/root"
    mkdir -p "$WORK"
    debootstrap --variant=minbase "$SUITE" "$WORK/root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    # No service starts inside a chroot's package install; PostgreSQL makes no cluster of its own.
    printf '#!/bin/sh\nexit 101\n' >"$WORK/root/usr/sbin/policy-rc.d"
    chmod +x "$WORK/root/usr/sbin/policy-rc.d"
    mkdir -p "$WORK/root/etc/postgresql-common"
    echo "create_main_cluster = false" >"$WORK/root/etc/postgresql-common/createcluster.conf"
    apt_in "$WORK/root" "python3.11 python3.11-venv ca-certificates passwd"
    ln -sf /usr/bin/python3.11 "$WORK/root/usr/local/bin/python"
    touch "$WORK/root.done"
  fi
}

# image NAME PACKAGES [--change ...]: the base root plus PACKAGES, imported as NAME.
image() {
  local name=$1 packages=$2
  shift 2
  if have "$name"; then
    echo "$name: present"
    return
  fi
  base_root
  local root="$WORK/$(echo "$name" | tr '/:' '__')"
  rm -rf "$root"
  cp -a "$WORK/root" "$root"
  [ -z "$packages" ] || apt_in "$root" "$packages"
  rm -f "$root/usr/sbin/policy-rc.d"
  tar -C "$root" -c . | docker import "$@" - "$name" >/dev/null
  rm -rf "$root"
  echo "$name: built ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
}

path='ENV PATH=/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'

image "$PREFIX/python:3.11" "" --change "$path" --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]'

# The official postgres image's contract, as far as the compose file uses it: POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB on first start, data in /var/lib/postgresql/data, pg_isready.
image "$PREFIX/postgres:15" "postgresql-15 gosu" --change "$path" --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PGDATA=/var/lib/postgresql/data' --change 'EXPOSE 5432' \
  --change 'ENTRYPOINT ["/bin/sh", "-c", "set -e; mkdir -p \"$PGDATA\"; chown -R postgres:postgres \"$PGDATA\"; chmod 700 \"$PGDATA\"; mkdir -p /run/postgresql; chown postgres /run/postgresql; if [ ! -s \"$PGDATA/PG_VERSION\" ]; then echo \"$POSTGRES_PASSWORD\" > /tmp/pw; chown postgres /tmp/pw; gosu postgres initdb -E UTF8 --locale=C.UTF-8 -U \"${POSTGRES_USER:-postgres}\" --pwfile=/tmp/pw --auth-host=scram-sha-256 --auth-local=trust -D \"$PGDATA\"; rm /tmp/pw; echo \"host all all all scram-sha-256\" >> \"$PGDATA/pg_hba.conf\"; gosu postgres pg_ctl -D \"$PGDATA\" -o \"-c listen_addresses=\" -w start; gosu postgres createdb -U \"${POSTGRES_USER:-postgres}\" \"${POSTGRES_DB:-${POSTGRES_USER:-postgres}}\" || true; gosu postgres pg_ctl -D \"$PGDATA\" -m fast -w stop; fi; exec gosu postgres postgres -D \"$PGDATA\" -c listen_addresses=*", "postgres"]'

image "$PREFIX/redis:7" "redis-server redis-tools" --change "$path" --change 'WORKDIR /data' \
  --change 'EXPOSE 6379' --change 'CMD ["redis-server"]'

image "$PREFIX/prometheus:2" "prometheus" --change "$path" --change 'EXPOSE 9090' \
  --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
  --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'

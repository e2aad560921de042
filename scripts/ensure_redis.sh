#!/usr/bin/env bash
# Make sure a redis-server binary is available for the Redis tests (they start their own).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server package" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  command -v redis-server >/dev/null 2>&1 && exit 0
fi
cat >&2 <<'MSG'
redis-server is required by the test suite and was not found.
Install it, then run `make test` again:
  Debian/Ubuntu:  sudo apt-get install redis-server
  macOS:          brew install redis
  other:          https://redis.io/docs/latest/operate/oss_and_stack/install/
MSG
exit 1

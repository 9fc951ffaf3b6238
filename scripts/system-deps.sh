#!/usr/bin/env bash
# The Debian packages the tests use (a real Mosquitto, mosquitto_pub, dcmtk's storescu, and chromium
# with its chromedriver for the dashboard's browser test), installed only when one is missing.
# Called by `make test`; needs root or sudo on Debian/Ubuntu.
set -euo pipefail
PACKAGES="mosquitto mosquitto-clients dcmtk chromium chromium-driver"
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
if have mosquitto && have mosquitto_pub && have storescu && have chromium && have chromedriver; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "mosquitto, mosquitto_pub, storescu, chromium or chromedriver is missing and there is no apt-get here:" >&2
  echo "install $PACKAGES with your package manager, then run make test again" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "installing $PACKAGES needs root: run 'apt-get install -y $PACKAGES' as root" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing $PACKAGES (apt-get) for the integration and browser tests"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES >/dev/null

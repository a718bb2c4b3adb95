#!/usr/bin/env bash
# Find or install Debian's chromium (+ chromium-driver) for the browser tests.
# `make test` runs this first, so the README's test command needs no manual step.
# As root with apt-get it installs the packages; otherwise it says how to.
set -u
have() { command -v "$1" >/dev/null 2>&1; }
if (have chromium || have chromium-browser) && have chromedriver; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && have apt-get; then
  echo "installing Debian's chromium and chromium-driver for the browser tests (one time)..." >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; then
    exit 0
  fi
  echo "warning: apt-get could not install chromium; the browser tests will fail under CI and skip elsewhere" >&2
  exit 0
fi
cat >&2 <<'MSG'
note: Chromium is not installed, so the browser tests will be skipped. Install it with
  sudo apt-get install chromium chromium-driver
(or put a chromium binary on PATH) and run `make test` again.
MSG
exit 0

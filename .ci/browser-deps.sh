#!/usr/bin/env bash
# Chromium for the browser tests of /ui and /docs (tests/ui), called by .ci/run.
#
#   - chromium: Debian package `chromium` (the browser; Playwright for Python, from the test extras, drives it
#     through executable_path: `playwright install` is never run and nothing is downloaded but Debian packages)
#   - fonts-dejavu-core: a font for readable screenshots on a bare machine
#
# Idempotent: nothing is installed when chromium is already on PATH. Never fails CI: where apt-get (or root)
# is missing it says so, and the browser tests skip with a reason naming what is absent.
set -uo pipefail

say() { printf 'browser-deps: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

if have chromium; then
  exit 0
fi
if ! have apt-get; then
  say "apt-get not found; not installing chromium (tests/ui browser tests will skip)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root; not installing chromium (tests/ui browser tests will skip)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
say "installing chromium"
if ! apt-get update -qq >/dev/null; then
  say "apt-get update failed (tests/ui browser tests will skip)"
  exit 0
fi
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
  || say "apt-get install chromium failed (tests/ui browser tests will skip)"
have chromium && say "$(chromium --version 2>/dev/null)"
exit 0

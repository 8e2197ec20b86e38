#!/bin/sh
# The start step of the image (its ENTRYPOINT), also run by CI (tests/deploy/test_install.py).
#
# 1. Seed the writable model store ($CLASSMEANS_STORE, a volume in the image) with every model of the embedded,
#    read-only store ($EMBEDDED_MODEL_STORE) that it does not hold yet. A model already in the store is left
#    alone: its uploaded bundles and active.json win over the image's copy. Each copy lands with one rename, so
#    a crash mid-copy leaves no half model behind (only a .seed-* folder, removed by a later start once it is
#    an hour old). Replicas starting at once on one shared volume (`docker compose up --scale`) each copy into
#    their own .seed-<model>.<host>.<pid> folder; the first rename wins, the others discard their copy (mv -T
#    refuses to replace a model folder that exists).
# 2. exec the command (default `classmeans serve`), so the server is this process and gets SIGTERM itself.
set -eu

store="${CLASSMEANS_STORE:-model_store}"
seed="${EMBEDDED_MODEL_STORE:-}"

if [ -n "$seed" ] && [ -d "$seed" ]; then
  mkdir -p "$store"
  for src in "$seed"/*/; do
    [ -d "$src" ] || continue
    name="$(basename "$src")"
    tmp="$store/.seed-$name.$(hostname).$$"
    find "$store" -maxdepth 1 -name ".seed-$name*" -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    if [ ! -e "$store/$name" ]; then
      rm -rf "$tmp"
      cp -R "$src" "$tmp"
      if mv -T "$tmp" "$store/$name" 2>/dev/null; then
        echo "entrypoint: seeded model '$name' into $store" >&2
      else
        rm -rf "$tmp"  # another replica seeded it first
      fi
    fi
  done
fi

if [ "$#" -eq 0 ]; then
  set -- classmeans serve
fi
exec "$@"

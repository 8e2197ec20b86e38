#!/bin/sh
# The one install script: the Dockerfile runs it to build the image, and CI runs it (tests/deploy) so the
# image's install steps are exercised without a Docker engine. Never copy these pip commands elsewhere.
#
# usage: docker/install.sh --venv DIR (--torch-index URL | --no-torch-index) [--step torch|project|all]
#                          [--project DIR] [--dry-run]
#
#   --venv DIR         virtualenv to install into; created with `python3 -m venv` when DIR/bin/python is missing
#   --torch-index URL  take torch and torchvision from this index only (the image: PyTorch's CPU wheel index,
#                      so no CUDA libraries land in the image)
#   --no-torch-index   take them from pip's own configuration (CI: this machine's pip serves them from disk)
#   --step S           torch: torch + torchvision; project: the project and its remaining dependencies;
#                      all (default): both. The Dockerfile runs the steps as two layers so that a code change
#                      does not re-download torch.
#   --project DIR      the project to install (default: the directory above this script)
#   --dry-run          print the commands, one per line, prefixed with "+ ", and run nothing
#
# TORCH_VERSION and TORCHVISION_VERSION (environment) override the pins below; keep them inside the bounds
# in pyproject.toml (tests/deploy checks it).
set -eu

TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"

venv=""
torch_index=""
torch_index_set=0
step=all
project="$(cd "$(dirname "$0")/.." && pwd)"
dry_run=0

die() { echo "install.sh: $*" >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --venv) [ "$#" -ge 2 ] || die "--venv needs a directory"; venv="$2"; shift 2 ;;
    --torch-index) [ "$#" -ge 2 ] || die "--torch-index needs a URL"; torch_index="$2"; torch_index_set=1; shift 2 ;;
    --no-torch-index) torch_index=""; torch_index_set=1; shift ;;
    --step) [ "$#" -ge 2 ] || die "--step needs torch|project|all"; step="$2"; shift 2 ;;
    --project) [ "$#" -ge 2 ] || die "--project needs a directory"; project="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ -n "$venv" ] || die "--venv DIR is required"
[ "$torch_index_set" = 1 ] || die "say where torch comes from: --torch-index URL or --no-torch-index"
case "$step" in torch|project|all) ;; *) die "--step must be torch, project or all" ;; esac

run() {
  if [ "$dry_run" = 1 ]; then
    echo "+ $*"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

python="$venv/bin/python"
if [ ! -x "$python" ]; then
  run python3 -m venv "$venv"
fi

if [ "$step" = torch ] || [ "$step" = all ]; then
  if [ -n "$torch_index" ]; then
    run "$python" -m pip install --no-cache-dir --index-url "$torch_index" \
      "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  else
    run "$python" -m pip install --no-cache-dir "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
fi

if [ "$step" = project ] || [ "$step" = all ]; then
  # torch/torchvision are already satisfied here, so pip keeps the CPU builds and fetches only the rest.
  run "$python" -m pip install --no-cache-dir "$project"
  run "$python" -m pip check
fi

"""``classmeans cascade``: make a cascade of the store's models, served and calibrated like one model.

    classmeans cascade create cifar10-cascade --members cifar10-resnet20,cifar10-resnet56 [--store model_store]
    classmeans calibrate --model-dir model_store/cifar10-cascade --data train.npz --holdout 5000
    classmeans serve --model cifar10-cascade

The members run in the order given (the cheapest first): a sample leaves at an early exit of a member (class
means) or at a member's own classifier (its softmax top probability), otherwise the next member runs from
the input. ``calibrate`` computes every member's class means and searches the thresholds of the whole sequence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cascade", help="make a cascade of the store's models (served like one model)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", required=True)
    c = verbs.add_parser("create", help="write model_store/<name>/model.json naming the members")
    c.add_argument("name")
    c.add_argument("--members", required=True, help="comma list of store models, cheapest first")
    c.add_argument("--store", default="model_store", help="the model store (default: model_store)")
    c.add_argument("--replace", action="store_true", help="overwrite an existing cascade's model.json")
    c.set_defaults(func=run_create)


def run_create(args: argparse.Namespace) -> int:
    from service.store.cascade_dir import create_cascade

    members = [m.strip() for m in args.members.split(",") if m.strip()]
    spec = create_cascade(Path(args.store), args.name, members, replace=args.replace)
    print(json.dumps({"created": str(Path(args.store) / args.name), "members": members,
                      "classes": spec.classes, "next": f"classmeans calibrate --model-dir {args.store}/{args.name} "
                      "--data DATA --holdout N"}, indent=2))
    return 0

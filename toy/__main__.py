"""`python -m toy COMMAND`: build, measure and tabulate the toy world (see toy/__init__.py)."""
import argparse
import json
import sys

import torch

from toy import instruments, report, tables, world
from toy.pretrain import pretrain


def build_parser():
    p = argparse.ArgumentParser(prog="python -m toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train the tiny SD, the classifier; write assets/")
    pre.add_argument("--out", default=str(world.MODEL_DIR))
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    cls = sub.add_parser("classifier", help="train only the attribute classifier (part of pretrain)")
    cls.add_argument("--threads", type=int, default=1)
    ev = sub.add_parser("evaluate", help="VAE reconstruction, classifier accuracy, caption accuracy of samples")
    ev.add_argument("--model", default=str(world.MODEL_DIR))
    ev.add_argument("--out", default="runs/toy_eval")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance", type=float, default=7.5)
    ev.add_argument("--threads", type=int, default=1)
    data = sub.add_parser("data", help="write toy images + captions to a folder")
    data.add_argument("folder")
    data.add_argument("--n", type=int, default=2000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--split", choices=("train", "heldout"), default="train")
    sub.add_parser("tables", help="the paper's tables on the toy world (`python -m toy tables --help`)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tables"]:  # the tables have their own options: `python -m toy tables --help`
        return tables.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "data":
        print(world.prepare_data(args.folder, args.n, args.seed, args.split))
        return 0
    torch.set_num_threads(args.threads)
    if args.command == "pretrain":
        pretrain(args.out)
    elif args.command == "classifier":
        instruments.save_classifier(world.train_classifier())
    else:
        print(json.dumps(report.evaluate(args.model, args.out, steps=args.steps, guidance=args.guidance), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

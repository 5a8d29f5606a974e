"""Tables and plots of training runs (the logic is discrete_vae/report.py).

    python scripts/report.py multirun/jang2017_cpu           # report.md, .csv, plots, into the sweep
    python scripts/report.py export multirun/jang2017_cpu docs/results/jang2017
    python scripts/report.py results                         # docs/results.md (and README) from docs/results/
    python scripts/report.py select multirun/jang2017_lr     # a learning rate per estimator, on validation

`export` copies each finished run's compact record (metrics.json with the evaluation of its
best checkpoint, val_curve.csv); `results` rebuilds docs/results.md's tables and plots from
those records alone. `select` reads a grid sweep over optimizer.lr and chooses, per estimator (per
configuration), the rate with the best validation bound, never a test number.
"""

import argparse
import json
import sys
from pathlib import Path

from discrete_vae import report
from discrete_vae.cli import run_script
from discrete_vae.errors import DataError, find_user_error

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("export", "results", "select", "sweep", "-h", "--help"):
        argv = ["sweep", *argv]  # the sweep report is the default
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="summarise a multirun folder into it (the default)")
    sweep.add_argument("multirun_dir", type=Path, help="a Hydra multirun directory of scripts/train.py")
    export = commands.add_parser("export", help="copy each finished run's compact record")
    export.add_argument("multirun_dir", type=Path)
    export.add_argument("records_dir", type=Path, help="e.g. docs/results/jang2017")
    export.add_argument("--machine", help="for records that lack it: the machine the runs ran on")
    export.add_argument("--commit", help="for records that lack it: the commit the runs ran")
    results = commands.add_parser("results", help="rebuild docs/results.md from docs/results/")
    results.add_argument("records_root", type=Path, nargs="?", default=REPO / "docs" / "results")
    results.add_argument("--markdown", type=Path, nargs="+", default=[REPO / "docs" / "results.md", REPO / "README.md"],
                         help="files whose <!-- report:NAME --> blocks are rebuilt (default: docs/results.md, README.md)")
    select = commands.add_parser("select", help="choose a learning rate per configuration of a grid sweep, on validation")
    select.add_argument("multirun_dir", type=Path, help="a sweep over optimizer.lr (and estimators, seeds)")
    select.add_argument("--metric", help="val/neg_elbo or val/nll_iwae (default: val/nll_iwae where every run has it)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as err:  # a mistake of the user's, or a full or read-only disk: one line
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    if args.command == "sweep":
        root = args.multirun_dir.resolve()
        report.report(root, title=str(args.multirun_dir))
        print((root / "report.md").read_text())
        names = ("report.md", "report.csv", "val_neg_elbo.png", "test_nll.png")
        print("written:", ", ".join(str(root / name) for name in names))
    elif args.command == "export":
        if not args.multirun_dir.is_dir():
            raise DataError(f"{args.multirun_dir} is not a directory; pass the multirun directory of a sweep")
        if args.records_dir.exists() and not args.records_dir.is_dir():
            raise DataError(f"{args.records_dir} is a file; pass the folder the records go to, e.g. docs/results/NAME")
        extra = {key: value for key in ("machine", "commit") if (value := getattr(args, key))}
        written = report.export(args.multirun_dir.resolve(), args.records_dir, extra)
        print(f"{len(written)} records written under {args.records_dir}")
    elif args.command == "select":
        if not args.multirun_dir.is_dir():
            raise DataError(f"{args.multirun_dir} is not a directory; pass the multirun directory of a learning-rate grid")
        root = args.multirun_dir.resolve()
        report.select_learning_rates(root, args.metric)
        print((root / report.SELECTION_FILES[0]).read_text())
    else:
        summary = report.results(args.records_root, args.markdown)
        print(json.dumps({name: len(rows) for name, rows in summary.items()}), "configurations;",
              ", ".join(map(str, args.markdown)), f"and the plots under {args.records_root} rebuilt")


if __name__ == "__main__":
    run_script(lambda: sys.exit(main()))

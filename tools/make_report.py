#!/usr/bin/env python
"""Rewrite a suite's reports from its metrics.json files alone.

    python tools/make_report.py results/NAME

writes results/NAME/{runs.csv, summary.csv, summary.md, per_class.csv, deltas.png} and prints summary.md.
"""
import argparse
from pathlib import Path

from transfer import report
from transfer.errors import UserError, cli


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path, help="a suite folder (what run_suite.py --output named)")
    p.add_argument("--baseline", default=report.BASELINE, help="weights label the deltas are against")
    p.add_argument("--published", type=Path, default=report.PUBLISHED_CSV,
                   help="published reference numbers (CSV)")
    args = p.parse_args(argv)
    if not args.output.is_dir():
        raise UserError(f"{args.output}: not a folder")
    if not args.published.is_file():
        raise UserError(f"--published {args.published}: file not found")
    if report.load_runs(args.output).empty:
        raise UserError(f"{args.output}: no <weights>/<task>/<schedule>/seed<N>/metrics.json found")
    written = report.write_reports(args.output, args.baseline, args.published)
    print(written.summary_md.read_text())
    print(f"reports: {written}")


if __name__ == "__main__":
    main()

"""`dualbench` command line: one module per subcommand (compare/cmd_*.py).

Errors a user can cause (``common.errors.UserError``) print one line naming
the fix and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.errors import UserError

# subcommand -> (module, one-line help)
COMMANDS = {
    "run": ("compare.cmd_run", "train models on both backends and write results + report"),
    "bench": ("compare.cmd_bench", "throughput and memory only (batch-size sweep)"),
    "tune": ("compare.cmd_tune", "measure each framework's fastest correct execution configuration here (cached)"),
    "parity": ("compare.cmd_parity", "prove that the architectures match across frameworks"),
    "report": ("compare.cmd_report", "re-render tables, report and plots from runs.jsonl"),
    "list": ("compare.cmd_list", "list models, backends and dataset SPECs"),
    "data": ("compare.cmd_data", "dataset utilities: `data prepare --data SPEC`"),
    "scale": ("compare.cmd_scale", "data-parallel runs at several process counts and the scaling table"),
    "retrieval": ("compare.cmd_retrieval", "image retrieval (recall@k, mAP@R) with every run's final weights"),
    "export": ("compare.cmd_export", "export every trained model, verify each artifact, measure serving"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        command = " ".join(["dualbench", *self.prog.split()[1:]])  # e.g. "dualbench data prepare"
        self.exit(2, f"dualbench: error: {message} (see `{command} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dualbench", description="Fair PyTorch vs TensorFlow CNN comparisons.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"dualbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualbench: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

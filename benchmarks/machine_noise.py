"""How far this machine's own speed drifts: the noise floor of any A/B figure measured on it.

One fixed CPU workload (a float32 matrix product, ``torch.matmul`` on
``--threads`` threads, default every usable core) is run back to back for
``--seconds``, counting the products finished in each 1-second slice. Two measurements of the SAME work
taken one after the other should give a ratio of 1; how far they do not is the
floor under every comparison this machine produces. For each window length W
(1, 5, 10, 30, 60 s) the slices are grouped into consecutive W-second windows
and every pair of neighbouring windows gives one such ratio (later / earlier):

* ``cv``: the windows' coefficient of variation;
* ``ratio_p50`` / ``ratio_p90``: the median and 90th percentile (nearest rank:
  an observed pair, not an interpolation) of |ratio - 1| over the neighbouring pairs: an A/B comparison of identical work with
  W-second windows lands this far from 1 half / one tenth of the time.

Where ``ratio_p90`` at the window a benchmark uses exceeds the difference it is
meant to resolve, that benchmark needs longer windows or more ABBA rounds, not
a finer reading. Run it with nothing else running:

    .venv/bin/python benchmarks/machine_noise.py --seconds 180
"""
from __future__ import annotations

import statistics
import sys
import time

from _common import base_parser, machine_header, print_table, write_results

WINDOWS_S = (1, 5, 10, 30, 60)
MATRIX = 512  # one product ~ a few ms on one core: many per slice, so a slice's count is fine-grained


def slices(seconds: int, threads: int | None) -> list[float]:
    """Products per second in each consecutive 1-second slice of ``seconds``."""
    import torch

    from common.manifest import usable_cores

    torch.set_num_threads(threads or usable_cores())
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(MATRIX, MATRIX, generator=generator) for _ in range(2))
    torch.matmul(a, b)  # start-up outside the record
    counts = []
    for _ in range(seconds):
        start, done = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < 1.0:
            torch.matmul(a, b)
            done += 1
        counts.append(done / elapsed)
    return counts


def summarise(per_second: list[float], windows: tuple[int, ...] = WINDOWS_S) -> list[dict]:
    """Per window length: its windows' CV and the spread of neighbouring windows' ratios."""
    out = []
    for width in windows:
        means = [statistics.fmean(per_second[i:i + width])
                 for i in range(0, len(per_second) - width + 1, width)]
        if len(means) < 2:
            continue
        deviations = sorted(abs(later / earlier - 1) for earlier, later in zip(means, means[1:]))
        p90 = deviations[min(len(deviations) - 1, round(0.9 * (len(deviations) - 1)))]
        out.append({"window_s": width, "windows": len(means),
                    "cv": statistics.pstdev(means) / statistics.fmean(means),
                    "ratio_p50": statistics.median(deviations), "ratio_p90": p90,
                    "slowest_over_fastest": min(means) / max(means)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "machine_noise.csv")
    parser.add_argument("--seconds", type=int, default=180, help="length of the record (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 4
    per_second = slices(args.seconds, args.threads)
    summary = summarise(per_second, WINDOWS_S if not args.quick else (1, 2))
    print(machine_header(args.threads))
    print_table(f"the same work in neighbouring windows, {args.seconds} s record", summary,
                list(summary[0]) if summary else ["window_s"])
    write_results(args.out, summary, [{"second": i + 1, "products_per_s": v} for i, v in enumerate(per_second)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

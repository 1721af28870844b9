"""`mmgen bench`: each case runs against its baseline in the same process and reports ratios (DESIGN.md §9).

CPU timings are noisy, so every timing is the median of repeats after a warm-up run, and only ratios
measured in one run are compared. A case is a function `(pipe, options) -> CaseResult` registered with
`@bench_case(name)`; its module is listed in `CASE_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CASE_MODULES = ("mmgen.evals.bench_cases", "mmgen.evals.bench_compression", "mmgen.evals.bench_drafting")


@dataclass
class BenchOptions:
    repeats: int = 3
    quick: bool = False
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("bench"))


@dataclass
class CaseResult:
    """One case: its table rows and the ratios it is judged by."""

    case: str
    rows: list[dict]
    ratios: dict[str, float]


CASES: dict[str, Callable] = {}


def bench_case(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES[name] = fn
        return fn

    return register


def load_cases() -> dict[str, Callable]:
    for module in CASE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return CASES


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def format_table(results: list[CaseResult]) -> str:
    lines = []
    for result in results:
        lines.append(f"## {result.case}")
        if result.rows:
            columns = list(dict.fromkeys(key for row in result.rows for key in row))
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            for row in result.rows:
                lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
        for name, value in result.ratios.items():
            lines.append(f"- **{name}**: {value:.3f}")
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgen bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="cases to run (default: all); 'list' prints them")
    parser.add_argument("--model", default=None, help="a pipeline folder; default: the embedded model")
    parser.add_argument("--json", default=None, help="write one object per case to this file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16; every case runs in it")
    parser.add_argument("-o", "--out-dir", default="bench", help="where plots and artefacts go")
    return parser


def run_bench(names: list[str], pipe, options: BenchOptions) -> list[CaseResult]:
    cases = load_cases()
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise ValueError(f"unknown bench case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    results = []
    for name in names or list(cases):
        torch.manual_seed(options.seed)
        results.append(cases[name](pipe, options))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    cases = load_cases()
    if args.cases == ["list"]:
        print("\n".join(cases))
        return 0
    from mmgen.pipelines import MMGenPipeline

    pipe = MMGenPipeline.from_pretrained(None if args.model in (None, "default") else args.model, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    options = BenchOptions(repeats=args.repeats, quick=args.quick, seed=args.seed, out_dir=Path(args.out_dir))
    options.out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        results = run_bench(args.cases, pipe, options)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

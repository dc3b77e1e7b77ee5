"""Print a markdown table of fastrec-vs-peer ratios from the benches.

    python benches/report.py                       # run every benches/bench_*.py, then report
    python benches/report.py --bench embedding     # only bench_embedding.py (repeatable)
    python benches/report.py --bench linear -k B32 # extra arguments go through to pytest
    python benches/report.py --json results.json   # report on an existing --benchmark-json file
    python benches/report.py --save-json out.json  # run, keep the raw pytest-benchmark JSON

Ratios are peer time / fastrec time within one group (same inputs, same run): above 1 means
fastrec is faster. Embedding large-batch groups use the median; small-request groups p50 and p99
of single calls (extra_info p50_us / p99_us). Linear / MLP groups (bench_linear.py) use the
median of single calls and mark the best int8 peer (the faster of torch-dynq and ort-int8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = "fastrec"

# bench_linear.py: the column order of its table and the int8 peers fastrec must beat
DENSE_PREFIXES = ("linear-", "mlp-")
DENSE_PEERS = ("torch-fp32", "torch-dynq", "ort-int8", "ort-fp32")
INT8_PEERS = ("torch-dynq", "ort-int8")


def available_benches() -> dict:
    """{"embedding": ".../bench_embedding.py", "linear": ".../bench_linear.py", ...}"""
    out = {}
    for f in sorted(os.listdir(HERE)):
        if f.startswith("bench_") and f.endswith(".py"):
            out[f[len("bench_"):-len(".py")]] = os.path.join(HERE, f)
    return out


def run_benches(pytest_args, json_path: str, benches=None) -> int:
    import pytest  # in-process: the script's directory (benches/) is sys.path[0], not the cwd

    files = available_benches()
    paths = [files[b] for b in benches] if benches else list(files.values())
    args = [*paths, "--benchmark-only", "-p", "no:cacheprovider", "-q",
            f"--benchmark-json={json_path}", *pytest_args]
    return int(pytest.main(args))


def _impl(bench) -> str:
    impl = bench.get("extra_info", {}).get("impl")
    if impl:
        return impl
    param = bench.get("param") or bench["name"]
    group = bench.get("group") or ""
    return param[len(group) + 1:] if group and param.startswith(group + "-") else param


def _fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(data) -> str:
    groups = defaultdict(dict)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b["name"]][_impl(b)] = b

    out = []
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    threads = {b.get("extra_info", {}).get("threads") for b in data.get("benchmarks", [])} - {None}
    out.append(f"Machine: {cpu.get('brand_raw', mi.get('processor', '?'))}, "
               f"{cpu.get('count', '?')} CPUs, Python {mi.get('python_version', '?')}; "
               f"threads per library: {', '.join(map(str, sorted(threads))) or '?'}; "
               f"run {data.get('datetime', '?')}")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        out.append(f"Commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    out.append("")
    out.append("Ratio = peer time / fastrec time (>1: fastrec faster).")
    out.append("")

    topk = {g: v for g, v in groups.items() if g.startswith("topk")}
    groups = {g: v for g, v in groups.items() if g not in topk}
    large = {g: v for g, v in groups.items() if g.startswith("large")}
    dense = {g: v for g, v in groups.items() if g.startswith(DENSE_PREFIXES)}
    small = {g: v for g, v in groups.items() if g not in large and g not in dense}

    if large:
        out.append("| group | impl | median | rows/s | GB/s | vs fastrec |")
        out.append("|---|---|---:|---:|---:|---:|")
        for g in sorted(large):
            impls = large[g]
            base = impls.get(BASELINE)
            base_t = base["stats"]["median"] if base else None
            for name in sorted(impls, key=lambda n: (n != BASELINE, n)):
                b = impls[name]
                t = b["stats"]["median"]
                ei = b.get("extra_info", {})
                rows = ei.get("rows_per_s")
                gbs = ei.get("GB_per_s")
                rows_s = f"{rows / 1e6:.0f} M" if rows else "-"
                gbs_s = f"{gbs:.1f}" if gbs else "-"
                out.append(f"| {g} | {name} | {_fmt_time(t)} | {rows_s} | {gbs_s} | {_ratio(t, base_t)} |")
        out.append("")

    if small:
        out.append("| group | impl | p50 | p99 | p50 vs fastrec | p99 vs fastrec |")
        out.append("|---|---|---:|---:|---:|---:|")
        for g in sorted(small):
            impls = small[g]
            base = impls.get(BASELINE, {}).get("extra_info", {})
            for name in sorted(impls, key=lambda n: (n != BASELINE, n)):
                ei = impls[name].get("extra_info", {})
                p50 = ei.get("p50_us") or impls[name]["stats"]["median"] * 1e6
                p99 = ei.get("p99_us")
                out.append(f"| {g} | {name} | {p50:.1f} us | "
                           f"{f'{p99:.1f} us' if p99 else '-'} | "
                           f"{_ratio(p50, base.get('p50_us'))} | {_ratio(p99, base.get('p99_us'))} |")
        out.append("")

    if dense:
        out.extend(dense_table(dense))
    if topk:
        out.extend(topk_table(topk))
    return "\n".join(out)


def topk_table(groups) -> list:
    """One row per (group, impl): median, recall, and each peer's time over fastrec-int8's."""
    out = ["| group | impl | median | recall@k | time / fastrec-int8 |", "|---|---|---:|---:|---:|"]
    for g in sorted(groups, key=lambda g: int(g.split("-Q")[1].split("-")[0])):
        impls = groups[g]
        base = impls.get("fastrec-int8")
        base_t = base["stats"]["median"] if base else None
        for name in sorted(impls, key=lambda n: (not n.startswith("fastrec"), n)):
            b = impls[name]
            t = b["stats"]["median"]
            rec = b.get("extra_info", {}).get("recall")
            out.append(f"| {g} | {name} | {_fmt_time(t)} | {'-' if rec is None else f'{rec:.4f}'} | "
                       f"{_ratio(t, base_t)} |")
    out.append("")
    return out


def _dense_sort_key(group: str):
    """linear before mlp, then the layer sizes in order, then B numerically."""
    head, _, batch = group.rpartition("-B")
    return (not head.startswith("linear"), head, int(batch) if batch.isdigit() else 0)


def dense_table(groups) -> list:
    """One row per group: fastrec's median and GOPS, each peer's median with peer / fastrec,
    the best int8 peer in bold, and best-int8-peer / fastrec in the last column."""
    peers = [p for p in DENSE_PEERS if any(p in impls for impls in groups.values())]
    peers += sorted({n for impls in groups.values() for n in impls} - set(peers) - {BASELINE})
    out = ["Linear / MLP: median of single calls; (peer / fastrec); **bold**: best int8 peer "
           f"(the faster of {' and '.join(INT8_PEERS)}).", ""]
    out.append("| group | fastrec | fastrec GOPS | " + " | ".join(peers) + " | best int8 / fastrec |")
    out.append("|---|---:|---:|" + "---:|" * len(peers) + "---:|")
    for g in sorted(groups, key=_dense_sort_key):
        impls = groups[g]
        med = {n: b["stats"]["median"] for n, b in impls.items()}
        base_t = med.get(BASELINE)
        int8 = [p for p in INT8_PEERS if p in med]
        best = min(int8, key=med.get) if int8 else None
        cells = []
        for p in peers:
            if p not in med:
                cells.append("-")
                continue
            cell = _fmt_time(med[p]) + (f" ({_ratio(med[p], base_t)})" if base_t else "")
            cells.append(f"**{cell}**" if p == best else cell)
        gops = impls.get(BASELINE, {}).get("extra_info", {}).get("GOPS")
        best_ratio = f"{_ratio(med[best], base_t)} ({best})" if best and base_t else "-"
        out.append(f"| {g} | {_fmt_time(base_t) if base_t else '-'} | "
                   f"{f'{gops:.1f}' if gops else '-'} | " + " | ".join(cells) + f" | {best_ratio} |")
    out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="an existing pytest-benchmark --benchmark-json file to report on")
    ap.add_argument("--save-json", help="where to keep the JSON of a fresh run")
    ap.add_argument("--bench", action="append", choices=sorted(available_benches()),
                    help="which benches/bench_NAME.py to run (repeatable; default: all of them)")
    args, pytest_args = ap.parse_known_args(argv)

    if args.json:
        path = args.json
    else:
        path = args.save_json or os.path.join(tempfile.mkdtemp(prefix="fastrec-bench-"), "bench.json")
        load_before = os.getloadavg()
        rc = run_benches(pytest_args, path, args.bench)
        load_after = os.getloadavg()
        print(f"load average (1/5/15 min) before: {load_before}, after: {load_after}")
        if rc != 0 or not os.path.exists(path):
            print(f"pytest exited with {rc}", file=sys.stderr)
            if not os.path.exists(path):
                return rc or 1
    with open(path) as f:
        data = json.load(f)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

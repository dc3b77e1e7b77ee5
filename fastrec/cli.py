"""The ``fastrec`` command."""

from __future__ import annotations

import argparse
import builtins
import sys


def _cmd_info(args) -> int:
    from .info import main as info_main

    return info_main(["--json"] if args.json else [])


def _cmd_example(args) -> int:
    from .examples import embedding_bag_example

    embedding_bag_example()
    return 0


def _cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(users=args.users, candidates=args.candidates, repeat=args.repeat)


def _cmd_bench(args) -> int:
    from .bench import run

    return run(seconds=args.seconds)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _inspect_report(path: str) -> dict:
    """What a model directory holds, from its validated manifest and tensor headers (nothing
    is packed or built, so this is quick even for large models)."""
    import os

    from .io import MANIFEST_FILE, TENSORS_FILE, read_model

    manifest, tensors = read_model(path)
    m = manifest
    tables = [{"name": t["name"], "rows": t["rows"], "dim": t["dim"], "storage": t["storage"],
               "pooling": t["pooling"], "bytes": int(tensors[t["tensor"]].nbytes)} for t in m["tables"]]

    def layers(ls):
        return [{"in": x["in"], "out": x["out"], "activation": x["activation"],
                 "bytes": int(sum(tensors[x[k]].nbytes for k in ("weight", "bias", "weight_scale")
                                  if x.get(k) is not None))} for x in ls]

    report = {"path": os.path.abspath(path), "format_version": m["format_version"], "kind": m["kind"],
              "precision": m["precision"], "embedding_bits": m.get("embedding_bits"),
              "producer": m.get("producer"), "tables": tables,
              "sparse_features": [{"name": f["name"], "table": f["table"]} for f in m["sparse_features"]]}
    if m["kind"] == "dlrm":
        report["dense_features"] = m["dense_features"]
        report["mlps"] = {"bottom_mlp": layers(m["dlrm"]["bottom_mlp"]), "top_mlp": layers(m["dlrm"]["top_mlp"])}
        report["interaction"] = m["dlrm"]["interaction"]
    else:
        tt = m["two_tower"]
        report["mlps"] = {"user.mlp": layers(tt["user"]["mlp"]), "item.mlp": layers(tt["item"]["mlp"])}
        report["towers"] = {side: {"features": tt[side]["features"], "normalize": tt[side]["normalize"]}
                            for side in ("user", "item")}
        items = tensors[tt["index"]["items"]]
        report["index"] = {"items": int(items.shape[0]), "dim": int(items.shape[1]),
                           "precision": tt["index"]["precision"], "rerank": tt["index"]["rerank"],
                           "bytes": int(items.nbytes + tensors[tt["index"]["ids"]].nbytes)}
    fz = m.get("featurizer")
    if fz is not None:
        report["featurizer"] = {"dense": [f"{d['name']}:{d['kind']}" for d in fz.get("dense", [])],
                                "sparse": [f"{d['name']}:{d['kind']}" for d in fz.get("sparse", [])]}
    report["metadata"] = m.get("metadata") or {}
    report["file_bytes"] = {name: os.path.getsize(os.path.join(path, name)) for name in (MANIFEST_FILE, TENSORS_FILE)}
    report["total_bytes"] = sum(report["file_bytes"].values())
    return report


def _printable(line: str) -> str:
    """line with control and other unprintable characters escaped (\\x1b, \\u200e): a model's
    names and metadata come from its file and must not drive the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in line)


def _print_inspect(r: dict) -> None:
    def print(line: str) -> None:  # noqa: A001 (every line of the report, escaped)
        builtins.print(_printable(line))

    print(f"{r['path']}: fastrec model, format version {r['format_version']}")
    print(f"  kind       {r['kind']}")
    print(f"  precision  {r['precision']} MLPs, embedding_bits {r['embedding_bits']}")
    if r.get("producer"):
        print(f"  producer   {r['producer']}")
    if r["kind"] == "dlrm":
        print(f"  dense      {r['dense_features']} features, interaction {r['interaction']}")
    print(f"  tables ({len(r['tables'])}):")
    w = max(len(_printable(t["name"])) for t in r["tables"])  # (print escapes it: measure the escaped name)
    for t in r["tables"]:
        print(f"    {_printable(t['name']):<{w}}  rows {t['rows']:>12,}  dim {t['dim']:>5}  {t['storage']:<4}  "
              f"{t['pooling']:<4}  {_size(t['bytes']):>10}")
    feats = ", ".join(f["name"] if f["name"] == f["table"] else f"{f['name']}->{f['table']}"
                      for f in r["sparse_features"])
    print(f"  sparse features ({len(r['sparse_features'])}): {feats}")
    for side, tower in r.get("towers", {}).items():
        print(f"  {side} tower: features {tower['features']}, normalize {tower['normalize']}")
    for name, layers in r["mlps"].items():
        if not layers:
            print(f"  {name}: (none)")
            continue
        dims = [str(layers[0]["in"])] + [f"{x['out']}" + ("" if x["activation"] == "none" else f" {x['activation']}")
                                         for x in layers]
        print(f"  {name}: {' -> '.join(dims)}  ({_size(sum(x['bytes'] for x in layers))})")
    if "index" in r:
        i = r["index"]
        print(f"  index: {i['items']:,} items x {i['dim']}, precision {i['precision']}, rerank {i['rerank']}"
              f"  ({_size(i['bytes'])} on disk)")
    if "featurizer" in r:
        fz = r["featurizer"]
        print(f"  featurizer: {len(fz['dense'])} dense ({', '.join(fz['dense']) or '-'}), "
              f"{len(fz['sparse'])} sparse ({', '.join(fz['sparse']) or '-'})")
    for k, v in r["metadata"].items():
        print(f"  metadata.{k}: {v}")
    print(f"  total      {_size(r['total_bytes'])} on disk")


def _cmd_inspect(args) -> int:
    import json

    from .io import ModelFormatError

    try:
        report = _inspect_report(args.path)
    except ModelFormatError as exc:
        print(f"fastrec inspect: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspect(report)
    return 0


def _positive(kind, minimum=None, maximum=None):
    """argparse type: a number of `kind` > 0, or >= `minimum`, and <= `maximum` (argparse prints
    the error and exits 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value
    return parse


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastrec", description="fastrec: fast inference for recommendation models")
    parser.add_argument("--version", action="version", version=f"fastrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CPU ISA chosen, threads, backends")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("example", help="run a short embedding-bag example and time it against numpy")
    p.set_defaults(fn=_cmd_example)
    p = sub.add_parser("demo", help="recommend and rank with the two embedded demo models; latency vs numpy")
    p.add_argument("--users", type=_positive(int, maximum=1000), default=4,
                   help="users to recommend for, at most 1000 (default 4; with more than one, the last is a new user)")
    p.add_argument("--candidates", type=_positive(int, 10, maximum=100_000), default=270,
                   help="raw candidates per ranking request, 10 to 100000 (default 270)")
    p.add_argument("--repeat", type=_positive(int, maximum=1_000_000), default=200,
                   help="requests timed per task and engine, at most 1000000 (default 200)")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("inspect", help="what a model directory holds (kind, tables, layers, index, sizes)")
    p.add_argument("path", help="a model directory (manifest.json + model.safetensors)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(fn=_cmd_inspect)
    p = sub.add_parser("bench", help="a quick same-run comparison against the installed peers (torch, faiss, numpy)")
    p.add_argument("--seconds", type=_positive(float), default=0.5, help="timed calls per implementation and case, in seconds (default 0.5; each of the 4 "
                        "blocks also waits up to 0.3 s before it starts)")
    p.set_defaults(fn=_cmd_bench)
    try:
        args = parser.parse_args(argv)  # (--help / --version print and exit here)
        code = args.fn(args)
        sys.stdout.flush()  # output under the buffer's size is written here, inside the try
        return code
    except BrokenPipeError:  # `fastrec info | head`: the reader left; no traceback
        quiet_stdout()
        return 1
    except SystemExit:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_stdout()
        raise


def quiet_stdout() -> None:
    """After a BrokenPipeError on stdout: point it at /dev/null, so that the interpreter's final
    flush does not raise again (Python's documented recipe)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

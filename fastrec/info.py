"""``python -m fastrec.info``: what this build and this machine support."""

from __future__ import annotations

import importlib.util
import json
import sys


def _version(v: int) -> str | None:
    """CUDA's integer version (12040) as "12.4"; None for 0 (no driver)."""
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


def cuda_info() -> dict:
    """The CUDA module's build (architectures, runtime) and the GPUs it sees. Never raises:
    without the module, a driver or a GPU the fields say so."""
    try:
        from fastrec import _C_cuda
    except ImportError as exc:
        return {"built": False, "reason": str(exc), "archs": [], "runtime": None, "driver": None, "devices": []}
    build = _C_cuda.build_info()
    d = {
        "built": True,
        "archs": [a for a in str(build.get("archs", "")).split(",") if a],
        "runtime": _version(int(build.get("runtime_version", 0))),
        "driver": _version(int(_C_cuda.driver_version())),
        "devices": [],
    }
    for i in range(_C_cuda.device_count()):
        try:
            p = _C_cuda.device_info(i)
        except RuntimeError as exc:  # a device the driver lists but cannot open
            d["devices"].append({"index": i, "error": str(exc)})
            continue
        major, minor = p["compute_capability"]
        d["devices"].append({
            "index": i,
            "name": p["name"],
            "compute_capability": f"{major}.{minor}",
            "multiprocessors": int(p["multiprocessors"]),
            "memory_gib": round(int(p["total_memory"]) / 2**30, 1),
            "l2_mib": round(int(p["l2_bytes"]) / 2**20, 1),
        })
    return d


def info() -> dict:
    """A dict describing the build, the CPU dispatch, threads and optional backends."""
    import fastrec
    from fastrec import _C, _config

    cuda_built = importlib.util.find_spec("fastrec._C_cuda") is not None
    build = _C.build_info()
    return {
        "version": fastrec.__version__,
        "python": sys.version.split()[0],
        "cpu_isa": _C.current_isa(),
        "cpu_isas_available": list(_C.available_isas()),
        "cpu_features": dict(_C.cpu_features()),
        "int8_gemm": _C.gemm_variant(),
        "cpu_vendor_amd": bool(_C._cpu_vendor_amd()),
        "cpu_family": int(_C._cpu_family()),
        "embedding_l1_prefetch": bool(_C._embedding_l1_prefetch()),
        "embedding_float_l1_prefetch": bool(_C._embedding_float_l1_prefetch()),
        "num_threads": fastrec.get_num_threads(),
        "cpus_available": _config.available_cpus(),
        "openmp": build["openmp"],
        "thread_pool": build["thread_pool"],
        "compiler": build["compiler"],
        "cuda_module_built": cuda_built,
        "cuda": cuda_info(),
        "backends": {
            "cpu": True,
            "cuda": cuda_built,
            "numba": importlib.util.find_spec("numba") is not None,
            "cupy": importlib.util.find_spec("cupy") is not None,
        },
    }


def format_info(d: dict) -> str:
    lines = [f"fastrec {d['version']} (Python {d['python']})"]
    lines.append(f"  CPU ISA in use     : {d['cpu_isa']}  (set FASTREC_CPU_ISA to force one)")
    lines.append(f"  CPU ISAs available : {', '.join(d['cpu_isas_available'])}")
    feats = ", ".join(k for k, v in d["cpu_features"].items() if v) or "none"
    lines.append(f"  CPU features       : {feats}")
    lines.append(f"  int8 GEMM kernel   : {d['int8_gemm']}")
    if d["cpu_isa"] == "scalar":
        lines.append("  embedding prefetch : none (the scalar reference kernels)")
    else:
        l1 = "+ L1 16 ids ahead" if d["embedding_l1_prefetch"] else "only"
        fl = "L1, 64 ids ahead" if d["embedding_float_l1_prefetch"] else "L2, 128 ids ahead"
        vendor = "AMD" if d["cpu_vendor_amd"] else "not AMD"
        lines.append(f"  embedding prefetch : float rows {fl}; quantized rows L2, 128 ids ahead {l1} "
                     f"(CPU: {vendor}, family {d['cpu_family']})")
    lines.append(f"  threads            : {d['num_threads']} of {d['cpus_available']} CPUs available")
    lines.append(f"  OpenMP             : {'yes' if d['openmp'] else 'no'} (thread pool: {d['thread_pool']})")
    lines.append(f"  compiler           : {d['compiler']}")
    lines.append(f"  CUDA module built  : {'yes' if d['cuda_module_built'] else 'no'}")
    cu = d.get("cuda", {})
    if cu.get("built"):
        lines.append(f"  CUDA archs built   : {', '.join(cu['archs']) or 'unknown'} (runtime {cu['runtime']}, "
                     f"driver {cu['driver'] or 'not found'})")
        if not cu["devices"]:
            lines.append("  GPUs               : none usable (no GPU or no driver)")
        for g in cu["devices"]:
            if "error" in g:
                lines.append(f"  GPU {g['index']}              : unusable ({g['error']})")
            else:
                lines.append(f"  GPU {g['index']}              : {g['name']} (sm {g['compute_capability']}, "
                             f"{g['multiprocessors']} SMs, {g['memory_gib']} GiB, L2 {g['l2_mib']} MiB)")
    lines.append("  backends           : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in d["backends"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unknown = [a for a in argv if a not in ("--json", "-h", "--help")]
    if unknown:
        print(f"python -m fastrec.info: unknown argument(s) {' '.join(unknown)} (use --json or --help)",
              file=sys.stderr)
        return 2
    try:
        if "-h" in argv or "--help" in argv:
            print("usage: python -m fastrec.info [--json]\n\nReports the version, the CPU ISA level in use "
                  "and those available, threads, OpenMP, and the CUDA module and GPUs (--json: as JSON).", flush=True)
            return 0
        d = info()
        print(json.dumps(d, indent=2) if "--json" in argv else format_info(d), flush=True)
    except BrokenPipeError:  # `python -m fastrec.info | head`: the reader left; no traceback
        from .cli import quiet_stdout

        quiet_stdout()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

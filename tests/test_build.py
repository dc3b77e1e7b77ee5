"""Build smoke tests: the module, the info report, forced ISA levels, torch side by side."""

import json
import platform
import shutil
import os
import subprocess
import tempfile
from pathlib import Path
import sys

import numpy as np
import pytest

import fastrec
from fastrec import _C, info


def _run(args, **env):
    full_env = dict(os.environ)
    full_env.pop("FASTREC_CPU_ISA", None)
    full_env.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=tempfile.gettempdir(), timeout=180)


def test_info_reports_everything():
    d = info.info()
    for key in ("version", "cpu_isa", "cpu_isas_available", "num_threads", "openmp", "cuda_module_built"):
        assert key in d
    assert d["cpu_isa"] in d["cpu_isas_available"]
    assert "scalar" in d["cpu_isas_available"]
    assert d["version"] == fastrec.__version__
    r = _run(["-m", "fastrec.info"])
    assert r.returncode == 0, r.stderr
    assert "CPU ISA in use" in r.stdout
    r = _run(["-m", "fastrec", "info", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == fastrec.__version__
    r = _run(["-m", "fastrec.info", "--help"])
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stdout
    assert _run(["-m", "fastrec.info", "--jsn"]).returncode == 2


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_forced_isa_level(level):
    """FASTREC_CPU_ISA forces a level in a fresh process, and the kernels run under it."""
    if level not in _C.available_isas():
        r = _run(["-c", "import fastrec"], FASTREC_CPU_ISA=level)
        assert r.returncode != 0 and "does not support" in r.stderr
        pytest.skip(f"CPU lacks {level}; import correctly refused")
    code = (
        "import numpy as np, fastrec\n"
        "from fastrec import ops, testing, _C\n"
        "rng = np.random.default_rng(0)\n"
        "W = rng.standard_normal((100, 37)).astype(np.float32)\n"
        "idx = rng.integers(0, 100, size=300); off = np.arange(0, 301, 10)\n"
        "for t in (W, W.astype(np.float16), fastrec.QuantizedTable.from_float(W, 4)):\n"
        "    testing.assert_close(ops.embedding_bag(t, idx, off), testing.embedding_bag_ref(t, idx, off), rtol=1e-5, atol=1e-4)\n"
        "print(_C.current_isa())\n"
    )
    r = _run(["-c", code], FASTREC_CPU_ISA=level)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level


def test_bad_isa_value_is_a_clear_error():
    r = _run(["-c", "import fastrec"], FASTREC_CPU_ISA="sse9")
    assert r.returncode != 0
    assert "unknown CPU ISA level 'sse9'" in r.stderr
    assert "FASTREC_CPU_ISA='sse9'" in r.stderr and "Reinstall" not in r.stderr  # (not a broken build)
    assert r.stderr.count("Traceback") == 1  # one error, not the extension's chained under it


@pytest.mark.parametrize("order", ["torch_first", "fastrec_first"])
def test_torch_side_by_side(order):
    pytest.importorskip("torch")
    first, second = ("torch", "fastrec") if order == "torch_first" else ("fastrec", "torch")
    code = (
        f"import {first}\nimport {second}\n"
        "import numpy as np\n"
        "from fastrec import ops\n"
        "W = np.random.default_rng(0).standard_normal((100000, 64)).astype(np.float32)\n"
        "off = np.arange(4097, dtype=np.int64) * 32\n"
        "idx = np.random.default_rng(1).integers(0, 100000, size=4096 * 32)\n"
        "a = ops.embedding_bag(W, idx, off)\n"
        "eb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(W), mode='sum')\n"
        "b = eb(torch.from_numpy(idx), torch.from_numpy(off[:-1])).detach().numpy()\n"
        "assert np.allclose(a, b, rtol=1e-4, atol=1e-4)\n"
        "print('ok', fastrec.get_num_threads(), torch.get_num_threads())\n"
    )
    r = _run(["-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_example_command_runs():
    r = _run(["-m", "fastrec", "example"])
    assert r.returncode == 0, r.stderr
    assert "embedding_bags" in r.stdout


def test_kernels_subpackage_installed():
    import fastrec.kernels  # noqa: F401


def test_cuda_not_required():
    d = info.info()
    if not d["cuda_module_built"]:
        with pytest.raises(ImportError):
            import fastrec._C_cuda  # noqa: F401


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 prefetch instructions")
def test_embedding_kernels_keep_their_prefetches():
    """The embedding kernels prefetch rows ahead with prefetcht2 / prefetcht0 (volatile asm). GCC once
    deleted every one of them after a refactor (a prefetch changes no result), which no result
    test can see and which made DRAM-bound gathers 2-3x slower: look for them in the binary."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    # ~1600 per x86 ISA level in this build, almost all in the per-row loops (the bursts at the
    # start of each job are a few hundred): a build that lost the loops' prefetches falls far short.
    assert out.count("prefetcht2") >= 1000, "the embedding kernels' row prefetches are missing from the build"
    # prefetcht0: the L1 prefetches of quantized rows and the far prefetch of float rows into L1
    # (Zen 5's plan): 3690 in this build, 2340 in one without the float rows' L1 variant.
    assert out.count("prefetcht0") >= 3000, "the float rows' L1 prefetches are missing from the build"


def test_info_into_a_closed_pipe_prints_no_traceback():
    """`python -m fastrec.info | head -1` ended with a BrokenPipeError traceback."""
    for args in (["-m", "fastrec.info"], ["-m", "fastrec", "info"]):
        p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=tempfile.gettempdir())
        p.stdout.close()  # the reader is gone before the first write
        err = p.stderr.read().decode()
        p.wait(timeout=120)
        p.stderr.close()
        assert "Traceback" not in err, err


def test_cpp_bench_programs_build(tmp_path):
    """benches/cpp's standalone programs (cited in BENCHMARKS.md) still compile and link with the
    command in their header: gemm_ceiling includes a kernel file, which a change there broke."""
    import re

    if os.environ.get("FASTREC_CPU_ISA"):
        pytest.skip("compiling does not depend on the ISA level: the default pass covers it")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    root = Path(__file__).resolve().parents[1]
    sources = sorted((root / "benches" / "cpp").glob("*.cpp"))
    if not sources:
        pytest.skip("no benches/cpp here (installed package only)")
    for src in sources:
        m = re.search(r"^//\s+(g\+\+ .*)$", src.read_text(), re.M)
        assert m, f"{src.name}: no build command in its header"
        args = m.group(1).split()
        args[args.index("-o") + 1] = str(tmp_path / src.stem)
        cwd = root if any("benches/cpp/" in a for a in args) else src.parent
        r = subprocess.run([gxx] + args[1:], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{src.name}: {r.stderr[-2000:]}"

"""`fastrec demo`: the embedded models load and serve with no torch, and agree with NumPy."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import fastrec
from fastrec.demo import demo_model_path


def test_demo_models_are_shipped():
    for name in ("ranking", "retrieval"):
        with demo_model_path(name) as path:
            model = fastrec.load(path)
            assert model.featurizer is not None
            assert model.precision == "int8"


def test_fastrec_demo_cli(tmp_path):
    exe = shutil.which("fastrec", path=os.path.dirname(sys.executable))
    # no torch: a site hook that makes `import torch` fail in the child
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    cmd = [exe, "demo", "--repeat", "3"] if exe else [sys.executable, "-m", "fastrec", "demo", "--repeat", "3"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for line in ("Recommendations (recommend_raw, top 10 of 3000 items)", "Ranking 270 raw candidates",
                 "request handling", "featurisation", "model", "Agreement with the NumPy reference"):
        assert line in out, out
    assert out.rstrip().endswith("OK"), out
    assert "new user" in out


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["example"], ["info"], ["demo", "--repeat", "2"]])
def test_cli_output_into_a_closed_pipe_is_quiet(args):
    """`fastrec ... | head`: output smaller than stdout's buffer was written at interpreter exit,
    outside the BrokenPipeError handler ("Exception ignored ... BrokenPipeError", exit code 120);
    --help / --version were not covered at all."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before anything is written
    try:
        p = subprocess.run([sys.executable, "-m", "fastrec", *args], stdout=w_fd, stderr=subprocess.PIPE,
                           env=env, cwd=tempfile.gettempdir(), timeout=300)
    finally:
        os.close(w_fd)
    assert p.returncode in (0, 1) and b"Traceback" not in p.stderr and b"Exception ignored" not in p.stderr, p.stderr


def test_cli_number_limits(capsys):
    from fastrec import cli

    for args, message in ((["demo", "--users", "1.5"], "not an integer"), (["demo", "--candidates", "10000000"], "at most 100000"),
                          (["demo", "--repeat", "1e9"], "not an integer")):
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_version(capsys):
    from fastrec import __version__, cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastrec {__version__}"


def test_demo_cli_refuses_too_few_candidates(capsys):
    """--candidates below the demo's minimum is an argparse error (exit 2), not a traceback."""
    from fastrec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--candidates", "5"])
    assert exc.value.code == 2
    assert "--candidates: must be at least 10" in capsys.readouterr().err

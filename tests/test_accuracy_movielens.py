"""The accuracy rules of the issue "Accuracy", on MovieLens 100k and on synthetic data.

Runs the pipeline of ``benches/accuracy_movielens.py`` (imported from the repository: it is a
script, not part of the package) in its ``--fast`` configuration:

* ranking (``time_split``, label = rating >= 4): fastrec fp32 probabilities equal the torch
  model's within 1e-5 relative; fastrec int8 (int8 MLPs, q8 tables) AUC >= 0.999 x the same
  model's fp32 AUC; a student distilled with >= 4x fewer MLP MACs keeps >= 0.99 x the teacher's
  AUC;
* retrieval (``leave_last_out_split``, each user's last positive held out): fastrec int8
  Recall@10 and NDCG@10 >= 0.99 x the torch fp32 model's (brute force).

The MovieLens tests skip when the data is absent, unless ``FASTREC_DATA`` is set (CI sets it):
then they must run. The synthetic (``synthetic_ctr``) ranking test always runs.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")


SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benches" / "accuracy_movielens.py"


def _load_script():
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} is not here (tests run from a source checkout)")
    name = "_fastrec_bench_accuracy_movielens"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def acc():
    return _load_script()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("accuracy"))


def _assert_rules(rows):
    failed = [f"{rule}: {value:.6g} (target {target})" for rule, value, target, ok in rows if not ok]
    assert not failed, "accuracy rules not met:\n" + "\n".join(failed)


def test_ranking_rules_synthetic(acc, workdir):
    acc.set_threads(2)
    r = acc.evaluate_ranking(acc.ranking_synthetic(), acc.SYNTHETIC, workdir, log=lambda s: None)
    _assert_rules(acc.ranking_checks(r, "synthetic"))


def test_ranking_rules_movielens(acc, ml, workdir):
    acc.set_threads(2)
    cfg = acc.FAST[0]
    r = acc.evaluate_ranking(acc.ranking_movielens(ml), cfg, workdir, log=lambda s: None)
    t, s = r["models"]["teacher"], r["models"]["student"]
    assert t["auc_torch_fp32"] > 0.65, t  # the models learn something on this split
    assert s["mlp_macs"]["total"] * 4 <= t["mlp_macs"]["total"]
    _assert_rules(acc.ranking_checks(r, "ranking"))


def test_retrieval_rules_movielens(acc, ml, workdir):
    acc.set_threads(2)
    r = acc.evaluate_retrieval_pooled(ml, acc.FAST[1], workdir, log=lambda s: None)
    assert len(r["per_seed"]) == len(acc.FAST[1].seeds) >= 3
    for res in r["per_seed"].values():
        ref = res["torch fp32 (brute force)"]
        assert ref["recall@10"] > 0.08, ref  # far above chance (10 / 1682)
        fp32 = res["fastrec fp32"]  # fp32 export: the same top 10 as torch's
        assert fp32["same_top10_as_torch"] >= 0.99, fp32
    _assert_rules(acc.retrieval_checks(r))

"""Helpers of benchmark scripts that no stage exercises (benchmarks/ is not a package: each is loaded by path)."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subtask_groups_sort_with_numbers_and_words_in_one_field():
    # A run's random models with a hand-trained one beside them (the T repro's 16x diagnostic): the
    # plain digit/word key raised TypeError comparing 16x with 29440.
    names = ["random_untargeted_117760_e1", "random_untargeted_16x", "random_untargeted_29440_e1", "dsdm_mix_7360_e4"]
    order = sorted(names, key=_load("subtask_losses").group_order)
    assert order == [names[3], names[2], names[0], names[1]]


def test_parallel_models_copies_the_upstream_stages_only(tmp_path):
    # Both arms must start from the same finished upstream stages and train every model: a model or an eval record
    # copied along would be skipped by one arm and time nothing.
    src = tmp_path / "run"
    upstream = ["pool/tokens.bin", "scores/dsdm/mix.npy", "selections/models/keep", "selections/x/indices.npy"]
    downstream = ["models/a/model.safetensors", "eval/a/metrics.json", "figures/curve.png", "results.csv", "report.md"]
    for rel in upstream + downstream:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dst = tmp_path / "arm"
    (dst / "models" / "stale").mkdir(parents=True)
    _load("parallel_models").copy_upstream(src, dst)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == upstream

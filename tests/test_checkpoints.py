"""Saved models as others load them (dsdm.model.save_model, via dsdm.train): config.json carries the pool tokenizer's
bos/eos/pad ids and the tokenizer sits beside the weights, so transformers' AutoTokenizer and AutoModelForCausalLM
load the directory without warnings; and untrusted checkpoints: a pickle-bearing weights file is refused.

Run: pytest tests/test_checkpoints.py
"""

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from dsdm.ingest import PoolBuildConfig, build_pool
from dsdm.model import build_model, load_model, save_model
from dsdm.pool import Pool
from dsdm.train import TrainConfig, train

WORDS = "the cat sat on a mat while dogs ran far away from home under grey skies".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real pool (its own BPE, EOS not at GPT-2's 50256) and a micro model trained on it for a few steps."""
    root = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, 20).tolist()) + f" {i}."}) + "\n")
    pool = Pool(
        build_pool([str(root / "docs.jsonl")], root / "pool", PoolBuildConfig("train:300", seq_len=16, workers=1))
    )
    cfg = TrainConfig(preset="micro", steps=3, batch_size=4, device="cpu", log_every=1)
    return pool, train(pool, None, cfg, root / "model")


def test_saved_model_carries_the_pool_tokenizer_and_its_ids(trained, caplog, capfd):
    transformers = pytest.importorskip("transformers")
    pool, out = trained
    config = json.loads((out / "config.json").read_text())
    assert pool.eos_id != 50256 and pool.vocab_size < 50256
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == pool.eos_id
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    # transformers logs through its own stderr handler, not the root logger: read stderr too
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + [capfd.readouterr().err]
    assert not [s for s in said if "eos" in s.lower() or "bos" in s.lower()], said
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok.eos_token == pool.manifest["eos_token"] and tok.eos_token_id == pool.eos_id == tok.pad_token_id
    assert model.config.eos_token_id == model.generation_config.eos_token_id == pool.eos_id
    text = "the cat sat on a mat"
    assert tok(text)["input_ids"] == pool.tokenizer.encode(text, add_special_tokens=False).ids
    # our loader reads the same directory, with the same logits
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        ours, theirs = load_model(out)(ids), model.eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_model_saved_without_a_tokenizer_claims_no_gpt2_ids(tmp_path):
    save_model(build_model("micro", vocab_size=97, seq_len=16), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["eos_token_id"] is None and config["bos_token_id"] is None


class Payload:
    def __reduce__(self):
        return (print, ("pickle ran",))


def test_pickle_bearing_checkpoints_are_refused(tmp_path, capsys):
    model = build_model("micro", vocab_size=97, seq_len=16)
    d = save_model(model, tmp_path / "m")
    (d / "model.safetensors").unlink()
    # a pytorch_model.bin whose pickle calls a function on load
    torch.save({"transformer.wte.weight": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        load_model(d)
    assert "pytorch_model.bin" in str(e.value) and "safetensors" in str(e.value) and "\n" not in str(e.value)
    assert "pickle ran" not in capsys.readouterr().out
    # a plain tensor pickle (what torch.save writes) still loads under weights_only
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    from dsdm.model import _TRANSPOSED

    torch.save({k: (v.t() if k.endswith(_TRANSPOSED) else v) for k, v in state.items()}, d / "pytorch_model.bin")
    assert torch.equal(load_model(d).transformer.wte.weight, model.transformer.wte.weight)


def test_a_planted_training_checkpoint_is_refused(tmp_path, capsys):
    """train() resumes from checkpoint/state.pt; a state.pt that is a code-running pickle must not run."""
    from test_models import _cfg, _pool

    pool = _pool(tmp_path / "pool")
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    torch.save({"meta": Payload()}, out / "checkpoint" / "state.pt")
    with pytest.raises(ValueError) as e:
        train(pool, None, _cfg(steps=2), out)
    assert "state.pt" in str(e.value) and "\n" not in str(e.value)
    assert "pickle ran" not in capsys.readouterr().out

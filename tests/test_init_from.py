"""--init-from: a run starts from another run's weights with a different n_future (paper §3.6)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from _jobs import tiny_config
from mtp.checkpoint import load_model, load_train_state, save_checkpoint, transfer_weights
from mtp.config import JobConfig, model_preset
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer
from mtp.tracking.runs import start_run
from mtp.train import train


def source_checkpoint(tmp_path, n_future: int, **model) -> tuple[str, MTPTransformer]:
    torch.manual_seed(1)
    cfg = JobConfig(model=model_preset("debug", n_future=n_future, **model))
    cfg.tracking.run_id = "0123abcd"
    src = MTPTransformer(cfg.model)
    path = save_checkpoint(tmp_path / f"src-n{n_future}", src, cfg, ByteTokenizer())
    return str(path), src


def split_state(model: MTPTransformer) -> tuple[dict, dict]:
    """(trunk/embedding/norm/unembedding weights, {head index: that head's weights})."""
    trunk, heads = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith("heads."):
            heads.setdefault(int(key.split(".")[1]), {})[key.split(".", 2)[2]] = value
        else:
            trunk[key] = value
    return trunk, heads


@pytest.mark.parametrize("n_src,n_dst", [(4, 1), (4, 2), (2, 4), (3, 3)])
def test_weights_map_exactly(tmp_path, n_src, n_dst):
    path, src = source_checkpoint(tmp_path, n_src)
    torch.manual_seed(2)
    dst = MTPTransformer(model_preset("debug", n_future=n_dst))
    torch.manual_seed(2)
    fresh = MTPTransformer(model_preset("debug", n_future=n_dst))  # what new heads must keep
    report = transfer_weights(dst, path)
    assert report == {"kept_heads": list(range(min(n_src, n_dst))), "dropped_heads": list(range(n_dst, n_src)),
                      "new_heads": list(range(n_src, n_dst))}
    (src_trunk, src_heads), (dst_trunk, dst_heads) = split_state(src), split_state(dst)
    _, fresh_heads = split_state(fresh)
    assert src_trunk.keys() == dst_trunk.keys()
    for key in src_trunk:
        assert torch.equal(src_trunk[key], dst_trunk[key]), key
    assert sorted(dst_heads) == list(range(n_dst))
    for i in range(n_dst):
        expected = src_heads[i] if i < n_src else fresh_heads[i]
        for key in expected:
            assert torch.equal(dst_heads[i][key], expected[key]), (i, key)
    if n_src < n_dst:  # the new heads really are not copies of the source's
        assert not torch.equal(dst_heads[n_dst - 1]["attention.wq.weight"], src_heads[n_src - 1]["attention.wq.weight"])


def test_param_matched_trunk_depth_must_agree(tmp_path):
    path, _ = source_checkpoint(tmp_path, 4, n_layers=6, param_matched=True)  # trunk of 6 - 1 - 3 = 2 blocks
    same_trunk = MTPTransformer(model_preset("debug", n_future=1, n_layers=3, param_matched=True))
    transfer_weights(same_trunk, path)
    with pytest.raises(ValueError, match="n_trunk_layers: 2 in the source, 5 here"):
        transfer_weights(MTPTransformer(model_preset("debug", n_future=1, n_layers=6, param_matched=True)), path)
    with pytest.raises(ValueError, match="dim: 64 in the source, 128 here"):
        transfer_weights(MTPTransformer(model_preset("debug", n_future=1, n_layers=3, dim=128,
                                                     param_matched=True)), path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        transfer_weights(same_trunk, tmp_path / "missing")


def test_training_starts_from_the_source_with_a_fresh_optimizer(tmp_path, mlflow_uri):
    pretrained = train(tiny_config(tmp_path, **{"model.n_future": 2, "train.max_steps": 4,
                                                "tracking.run_name": "pre"}))
    cfg = tiny_config(tmp_path, **{"model.n_future": 1, "train.max_steps": 1, "train.lr": 1e-12,
                                   "train.warmup_steps": 0, "train.init_from": str(pretrained.checkpoint),
                                   "tracking.run_name": "fine", "tracking.tracking_uri": mlflow_uri})
    finetuned = train(cfg)
    before, _, _ = load_model(pretrained.checkpoint)
    after, _, config = load_model(finetuned.checkpoint)
    assert config["model"]["n_future"] == 1 and len(after.heads) == 1
    for key, value in after.state_dict().items():  # one step at lr 1e-12 leaves the weights where they started
        torch.testing.assert_close(value, before.state_dict()[key], rtol=0, atol=1e-9, msg=key)
    state = load_train_state(finetuned.checkpoint)
    assert state["step"] == 1
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())  # fresh AdamW, not the source's
    run_id = start_run(cfg)
    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags["init_from"] == str(pretrained.checkpoint)
    assert tags["init_from_run_id"] == "" and tags["n_future"] == "1"  # the source trained untracked


def test_lineage_tag_names_the_source_run(tmp_path, mlflow_uri):
    path, _ = source_checkpoint(tmp_path, 4)
    cfg = JobConfig(model=model_preset("debug", n_future=1))
    cfg.train.init_from = path
    cfg.tracking.tracking_uri = mlflow_uri
    tags = MlflowClient(mlflow_uri).get_run(start_run(cfg.validate())).data.tags
    assert tags["init_from"] == path and tags["init_from_run_id"] == "0123abcd"

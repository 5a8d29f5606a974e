"""The networks are pluggable like every other part: model=vae_conv swaps the MLPs for a small
convolutional encoder and decoder (one class each, one YAML file), which train, checkpoint, resume
and load like the MLPs; a checkpoint naming a network outside the project is refused. Checkpoints
of the earlier layout (the module's model held as `vae`) still load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import error_of, train_in
from discrete_vae.build import load_checkpoint
from discrete_vae.networks import ConvDecoder, ConvEncoder


def test_the_conv_networks_map_images_to_logits_and_back_with_any_leading_dims():
    encoder, decoder = ConvEncoder(784, (20, 10)), ConvDecoder(200, 784)
    x = torch.rand(3, 784)
    assert encoder(x).shape == (3, 20, 10) and encoder(x.expand(2, 3, 784)).shape == (2, 3, 20, 10)
    h = torch.rand(4, 3, 200)  # (S, B, D_z)
    assert decoder(h).shape == (4, 3, 784)
    torch.testing.assert_close(decoder(h)[1], decoder(h[1]))  # each row on its own
    with pytest.raises(Exception, match=r"image_shape=\[1, 28, 28\] must be .* = 100 pixels"):
        ConvEncoder(100, (2, 3))


def test_a_conv_vae_trains_checkpoints_and_loads(tmp_path, monkeypatch, data_root):
    run = tmp_path / "run"
    record = train_in(run, monkeypatch, "model=vae_conv", "trainer.max_steps=4")
    assert record["status"] == "finished" and record["steps"] == 4
    module, cfg = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(module.model.encoder, ConvEncoder) and isinstance(module.model.decoder, ConvDecoder)
    assert cfg.model.encoder._target_ == "discrete_vae.networks.ConvEncoder"
    # the data-mean output bias: per pixel, the logit of a mean in [0.001, 0.999], moved by 4 steps at most a little
    bias = module.model.decoder.output_bias.detach()
    assert bias.shape == (784,) and bias.min() < -5 and bias.max() > 0


def test_a_network_from_elsewhere_in_a_checkpoint_is_refused(trained_run, tmp_path):
    last = tmp_path / "last.ckpt"
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["config"]["model"]["encoder"] = {"_target_": "os.system", "_partial_": True}
    torch.save(checkpoint, last)
    message = error_of(lambda: load_checkpoint(last))
    assert "model.encoder._target_='os.system' is not a Module of discrete_vae" in message


def test_a_checkpoint_of_the_earlier_layout_loads_and_resumes(trained_run, tmp_path, monkeypatch):
    """The module held its model as `vae` (state keys vae.*): evaluated and resumed as before."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"] = {k.replace("model.", "vae.", 1) if k.startswith("model.") else k: v
                                for k, v in checkpoint["state_dict"].items()}
    assert any(k.startswith("vae.encoder.") for k in checkpoint["state_dict"])
    torch.save(checkpoint, last)
    module, _ = load_checkpoint(last)
    weight = checkpoint["state_dict"]["vae.encoder.net.0.weight"]
    torch.testing.assert_close(module.model.encoder.net[0].weight.detach(), weight)
    (run / "metrics.json").unlink()  # unfinished: a rerun resumes from last.ckpt
    record = train_in(run, monkeypatch, "trainer.max_steps=6")
    assert record["status"] == "finished" and record["steps"] == 6 and record["resumed_from_step"] == 4
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6

"""The PyTorch port behind benchmarks/torch_reference.py computes the same network as ours."""
import os
import sys

import jax
import numpy as np
import torch

from conftest import tiny_model_config
from configs import default
from stas_jax.tools import convert
from stas_jax.model import network
from stas_jax.model.spec import spec_from_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
import torch_reference  # noqa: E402  pylint: disable=g-import-not-at-top


def test_port_has_the_reference_state_dict_and_parameter_count():
  cfg = default.get_model_config()
  cfg.num_classes = 100
  net = torch_reference.TorchSpikformer(spec_from_config(cfg))
  assert sum(p.numel() for p in net.parameters()) == 9_359_380  # as tests/test_model.py
  tiny = tiny_model_config(patch_embed='sps', **{'halt.mode': 'none'})
  variables = network.init_variables(network.create_model(tiny), jax.random.PRNGKey(0))
  want = {k for k in convert.to_pytorch(variables, tiny) if not convert.is_ignored_key(k)}
  got = set(torch_reference.TorchSpikformer(spec_from_config(tiny)).state_dict())
  assert {k for k in got if not convert.is_ignored_key(k)} == want


def test_port_gives_our_eval_logits():
  cfg = tiny_model_config(patch_embed='sps', **{'halt.mode': 'none'})
  torch.manual_seed(0)
  net = torch_reference.TorchSpikformer(spec_from_config(cfg))
  images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32) * 2
  torch_reference.calibrate_batch_stats(net, images)
  rates, lif = [], torch_reference.multistep_lif

  def counting_lif(x, *args, **kwargs):
    spikes = lif(x, *args, **kwargs)
    rates.append(float(torch.mean(spikes)))
    return spikes

  torch_reference.multistep_lif = counting_lif
  try:
    with torch.no_grad():
      net.eval()(torch.from_numpy(images))
  finally:
    torch_reference.multistep_lif = lif
  assert min(rates) > 0, rates  # every LIF fires
  assert torch_reference.check_same_logits(net, cfg, images) < 1e-4

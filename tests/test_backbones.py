"""SDT and QKFormer beyond their parity fixtures: every size from the config, STAS (I-SPS and
halting) on each, early-exit inference equal to the dense path, and config validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax.model import early_exit
from stas_jax.model import energy
from stas_jax.model import network
from stas_jax.model import qkformer
from stas_jax.model.spec import spec_from_config

# QKFormer's stage 1 runs at the image size: 16 x 16 keeps the tests quick (stage 3: 4 x 4).
TINY = {'sdt': {'backbone': 'sdt'},
        'qkformer': {'backbone': 'qkformer', 'image_size': 16, 'depth': 4}}
STAS = {'patch_embed': 'isps', 'halt.mode': 'spatiotemporal', 'halt.gamma': 1.0}


def _config(backbone, **overrides):
  return tiny_model_config(**{**TINY[backbone], **overrides})


def _images(cfg, seed, batch=4):
  size = cfg.image_size
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, cfg.in_channels)) * 2


@functools.lru_cache(maxsize=None)
def _variables(backbone, **overrides):
  """Random weights with BatchNorm statistics calibrated on a batch, so the network spikes."""
  cfg = _config(backbone, **overrides)
  variables = network.init_variables(network.create_model(cfg), jax.random.PRNGKey(0))
  # With momentum 0 one train pass sets the running statistics to the batch statistics.
  calib = network.create_model(_config(backbone, bn_momentum=0.0, **overrides))
  _, state = jax.jit(lambda v, x: calib.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, _images(cfg, 7, batch=8))
  return {'params': variables['params'], 'batch_stats': state['batch_stats']}


# Other widths, depths, T and patch sizes than the fixtures', with STAS on: shapes and sums.
SIZES = [
    ('sdt', dict(dim=48, heads=3, depth=3, timesteps=2, mlp_ratio=1, patch_size=8,
                 num_classes=7, **STAS)),
    ('qkformer', dict(dim=64, heads=2, depth=5, timesteps=3, mlp_ratio=2, patch_size=8,
                      num_classes=7, **{'isps.tail': 'multi_step'}, **STAS)),
]


@pytest.mark.parametrize('backbone,sizes', SIZES, ids=[s[0] for s in SIZES])
def test_other_sizes_build_train_and_run(backbone, sizes):
  cfg = _config(backbone, **sizes)
  s = spec_from_config(cfg)
  model = network.create_model(cfg)
  images = _images(cfg, 1, batch=3)
  variables = network.init_variables(model, jax.random.PRNGKey(1))

  def loss(params, batch_stats):
    (logits, aux), state = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                       train=True, mutable=['batch_stats'])
    return jnp.sum(logits ** 2) + jnp.mean(aux['ponder']), (logits, aux, state)

  grads, (logits, aux, state) = jax.jit(jax.grad(loss, has_aux=True))(
      variables['params'], variables['batch_stats'])
  depth = s.encoder_depth
  assert depth == (s.depth - 2 if backbone == 'qkformer' else s.depth)
  assert logits.shape == (3, 7)
  assert aux['active'].shape == (s.timesteps, depth, 3, s.num_tokens)
  assert aux['embed'].shape == (s.timesteps, 3, s.num_tokens, s.dim)
  # I-SPS: every timestep of the encoder receives the same token map.
  np.testing.assert_array_equal(aux['embed'][0], aux['embed'][-1])
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(
      variables['batch_stats'])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  e = energy.estimate(aux, cfg)
  assert e['energy_mj'].shape == (3,) and bool(jnp.all(e['energy_mj'] > 0))
  rates = {k: float(v) for k, v in e['firing_rates'].items()}
  assert all(0 <= r <= 1 for r in rates.values()), rates
  assert len([k for k in rates if k.startswith(('block.', 'stage3.'))]) == depth * (
      7 if backbone == 'sdt' else 7)


def _embed(backbone, variables, images, **overrides):
  """The encoder input (T, B, N, D) and the patch embedding's sums, eval mode."""
  model = network.create_model(_config(backbone, **overrides))
  return jax.jit(lambda v, x: model.apply(v, x, False, method=network.STAS.embed))(
      variables, images)


@pytest.mark.parametrize('backbone', ['sdt', 'qkformer'])
def test_isps_with_one_timestep_is_sps(backbone):
  """With T = 1 the integration over time is the identity, so I-SPS (convolutions once, every
  tail LIF one step) computes what SPS computes, sums included."""
  one = dict(timesteps=1, **{'isps.tail': 'single_step'})
  variables = _variables(backbone, **one)
  images = _images(_config(backbone, **one), 3)
  u_sps, sums_sps = _embed(backbone, variables, images, patch_embed='sps', **one)
  u_isps, sums_isps = _embed(backbone, variables, images, patch_embed='isps', **one)
  np.testing.assert_array_equal(u_isps, u_sps)
  assert float(jnp.sum(jnp.abs(u_sps))) > 0
  for name, value in sums_sps.items():
    np.testing.assert_array_equal(sums_isps[name], value, err_msg=name)


@pytest.mark.parametrize('backbone', ['sdt', 'qkformer'])
def test_sps_output_integration_is_the_time_mean(backbone):
  """`isps.integrate_at = sps_output` feeds every timestep the mean of the SPS token maps."""
  variables = _variables(backbone)
  images = _images(_config(backbone), 4)
  u_sps, _ = _embed(backbone, variables, images, patch_embed='sps')
  u_out, _ = _embed(backbone, variables, images, patch_embed='isps',
                    **{'isps.integrate_at': 'sps_output'})
  assert float(jnp.std(u_sps, axis=0).max()) > 0, 'the SPS token maps should vary over time'
  for t in range(u_out.shape[0]):
    np.testing.assert_allclose(u_out[t], jnp.mean(u_sps, axis=0), atol=1e-6)


# Halting that stops part of the tokens midway, for the early-exit comparison.
EARLY_EXIT = {'sdt': dict(**STAS, **{'halt.beta': -1.0}),
              'qkformer': dict(**STAS, **{'halt.beta': -1.0}, proj_lif_over_batch=True,
                               timesteps=2)}


@pytest.mark.parametrize('backbone', ['sdt', 'qkformer'])
def test_early_exit_gives_the_dense_outputs(backbone):
  """early_exit.apply on SDT (its per-image talking-heads neurons and per-timestep head input)
  and QKFormer (stage 3, here with the proj_lif run over the batch): the dense path's logits,
  masks and statistics, with part of the work skipped."""
  overrides = EARLY_EXIT[backbone]
  cfg = _config(backbone, **overrides)
  model = network.create_model(cfg)
  variables = _variables(backbone, **overrides)
  images = _images(cfg, 3)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  fast, aux_ee = jax.jit(functools.partial(early_exit.apply, model,
                                           fractions=(0.25, 0.5, 0.95)))(variables, images)
  np.testing.assert_allclose(fast, logits, atol=1e-6)
  np.testing.assert_array_equal(aux_ee['active'], aux['active'])
  for name, value in aux['block_stats'].items():
    np.testing.assert_allclose(aux_ee['block_stats'][name], value, atol=1e-4, err_msg=name)
  if backbone == 'sdt':
    np.testing.assert_array_equal(aux_ee['head_stats']['head_lif'], aux['head_stats']['head_lif'])
    assert float(np.sum(aux['head_stats']['head_lif'])) > 0, 'the head LIF never fired'
  assert 0 < float(np.mean(aux['active'])) < 1, 'the test needs partly halted tokens'
  assert float(aux_ee['rows_ratio']) < 1, 'no work was skipped'
  np.testing.assert_allclose(energy.estimate(aux_ee, cfg)['energy_mj'],
                             energy.estimate(aux, cfg)['energy_mj'], rtol=1e-5)


def test_qkformer_stage_geometry():
  s = spec_from_config(_config('qkformer', dim=96, heads=3, image_size=32, patch_size=8))
  assert qkformer.stage_widths(s) == (24, 48, 96)
  assert qkformer.stage_sides(s) == (16, 8, 4) and qkformer.init_pools(s) == 1
  assert s.num_tokens == 16 and s.encoder_depth == 2 and not s.qkv_bias


@pytest.mark.parametrize('overrides,message', [
    ({'backbone': 'vit'}, 'model.backbone'),
    ({'backbone': 'qkformer', 'depth': 2}, 'depth >= 3'),
    ({'backbone': 'qkformer', 'depth': 3, 'patch_size': 2}, 'patch size is 4'),
    ({'backbone': 'qkformer', 'depth': 3, 'dim': 32, 'heads': 16}, 'multiple of heads'),
    ({'backbone': 'sdt', 'geometry': 'imagenet'}, "keep 'cifar'"),
    ({'proj_lif_over_batch': True}, 'QKFormer'),
])
def test_invalid_backbone_configs_say_what_to_change(overrides, message):
  with pytest.raises(ValueError, match=message):
    spec_from_config(tiny_model_config(**overrides))

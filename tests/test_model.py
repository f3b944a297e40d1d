"""The backbone: sizes, parameter counts, input checks, end-to-end gradient flow."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from conftest import tiny_model_config
from stas_jax.train import losses
from stas_jax.model import network
from stas_jax.model.spec import ModelSpec, spec_from_config


def count_params(cfg):
  model = network.create_model(cfg)
  s = model.spec
  images = jax.ShapeDtypeStruct((1, s.image_size, s.image_size, s.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def test_spikformer_4_384_cifar100_param_count():
  cfg = default.get_model_config()
  cfg.num_classes = 100
  # PyTorch's 9,365,524 minus the 6,144 LayerNorm parameters it builds but never uses.
  assert count_params(cfg) == 9_359_380


def imagenet_8_512():
  cfg = default.get_model_config()
  cfg.update(geometry='imagenet', image_size=224, patch_size=16, dim=512, depth=8, heads=8,
             num_classes=1000)
  return cfg


def test_imagenet_8_512_builds_and_runs():
  cfg = imagenet_8_512()
  n = count_params(cfg)
  # Bias-free q/k/v (3 * 512 per block) compared with the CIFAR geometry.
  cifar_like = cfg.copy_and_resolve_references()
  cifar_like.geometry = 'cifar'
  assert count_params(cifar_like) - n == 8 * 3 * 512
  model = network.create_model(cfg)
  variables = network.init_variables(model, jax.random.PRNGKey(0))
  logits, aux = jax.jit(model.apply)(variables, jnp.ones((1, 224, 224, 3)))
  assert logits.shape == (1, 1000)
  assert aux['active'].shape == (4, 8, 1, 196)
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize('shape,match', [((2, 28, 28, 3), 'H, W, C'), ((2, 32, 32, 1), 'H, W, C'),
                                         ((32, 32, 3), 'NHWC')])
def test_wrong_image_shape_is_a_clear_error(shape, match):
  model = network.create_model(tiny_model_config())
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros(shape))


@pytest.mark.parametrize('override,match', [
    ({'patch_embed': 'spx'}, 'patch_embed'),
    ({'halt.mode': 'both'}, 'halt.mode'),
    ({'halt.prior': 'gaussian'}, 'halt.prior'),
    ({'patch_size': 6}, 'patch size'),
    ({'heads': 5}, 'divisible'),
    ({'neuron.surrogate': 'relu'}, 'surrogate'),
    ({'isps.tail': 'multi_step,single_step'}, 'one mode or 4 comma-separated'),
    ({'isps.tail': 'multi_step,single_step,single_step,any_step'}, "'any_step' is not valid"),
    ({'isps.tail': 'single_step,single_step,multi_step,single_step'}, 'both be multi_step'),
    ({'isps.tail_steps': -1}, 'tail_steps=-1'),
])
def test_bad_config_values_are_clear_errors(override, match):
  with pytest.raises(ValueError, match=match):
    spec_from_config(tiny_model_config(**override))


def test_unknown_config_key_is_named():
  cfg = tiny_model_config().to_dict()
  cfg['halt']['gamm'] = 1.0
  with pytest.raises(ValueError, match='gamm'):
    spec_from_config(cfg)


# config.model as configs/default.py spelt it out before ModelSpec became its only source.
DEFAULT_MODEL_GROUP = {
    'backbone': 'spikformer', 'geometry': 'cifar', 'image_size': 32, 'in_channels': 3, 'num_classes': 10,
    'patch_size': 4, 'dim': 384, 'depth': 4, 'heads': 12, 'mlp_ratio': 4, 'timesteps': 4,
    'patch_embed': 'sps', 'attn_scale': 0.125, 'bn_momentum': 0.9, 'bn_epsilon': 1e-5,
    'bn_cross_replica': False, 'dtype': 'float32', 'remat': True,
    'remat_policy': 'dots_saveable', 'unroll_time': True, 'unroll_scans': False,
    'proj_lif_over_batch': False,
    'neuron': {'tau': 2.0, 'v_threshold': 1.0, 'attn_v_threshold': 0.5, 'v_reset': 0.0,
               'surrogate': 'sigmoid', 'alpha': 4.0, 'detach_reset': True},
    'isps': {'reduce': 'mean', 'integrate_at': 'first_lif', 'tail': 'single_step',
             'tail_steps': 0},
    'halt': {'mode': 'none', 'eps': 0.01, 'channel': 0, 'gamma': 1.0, 'beta': -3.0,
             'learnable': False, 'soft_mask': False, 'soft_temperature': 0.05,
             'prior': 'act_weight', 'target_cell': 0.75, 'target_sigma': 1.0, 'alpha_p': 5e-4,
             'alpha_d': 0.1, 'target_token_ratio': 0.0, 'ratio_gain': 0.5,
             'ratio_source': 'eval'},
}


def test_default_model_group_comes_from_model_spec():
  cfg = default.get_model_config()
  assert cfg.to_dict() == DEFAULT_MODEL_GROUP
  for group in ('neuron', 'isps', 'halt'):
    assert isinstance(cfg[group], ml_collections.ConfigDict), group
  # Same types too (ConfigDict overrides are type-checked against them): 1.0 == 1 above.
  typed = lambda d: {k: typed(v) if isinstance(v, dict) else type(v) for k, v in d.items()}
  assert typed(cfg.to_dict()) == typed(DEFAULT_MODEL_GROUP)
  assert spec_from_config(cfg) == ModelSpec()


def test_gradient_reaches_every_parameter():
  cfg = tiny_model_config(patch_embed='sps', **{'halt.mode': 'none'})
  model = network.create_model(cfg)
  variables = network.init_variables(model, jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 2
  targets = jax.nn.one_hot(jnp.arange(4), 10)

  def loss_fn(params):
    (logits, _), _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 images, train=True, mutable=['batch_stats'])
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))

  grads = jax.jit(jax.grad(loss_fn))(variables['params'])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), f'no gradient reaches {name}'


def _halting_train_step(**overrides):
  """Loss, new batch statistics, active mask and gradients of a halting tiny model."""
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 2
  model = network.create_model(tiny_model_config(
      patch_embed='isps', **{'halt.mode': 'spatiotemporal', 'halt.beta': 0.0}, **overrides))
  variables = network.init_variables(model, jax.random.PRNGKey(0))

  def loss_fn(params):
    (logits, aux), new = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                     images, train=True, mutable=['batch_stats'])
    ponder = losses.halt_loss_terms(aux, model.spec)['ponder']
    return jnp.sum(logits ** 2) + ponder, (new, aux['active'])
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


@pytest.mark.parametrize('policy', ['nothing_saveable', 'dots_saveable'])
def test_remat_gives_the_same_loss_gradients_and_statistics(policy):
  """jax.checkpoint per encoder cell only trades memory for recomputation."""
  run = _halting_train_step
  (loss, (stats, active)), grads = run(remat=False)
  (loss_r, (stats_r, active_r)), grads_r = run(remat=True, remat_policy=policy)
  assert 0 < float(jnp.mean(active)) < 1  # some tokens halt
  np.testing.assert_array_equal(active_r, active)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for want, got in ((grads, grads_r), (stats, stats_r)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), want, got)


@pytest.mark.parametrize('unroll', [dict(unroll_time=True), dict(unroll_scans=True)])
def test_unrolled_scans_give_the_same_loss_gradients_and_statistics(unroll):
  """Unrolling the time scan (or both scans) changes the schedule, not the arithmetic."""
  (loss, (stats, active)), grads = _halting_train_step(unroll_time=False, unroll_scans=False)
  (loss_u, (stats_u, active_u)), grads_u = _halting_train_step(**unroll)
  assert 0 < float(jnp.mean(active)) < 1
  np.testing.assert_array_equal(active_u, active)
  np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
  for want, got in ((grads, grads_u), (stats, stats_u)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), want, got)


def test_bfloat16_mixed_precision_only_rounds_operands():
  """model.dtype='bfloat16' gives what float32 gives on bfloat16-rounded conv and linear
  kernels and image (spikes and spike counts are exact; products accumulate in float32), and
  gradients that differ only by the rounded cotangents."""
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 2
  targets = jax.nn.one_hot(jnp.arange(4), 10)
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  round_kernels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, a: rounded(a) if path[-1].key == 'kernel' and path[0].key != 'head' else a,
      params)

  def run(dtype, prepare, x):
    model = network.create_model(tiny_model_config(
        patch_embed='sps', **{'halt.mode': 'none'}, dtype=dtype))
    variables = network.init_variables(model, jax.random.PRNGKey(0))

    def loss_fn(params):
      (logits, aux), _ = model.apply(
          {'params': prepare(params), 'batch_stats': variables['batch_stats']}, x, train=True,
          mutable=['batch_stats'])
      loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))
      return loss, (logits, aux['block_stats'], aux['sps_stats'])
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])

  (_, want), grads = run('float32', round_kernels, rounded(images))
  (_, got), grads_b = run('bfloat16', lambda p: p, images)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)        # logits
  jax.tree.map(np.testing.assert_array_equal, got[1:], want[1:])          # spike counts
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_b))
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
  g, g_b = flat(grads), flat(grads_b)
  assert np.dot(g, g_b) / np.linalg.norm(g) / np.linalg.norm(g_b) > 0.999


def test_unknown_remat_policy_is_rejected():
  with pytest.raises(ValueError, match="model.remat_policy='everything' is not valid"):
    spec_from_config(tiny_model_config(remat_policy='everything'))


def test_train_mode_updates_batch_stats_and_is_deterministic():
  model = network.create_model(tiny_model_config())
  variables = network.init_variables(model, jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  (logits1, _), new1 = fn(variables, images)
  (logits2, _), new2 = fn(variables, images)
  np.testing.assert_array_equal(np.asarray(logits1), np.asarray(logits2))
  before = variables['batch_stats']['patch_embed']['proj_bn']['mean']
  after = new1['batch_stats']['patch_embed']['proj_bn']['mean']
  assert not np.allclose(np.asarray(before), np.asarray(after))


def test_retired_halting_keys_load_with_their_one_value_and_fail_clearly_otherwise():
  """Run directories written before halt.score / halt.readout were retired still load."""
  cfg = default.get_model_config().to_dict()
  old = dict(cfg, halt=dict(cfg['halt'], score='channel', readout='cell'))
  assert spec_from_config(old) == spec_from_config(cfg)
  for key, value in (('score', 'linear'), ('readout', 'rate')):
    bad = dict(cfg, halt=dict(cfg['halt'], **{key: value}))
    with pytest.raises(ValueError, match=f'model.halt.{key}=.*retired.*8aa8881'):
      spec_from_config(bad)

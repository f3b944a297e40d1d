"""stas_jax.model.energy: a hand-counted aux, then the real model with halting and I-SPS."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stas_jax.model import energy
from stas_jax.train import losses
from stas_jax.model import network

# ---------------------------------------------------------------------------------------------
# 1. A hand-built aux for a tiny spec, checked against arithmetic done by hand.
# ---------------------------------------------------------------------------------------------
# 8x8 one-channel image, patch 4 (max-pools after SPS stages 2 and 3): SPS channels (1, 2, 4, 8),
# N = 2 x 2 = 4 tokens, D = 8, one head (head_dim 8), hidden 16, T = 2, L = 1, B = 2.
TINY = dict(image_size=8, in_channels=1, num_classes=2, patch_size=4, dim=8, depth=1, heads=1,
            mlp_ratio=2, timesteps=2)


def _per_cell(b0, b1):
  """(T=2, L=1, B=2) block stat from per-image (t0, t1) values."""
  return np.array([[[b0[0], b1[0]]], [[b0[1], b1[1]]]], np.float32)


def tiny_aux():
  active = np.zeros((2, 1, 2, 4), np.float32)
  active[0, 0, 0] = [1, 1, 1, 1]   # image 0: all tokens at t0, tokens 0-1 at t1
  active[1, 0, 0] = [1, 1, 0, 0]
  active[0, 0, 1] = [1, 1, 1, 1]   # image 1: all tokens at t0, token 0 at t1
  active[1, 0, 1] = [1, 0, 0, 0]
  block_stats = {
      'x_in': _per_cell((10, 6), (8, 3)),
      'q_lif': _per_cell((5, 2), (4, 1)),
      'k_lif': _per_cell((6, 3), (2, 1)),
      'v_lif': _per_cell((7, 1), (3, 0)),
      'qk_map': _per_cell((9, 4), (5, 1)),
      'attn_lif': _per_cell((4, 2), (3, 1)),
      'proj_lif': _per_cell((3, 1), (2, 0)),
      'x_mid': _per_cell((12, 7), (9, 3)),
      'fc1_lif': _per_cell((20, 5), (10, 2)),
      'fc2_lif': _per_cell((6, 2), (4, 1)),
  }
  f = lambda a, b: np.array([a, b], np.float32)
  sps_stats = {
      'conv1_in': f(30, 20), 'conv2_in': f(25, 15), 'conv3_in': f(12, 8), 'rpe_in': f(10, 6),
      'proj_lif': f(40, 24), 'proj_lif1': f(50, 14), 'proj_lif2': f(60, 4),
      'proj_lif3': f(100, 28), 'rpe_lif': f(16, 16),
      # Per-token sums of the encoder input U (T, B, N); only read when U is a rate.
      'token_values': np.array([[[1, 0.5, 0, 1.5], [0.5, 0.5, 1, 0]]] * 2, np.float32),
  }
  return {'active': active, 'block_stats': block_stats, 'sps_stats': sps_stats}


# Per image [image 0, image 1]:
HAND_SOPS = {
    'patch_embed.proj_conv1': [30 * 9 * 2, 20 * 9 * 2],               # 540, 360
    'patch_embed.proj_conv2': [25 * 9 * 4, 15 * 9 * 4],               # 900, 540
    'patch_embed.proj_conv3': [12 * 9 * 8, 8 * 9 * 8],                # 864, 576
    'patch_embed.rpe_conv': [10 * 9 * 8, 6 * 9 * 8],                  # 720, 432
    'attention.q_linear': [(10 + 6) * 8, (8 + 3) * 8],                # 128, 88
    'attention.k_linear': [128, 88],
    'attention.v_linear': [128, 88],
    'attention.qk': [5 * 4 + 2 * 2, 4 * 4 + 1 * 1],                   # 24, 17 (sum Q x active)
    'attention.qk_v': [(9 + 4) * 8, (5 + 1) * 8],                     # 104, 48
    'attention.proj_linear': [(4 + 2) * 8, (3 + 1) * 8],              # 48, 32
    'mlp.fc1_linear': [(12 + 7) * 16, (9 + 3) * 16],                  # 304, 192
    'mlp.fc2_linear': [(20 + 5) * 8, (10 + 2) * 8],                   # 200, 96
    'patch_embed': [3024, 1908],
    'attention': [560, 361],       # 3 * 128 + 24 + 104 + 48; 3 * 88 + 17 + 48 + 32
    'mlp': [504, 288],
    'total': [3024 + 560 + 504, 1908 + 361 + 288],
}
# conv0: 8 * 8 pixels * 1 in-channel * 1 out-channel * 9 = 576 MACs; head: 8 * 2 = 16 MACs.
# Energy in pJ, image 0: patch 4.6 * 576 + 0.9 * 3024 = 2649.6 + 2721.6 = 5371.2,
#   attention 0.9 * 560 = 504, mlp 0.9 * 504 = 453.6, head 4.6 * 16 = 73.6; total 6402.4.
# Image 1: patch 2649.6 + 0.9 * 1908 = 4366.8, attention 324.9, mlp 259.2, head 73.6; 5024.5.
HAND_SPLIT_PJ = {'patch_embed': [5371.2, 4366.8], 'attention': [504.0, 324.9],
                 'mlp': [453.6, 259.2], 'head': [73.6, 73.6]}
HAND_ENERGY_PJ = [6402.4, 5024.5]
# Active token-steps in the block: 4 + 4 at t0, 2 + 1 at t1 = 11.
HAND_BLOCK_RATES = {
    'block.0.attn.q_lif': (5 + 4 + 2 + 1) / (11 * 8),
    'block.0.attn.k_lif': (6 + 2 + 3 + 1) / (11 * 8),
    'block.0.attn.v_lif': (7 + 3 + 1 + 0) / (11 * 8),
    'block.0.attn.attn_lif': (4 + 3 + 2 + 1) / (11 * 8),
    'block.0.attn.proj_lif': (3 + 2 + 1 + 0) / (11 * 8),
    'block.0.mlp.fc1_lif': (20 + 10 + 5 + 2) / (11 * 16),
    'block.0.mlp.fc2_lif': (6 + 4 + 2 + 1) / (11 * 8),
}
# SPS neurons per step: LIF0 8*8*1 = 64, LIF1 8*8*2 = 128, LIF2 8*8*4 = 256, (pool) LIF3
# 4*4*8 = 128, (pool) RPE 2*2*8 = 32; spikes summed over both images.
HAND_SPS_RATES = {  # every layer ran T = 2 steps
    'patch_embed.proj_lif': 64 / (2 * 2 * 64),
    'patch_embed.proj_lif1': 64 / (2 * 2 * 128),
    'patch_embed.proj_lif2': 64 / (2 * 2 * 256),
    'patch_embed.proj_lif3': 128 / (2 * 2 * 128),
    'patch_embed.rpe_lif': 32 / (2 * 2 * 32),
}
HAND_ISPS_RATES = {  # I-SPS at the first LIF: LIF0 ran 2 steps, the rest once
    'patch_embed.proj_lif': 64 / (2 * 2 * 64),
    'patch_embed.proj_lif1': 64 / (2 * 1 * 128),
    'patch_embed.proj_lif2': 64 / (2 * 1 * 256),
    'patch_embed.proj_lif3': 128 / (2 * 1 * 128),
    'patch_embed.rpe_lif': 32 / (2 * 1 * 32),
}


def test_hand_counted_sops_and_energy():
  out = energy.estimate(tiny_aux(), TINY)
  for name, want in HAND_SOPS.items():
    np.testing.assert_array_equal(np.asarray(out['sops'][name]), np.float32(want), err_msg=name)
  assert set(out['sops']) == set(HAND_SOPS)
  np.testing.assert_array_equal(out['macs']['patch_embed.proj_conv'], [576, 576])
  np.testing.assert_array_equal(out['macs']['head'], [16, 16])
  for name, want in HAND_SPLIT_PJ.items():
    np.testing.assert_allclose(out['energy_split_mj'][name], np.array(want) * 1e-9, rtol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(out['energy_mj'], np.array(HAND_ENERGY_PJ) * 1e-9, rtol=1e-6)
  np.testing.assert_allclose(out['token_ratio'], [6 / 8, 5 / 8], rtol=1e-7)
  np.testing.assert_allclose(out['timesteps'], [(2 + 2 + 1 + 1) / 4, (2 + 1 + 1 + 1) / 4])
  rates = out['firing_rates']
  assert set(rates) == set(HAND_BLOCK_RATES) | set(HAND_SPS_RATES)
  for name, want in {**HAND_BLOCK_RATES, **HAND_SPS_RATES}.items():
    np.testing.assert_allclose(rates[name], want, rtol=1e-6, err_msg=name)


def test_firing_rate_weights_exclude_padded_images():
  """weights [1, 0]: rates are those of image 0 alone (e.g. a padded last eval batch)."""
  rates = energy.estimate(tiny_aux(), TINY, weights=np.float32([1, 0]))['firing_rates']
  # Image 0: active token-steps 4 + 2 = 6; SPS spikes 40, 50, 60, 100, 16 over one image.
  want = {'block.0.attn.q_lif': (5 + 2) / (6 * 8), 'block.0.mlp.fc1_lif': (20 + 5) / (6 * 16),
          'patch_embed.proj_lif': 40 / (2 * 64), 'patch_embed.rpe_lif': 16 / (2 * 32)}
  for name, value in want.items():
    np.testing.assert_allclose(rates[name], value, rtol=1e-6, err_msg=name)
  unweighted = energy.estimate(tiny_aux(), TINY)
  weighted = energy.estimate(tiny_aux(), TINY, weights=np.float32([1, 0]))
  np.testing.assert_array_equal(weighted['energy_mj'], unweighted['energy_mj'])


def test_hand_counted_energy_constants_are_keywords():
  out = energy.estimate(tiny_aux(), TINY, e_mac_pj=1.0, e_ac_pj=1.0)
  # 1 pJ per operation: image 0 = 576 + 16 MACs + 3024 + 560 + 504 SOPs = 4680.
  np.testing.assert_allclose(out['energy_mj'], np.array([4680.0, 592 + 1908 + 361 + 288]) * 1e-9,
                             rtol=1e-6)


def test_hand_counted_isps_layout():
  isps = dict(TINY, patch_embed='isps')  # integrate_at defaults to first_lif
  out = energy.estimate(tiny_aux(), isps)
  for name, want in HAND_ISPS_RATES.items():
    np.testing.assert_allclose(out['firing_rates'][name], want, rtol=1e-6, err_msg=name)
  # The sums already cover only the passes that ran, so the SOP formulas are unchanged.
  np.testing.assert_array_equal(out['sops']['patch_embed'], [3024, 1908])
  # Integrating at the SPS output runs the whole SPS for T steps.
  out = energy.estimate(tiny_aux(), dict(isps, isps={'integrate_at': 'sps_output'}))
  for name, want in HAND_SPS_RATES.items():
    np.testing.assert_allclose(out['firing_rates'][name], want, rtol=1e-6, err_msg=name)
  # A per-stage tail: LIF1 and LIF2 run T = 2 steps (multi_step), LIF3 and the RPE LIF once.
  mixed = dict(isps, isps={'tail': 'multi_step,multi_step,single_step,single_step'})
  out = energy.estimate(tiny_aux(), mixed)
  want = dict(HAND_ISPS_RATES, **{k: HAND_SPS_RATES[k] for k in
                                   ('patch_embed.proj_lif1', 'patch_embed.proj_lif2')})
  for name, value in want.items():
    np.testing.assert_allclose(out['firing_rates'][name], value, rtol=1e-6, err_msg=name)
  # The same tail with `tail_steps` 1: LIF1 and LIF2 run one step, like the binary stages.
  out = energy.estimate(tiny_aux(), dict(isps, isps={
      'tail': 'multi_step,multi_step,single_step,single_step', 'tail_steps': 1}))
  for name, value in HAND_ISPS_RATES.items():
    np.testing.assert_allclose(out['firing_rates'][name], value, rtol=1e-6, err_msg=name)


def test_rate_valued_encoder_input_costs_its_spikes():
  # sps_output integrates the SPS output by its mean over T = 2: U is a rate, so the block layers
  # that read the residual stream pay 2 * U + (the rest) = x_in + 1 * (U of the active tokens).
  # U of active tokens: image 0: 3.0 at t0 (all four), 1.5 at t1 (tokens 0-1) -> 4.5;
  # image 1: 2.0 at t0, 0.5 at t1 (token 0) -> 2.5.
  cfg = dict(TINY, patch_embed='isps', isps={'integrate_at': 'sps_output'})
  rate = energy.estimate(tiny_aux(), cfg)['sops']
  plain = energy.estimate(tiny_aux(), TINY)['sops']
  extra = {'attention.q_linear': [4.5 * 8, 2.5 * 8], 'attention.k_linear': [36, 20],
           'attention.v_linear': [36, 20], 'mlp.fc1_linear': [4.5 * 16, 2.5 * 16]}
  for name in HAND_SOPS:
    if '.' in name:
      want = np.asarray(plain[name]) + np.float32(extra.get(name, [0, 0]))
      np.testing.assert_allclose(rate[name], want, rtol=1e-6, err_msg=name)
  # Summed instead (integer U): counted by value, as the aux gives it.
  summed = energy.estimate(tiny_aux(), dict(cfg, isps={'integrate_at': 'sps_output',
                                                       'reduce': 'sum'}))['sops']
  np.testing.assert_array_equal(summed['attention.q_linear'], plain['attention.q_linear'])


def test_jit_matches_eager_and_summarize():
  aux = tiny_aux()
  eager = energy.estimate(aux, TINY)
  jitted = jax.jit(lambda a: energy.estimate(a, TINY))(jax.tree.map(jnp.asarray, aux))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
  flat = energy.summarize(jitted)
  assert all(isinstance(v, float) for v in flat.values())
  assert flat['energy_mj'] == pytest.approx((6402.4 + 5024.5) / 2 * 1e-9, rel=1e-6)
  assert flat['sops/attention'] == pytest.approx((560 + 361) / 2)
  assert flat['firing_rates/block.0.attn.v_lif'] == pytest.approx(0.125)


def test_wrong_shapes_and_missing_keys_are_reported():
  with pytest.raises(ValueError, match='expected'):
    energy.estimate(tiny_aux(), dict(TINY, timesteps=3))
  aux = tiny_aux()
  del aux['block_stats']['qk_map']
  with pytest.raises(KeyError, match='qk_map'):
    energy.estimate(aux, TINY)


# ---------------------------------------------------------------------------------------------
# 2-4. The real model: halting and I-SPS must show up in the energy.
# ---------------------------------------------------------------------------------------------
SMALL = dict(image_size=32, patch_size=4, dim=32, heads=2, depth=2, timesteps=2, num_classes=10)
HALTED = dict(SMALL, halt=dict(mode='spatiotemporal', beta=50.0))  # h = 1: all halt at (0, 0)
ISPS = dict(SMALL, patch_embed='isps')


@pytest.fixture(scope='module')
def variables():
  """Random init with BatchNorm scales x10 (and +1 bias in the blocks) so neurons fire 10-40%."""
  v = network.init_variables(network.create_model(SMALL), jax.random.PRNGKey(0))

  def boost(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return x * 10.0
    if name.endswith("['bias']") and '_bn' in name and 'encoder' in name:
      return x + 1.0
    return x

  return {'params': jax.tree_util.tree_map_with_path(boost, v['params']),
          'batch_stats': v['batch_stats']}


@pytest.fixture(scope='module')
def images():
  return 3.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))


def _run(cfg, variables, images):
  model = network.create_model(cfg)
  _, aux = jax.jit(lambda v, x: model.apply(v, x, capture=True))(variables, images)
  return aux, jax.jit(lambda a: energy.estimate(a, cfg))(aux)


@pytest.fixture(scope='module')
def dense(variables, images):
  return _run(SMALL, variables, images)


@pytest.fixture(scope='module')
def halted(variables, images):
  return _run(HALTED, variables, images)


@pytest.fixture(scope='module')
def isps(variables, images):
  return _run(ISPS, variables, images)


def _encoder(e):
  return np.asarray(e['energy_split_mj']['attention'] + e['energy_split_mj']['mlp'])


def test_halting_after_first_cell_cuts_encoder_energy(dense, halted):
  (_, e_dense), (aux, e_halt) = dense, halted
  np.testing.assert_array_equal(np.asarray(aux['active'][0, 0]), 1.0)
  np.testing.assert_allclose(e_halt['token_ratio'], 1 / 4)
  np.testing.assert_allclose(e_halt['timesteps'], 1.0)
  # Halting leaves the patch embedding alone and runs one of the T * L = 4 encoder cells.
  np.testing.assert_allclose(e_halt['energy_split_mj']['patch_embed'],
                             e_dense['energy_split_mj']['patch_embed'], rtol=1e-6)
  assert np.all(_encoder(e_halt) < 0.5 * _encoder(e_dense)), (_encoder(e_halt), _encoder(e_dense))
  assert np.all(np.asarray(e_halt['energy_mj']) < np.asarray(e_dense['energy_mj']))
  assert np.all(_encoder(e_dense) > 0)


def test_qkv_sops_match_captured_block_inputs(halted):
  aux, e = halted
  # Independent count: the q, k, v linears read the block input of active tokens only.
  x_in = np.sum(np.asarray(aux['block_inputs']) * np.asarray(aux['active'])[..., None],
                axis=(0, 1, 3, 4))
  np.testing.assert_allclose(e['sops']['attention.q_linear'], x_in * 32, rtol=1e-6)
  assert np.all(x_in > 0)


def test_isps_below_sps(dense, isps):
  (_, e_sps), (_, e_isps) = dense, isps
  assert np.all(np.asarray(e_isps['energy_mj']) < np.asarray(e_sps['energy_mj']))
  assert np.all(np.asarray(e_isps['energy_split_mj']['patch_embed'])
                < 0.75 * np.asarray(e_sps['energy_split_mj']['patch_embed']))
  # conv0 and LIF0 are shared by both: same MACs and the same first-layer spikes.
  np.testing.assert_array_equal(e_isps['macs']['patch_embed.proj_conv'],
                                e_sps['macs']['patch_embed.proj_conv'])
  np.testing.assert_allclose(e_isps['firing_rates']['patch_embed.proj_lif'],
                             e_sps['firing_rates']['patch_embed.proj_lif'])


@pytest.mark.parametrize('which', ['dense', 'halted', 'isps'])
def test_rates_and_token_usage(which, request):
  _, e = request.getfixturevalue(which)
  rates = np.array([float(r) for r in e['firing_rates'].values()])
  assert len(rates) == 5 + 7 * 2
  assert np.all(np.isfinite(rates)) and np.all((rates >= 0) & (rates <= 1)), e['firing_rates']
  parts = sum(e['energy_split_mj'].values())
  np.testing.assert_allclose(parts, e['energy_mj'], rtol=1e-6)
  if which != 'halted':
    np.testing.assert_allclose(e['token_ratio'], 1.0)
    np.testing.assert_allclose(e['timesteps'], SMALL['timesteps'])
    assert 0.05 < rates.mean() < 0.6, e['firing_rates']  # the boosted init really spikes


# ---------------------------------------------------------------------------------------------
# 5. The counting rule: the same network costs the same whichever way I-SPS integrates.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tail, tail_steps', [
    ('single_step', 0), ('any_spike', 0), ('multi_step', 0),
    ('multi_step,multi_step,single_step,single_step', 0), ('multi_step', 3),
    ('multi_step,multi_step,single_step,single_step', 3)])
def test_mean_and_sum_integration_cost_the_same(tail, tail_steps, variables, images):
  """Mean and sum differ by the factor T (or `tail_steps`), which the next BatchNorm removes
  (eps ~ 0), so both models are one network: their patch embeddings must cost the same; with a
  binary tail the encoder sees the same spikes too, and the whole network must cost the same."""
  out = {}
  for reduce in ('mean', 'sum'):
    cfg = dict(ISPS, bn_epsilon=1e-12,
               isps={'reduce': reduce, 'tail': tail, 'tail_steps': tail_steps})
    model = network.create_model(cfg)
    (_, aux), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
        variables, images)
    out[reduce] = energy.estimate(aux, cfg)
  mean, summed = out['mean'], out['sum']
  np.testing.assert_allclose(mean['energy_split_mj']['patch_embed'],
                             summed['energy_split_mj']['patch_embed'], rtol=1e-5)
  assert np.all(np.asarray(mean['sops']['patch_embed.proj_conv1']) > 0)
  if not tail.endswith('multi_step'):
    np.testing.assert_allclose(mean['energy_mj'], summed['energy_mj'], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. The energy loss (config.energy_loss_weight): the estimate, differentiable through the spikes.
# ---------------------------------------------------------------------------------------------
STAS_MS2 = dict(ISPS, halt=dict(mode='spatiotemporal', beta=-1.0),
                isps={'tail': 'multi_step,multi_step,single_step,single_step'})


def _train_apply(cfg, variables, images):
  model = network.create_model(cfg)
  return model.apply(variables, images, train=True, mutable=['batch_stats'])[0]


def test_energy_loss_adds_its_weight_times_the_estimate(variables, images):
  spec = network.spec_from_config(STAS_MS2)
  logits, aux = jax.jit(lambda v, x: _train_apply(STAS_MS2, v, x))(variables, images)
  targets = jax.nn.one_hot(jnp.arange(images.shape[0]), 10)
  base, terms0 = losses.total_loss(logits, targets, aux, spec)
  loss, terms = losses.total_loss(logits, targets, aux, spec, energy_weight=0.3)
  micro_j = float(np.mean(np.asarray(energy.estimate(aux, STAS_MS2)['energy_mj']))) * 1e3
  assert 'energy' not in terms0 and micro_j > 0
  np.testing.assert_allclose(float(terms['energy']), micro_j, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(base) + 0.3 * micro_j, rtol=1e-6)
  with pytest.raises(ValueError, match='energy_loss_weight must be >= 0'):
    losses.total_loss(logits, targets, aux, spec, energy_weight=-0.1)


def test_energy_loss_gradient_reaches_every_stage_and_lowers_the_energy(images):
  # The plain initialisation, whose train-mode BatchNorm keeps the membranes near threshold
  # (the boosted `variables` saturate, where every surrogate gradient is small).
  variables = network.init_variables(network.create_model(SMALL), jax.random.PRNGKey(0))
  spec = network.spec_from_config(STAS_MS2)

  def split(params):
    _, aux = _train_apply(STAS_MS2, dict(variables, params=params), images)
    return {k: jnp.mean(v) * 1e3 for k, v in energy.estimate(aux, spec)['energy_split_mj'].items()}

  def micro_j(params):
    _, aux = _train_apply(STAS_MS2, dict(variables, params=params), images)
    return losses.energy_term(aux, spec)

  grads = jax.jit(jax.grad(micro_j))(variables['params'])
  # Every patch-embedding conv and every block's layers get a gradient (the spikes they cause
  # are counted); the head's MACs are a constant.
  for name in ('proj_conv', 'proj_conv1', 'proj_conv2', 'proj_conv3', 'rpe_conv'):
    assert float(jnp.abs(grads['patch_embed'][name]['kernel']).sum()) > 0, name
  block = grads['encoder']['blocks']['block']
  per_block = np.stack([np.abs(np.asarray(g)).reshape(SMALL['depth'], -1).sum(1)
                        for g in jax.tree.leaves(block)]).sum(0)
  assert np.all(per_block > 0), per_block
  assert float(jnp.abs(grads['head']['kernel']).sum()) == 0
  # One sign step against the surrogate gradient (the size of an Adam step) makes every part
  # of the network fire less: the counted energy falls by more than a quarter.
  stepped = jax.tree.map(lambda p, g: p - 0.03 * jnp.sign(g), variables['params'], grads)
  before, after = jax.jit(split)(variables['params']), jax.jit(split)(stepped)
  for part in ('patch_embed', 'attention', 'mlp'):
    assert float(after[part]) < 0.9 * float(before[part]), (part, before, after)
  assert float(jax.jit(micro_j)(stepped)) < 0.75 * float(jax.jit(micro_j)(variables['params']))

"""ACT halting: the pure accumulation rule, the losses, and each mode inside the model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax.model import halting
from stas_jax.train import losses
from stas_jax.model import network
from stas_jax.model.spec import spec_from_config

T, L, B, N = 3, 2, 2, 64


def run_grid(hs_seq, eps=0.01, last_forced=True):
  """Runs act_step over a (T*L, B, N) sequence of scores in raster order."""
  state = halting.init_state(hs_seq.shape[1], hs_seq.shape[2], 1)
  weights, masks = [], []
  for k in range(hs_seq.shape[0]):
    h = hs_seq[k]
    if last_forced and k == hs_seq.shape[0] - 1:
      h = jnp.ones_like(h)
    masks.append(state.mask)
    state, w = halting.act_step(state, jnp.ones(h.shape + (1,)), h, eps)
    weights.append(w)
  return state, jnp.stack(weights), jnp.stack(masks)


def test_act_weights_sum_to_one_and_masks_never_reopen():
  h = jax.random.uniform(jax.random.PRNGKey(0), (12, 4, 16)) * 0.6
  state, weights, masks = run_grid(h)
  np.testing.assert_allclose(np.asarray(weights.sum(0)), 1.0, atol=1e-6)
  # The output accumulator of a constant-1 stream equals the weight sum.
  np.testing.assert_allclose(np.asarray(state.out[..., 0]), 1.0, atol=1e-6)
  assert np.all(np.diff(np.asarray(masks), axis=0) <= 0)
  assert np.all(np.asarray(state.mask) == 0)


def test_act_step_by_hand():
  # One token, scores 0.3, 0.5, 0.4 with eps 0.01: c = 0.3, 0.8, 1.2 -> halts at the third
  # cell with remainder R = 1 - 0.3 - 0.5 = 0.2; ponder = 1 + 1 + 0.2.
  h = jnp.array([0.3, 0.5, 0.4]).reshape(3, 1, 1)
  state, weights, masks = run_grid(h, last_forced=False)
  np.testing.assert_allclose(np.asarray(weights[:, 0, 0]), [0.3, 0.5, 0.2], atol=1e-7)
  np.testing.assert_allclose(float(state.rho[0, 0]), 2.2, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(masks[:, 0, 0]), [1, 1, 1])
  assert float(state.mask[0, 0]) == 0.0


def test_hard_mask_passes_no_gradient():
  def mask_sum(h):
    state = halting.init_state(1, 3, 1)
    state, _ = halting.act_step(state, jnp.ones((1, 3, 1)), h, 0.01)
    state, _ = halting.act_step(state, jnp.ones((1, 3, 1)), h, 0.01)
    return jnp.sum(state.mask)

  def out_sum(h):
    state = halting.init_state(1, 3, 1)
    state, _ = halting.act_step(state, jnp.ones((1, 3, 1)), h, 0.01)
    state, _ = halting.act_step(state, jnp.ones((1, 3, 1)), h, 0.01)
    return jnp.sum(state.out) + jnp.sum(state.rho)

  h = jnp.array([[0.2, 0.6, 0.9]])
  np.testing.assert_array_equal(np.asarray(jax.grad(mask_sum)(h)), 0.0)
  assert np.all(np.isfinite(np.asarray(jax.grad(out_sum)(h))))
  assert np.any(np.asarray(jax.grad(out_sum)(h)) != 0)


def test_soft_mask_tends_to_hard_mask():
  c = jnp.array([0.0, 0.5, 0.98, 0.995, 1.5])
  hard = halting.hard_mask(c, 0.01)
  soft = halting.soft_mask(c, 0.01, 1e-4)
  np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-6)


def test_losses_by_hand():
  rho = jnp.full((2, 4), 3.0)
  np.testing.assert_allclose(float(halting.ponder_loss(rho, 3, 2)), 0.5)
  target = halting.gaussian_target(5, 0.4, 1.0)  # mu = 2
  want = np.exp(-0.5 * (np.arange(5) - 2.0) ** 2)
  np.testing.assert_allclose(np.asarray(target), want / want.sum(), rtol=1e-6)
  # A halting distribution equal to the target (inside the clip range) gives zero KL.
  cells = np.ones((1, 5), bool)
  weights = jnp.broadcast_to(target.reshape(1, 5, 1, 1), (1, 5, 2, 3))
  assert abs(float(halting.distribution_prior_loss(weights, cells, 0.4, 1.0))) < 1e-6
  # Mass in the wrong cell gives a positive KL.
  wrong = jnp.zeros((1, 5, 2, 3)).at[:, 4].set(1.0)
  assert float(halting.distribution_prior_loss(wrong, cells, 0.4, 1.0)) > 1.0


def test_avit_prior_target_by_hand():
  # T = 2, L = 2, every cell scored: Gaussian over the timesteps (mu = 0.5 * 2 = 1) on the
  # last-block cells (raster indices 1 and 3), zero on the first-block cells.
  g = np.exp(-0.5 * (np.arange(2) - 1.0) ** 2)
  g = g / g.sum()
  target = halting.prior_target(np.ones((2, 2), bool), 'avit', 0.5, 1.0)
  np.testing.assert_allclose(np.asarray(target), [0.0, g[0], 0.0, g[1]], rtol=1e-6)
  # Temporal mode scores only the last block: the target is the Gaussian over timesteps.
  cells = halting.scoring_cells('temporal', 2, 2)
  np.testing.assert_allclose(np.asarray(halting.prior_target(cells, 'avit', 0.5, 1.0)), g,
                             rtol=1e-6)
  # The ACT-weight form is unchanged: a Gaussian over all four cells, mu = 2.
  want = np.exp(-0.5 * (np.arange(4) - 2.0) ** 2)
  np.testing.assert_allclose(
      np.asarray(halting.prior_target(np.ones((2, 2), bool), 'act_weight', 0.5, 1.0)),
      want / want.sum(), rtol=1e-6)
  with pytest.raises(ValueError, match='avit'):
    halting.prior_target(np.ones((2, 2), bool), 'vit', 0.5, 1.0)


def test_avit_prior_loss_by_hand():
  # Per-cell mean scores 0.1, 0.2 (t = 0) and 0.3, 0.4 (t = 1): p = (0.1, 0.2, 0.3, 0.4);
  # KL(target || p) = sum over the last-block cells of g (log g - log p).
  scores = jnp.asarray([[0.1, 0.2], [0.3, 0.4]]).reshape(2, 2, 1, 1) * jnp.ones((2, 2, 3, 5))
  g = np.exp(-0.5 * (np.arange(2) - 1.0) ** 2)
  g = g / g.sum()
  want = g[0] * np.log(g[0] / 0.2) + g[1] * np.log(g[1] / 0.4)
  got = halting.distribution_prior_loss(scores, np.ones((2, 2), bool), 0.5, 1.0, 'avit')
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_avit_prior_reads_the_raw_scores_of_every_cell():
  """The model returns h = sigmoid(gamma z[channel] + beta) of every token at every cell
  (halted ones too, as A-ViT averages them), and the loss feeds it to the A-ViT prior."""
  cfg = tiny_model_config(**{'halt.mode': 'spatiotemporal', 'halt.beta': -1.0,
                             'halt.gamma': 1.0, 'halt.prior': 'avit', 'halt.alpha_d': 1.0})
  model = network.create_model(cfg)
  _, aux = jax.jit(lambda v, x: model.apply(v, x, capture=True))(_variables(), _images())
  want = jax.nn.sigmoid(aux['block_outputs'][..., 0] - 1.0)
  np.testing.assert_allclose(np.asarray(aux['cell_score']), np.asarray(want), rtol=1e-6)
  assert 0 < float(aux['active'].mean()) < 1, 'need halted tokens'
  spec = spec_from_config(cfg)
  terms = losses.halt_loss_terms(aux, spec)
  cells = np.ones((T, L), bool)
  np.testing.assert_allclose(
      float(terms['distribution']),
      float(halting.distribution_prior_loss(want, cells, 0.75, 1.0, 'avit')), rtol=1e-6)
  # The default form neither computes nor needs the scores.
  _, aux_default = _forward('spatiotemporal', -1.0)
  assert 'cell_score' not in aux_default


def test_temporal_similarity_by_hand():
  x = jnp.zeros((3, 1, 1, 1, 2))
  x = x.at[0].set(jnp.array([1.0, 0.0])).at[1].set(jnp.array([1.0, 1.0])).at[2].set(
      jnp.array([1.0, 1.0]))
  sim = halting.temporal_similarity(x)
  np.testing.assert_allclose(np.asarray(sim), [[1 / np.sqrt(2), 1.0]], rtol=1e-6)


# ---- the modes inside the model --------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _variables():
  """Random weights with BatchNorm statistics calibrated on a batch, so the network spikes."""
  model = network.create_model(tiny_model_config())
  variables = network.init_variables(model, jax.random.PRNGKey(0))
  # With momentum 0 one train pass sets the running statistics to the batch statistics.
  calib = network.create_model(tiny_model_config(bn_momentum=0.0))
  _, state = jax.jit(lambda v, x: calib.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, _images(seed=7, batch=8))
  return {'params': variables['params'], 'batch_stats': state['batch_stats']}


def _images(seed=1, batch=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, 32, 32, 3)) * 2.0


@functools.lru_cache(maxsize=None)
def _forward(mode, beta, patch_embed='sps', train=False):
  cfg = tiny_model_config(**{'halt.mode': mode, 'halt.beta': beta, 'patch_embed': patch_embed,
                             'halt.gamma': 1.0})
  model = network.create_model(cfg)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, capture=True))
  logits, aux = fn(_variables(), _images())
  return jax.tree.map(np.asarray, (logits, aux))


@pytest.mark.parametrize('mode', ['spatiotemporal', 'temporal', 'spatial'])
def test_mode_invariants(mode):
  _, aux = _forward(mode, -2.0)
  active, weight = aux['active'], aux['cell_weight']       # (T, L, B, N)
  if mode == 'spatial':
    # A fresh ACT per timestep: every token starts each timestep active; weights sum to 1 per t.
    assert np.all(active[:, 0] == 1)
    np.testing.assert_allclose(weight.sum(1), 1.0, atol=1e-6)
    assert np.all(np.diff(active, axis=1) <= 0)
  else:
    np.testing.assert_allclose(weight.sum((0, 1)), 1.0, atol=1e-6)
    raster = active.reshape(T * L, B, N)
    assert np.all(np.diff(raster, axis=0) <= 0), 'a mask turned back on along the raster order'
  if mode == 'temporal':
    # Scored only after block L: the mask is constant within a timestep, no weight elsewhere.
    assert np.all(active[:, 0] == active[:, -1])
    assert np.all(weight[:, :-1] == 0)


def test_huge_beta_halts_every_token_at_the_first_cell():
  _, aux = _forward('spatiotemporal', 50.0)
  active = aux['active']
  assert np.all(active[0, 0] == 1)
  assert np.all(active.reshape(T * L, B, N)[1:] == 0)
  np.testing.assert_allclose(aux['cell_weight'][0, 0], 1.0)


def test_very_negative_beta_never_halts_before_the_last_cell():
  _, aux = _forward('spatiotemporal', -50.0)
  assert np.all(aux['active'] == 1)
  w = aux['cell_weight'].reshape(T * L, B, N)
  assert np.all(w[:-1] < 1e-6) and np.all(w[-1] > 1 - 1e-5)


def test_negative_gamma_halts_silent_tokens_first():
  # The residual stream is a non-negative spike count: with gamma < 0 a token whose score
  # channel is silent scores highest (docs/studies/halting_scores.md). By hand, gamma -3, beta 0:
  # h = sigmoid(-3 z0) = 0.5, 0.0474, 0.00247 for z0 = 0, 1, 2.
  z = jnp.zeros((1, 3, 4)).at[0, 1, 0].set(1.0).at[0, 2, 0].set(2.0).at[0, 0, 1].set(5.0)
  h = halting.halting_score(z, -3.0, 0.0, 0)
  np.testing.assert_allclose(h[0], [0.5, 0.0474259, 0.00247262], rtol=1e-5)
  _, _, masks = run_grid(jnp.broadcast_to(h, (6,) + h.shape))
  # The silent token reaches 1 - eps at the second cell, the others run to the forced last.
  np.testing.assert_array_equal(masks[:, 0, 0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(masks[:, 0, 1:], np.ones((6, 2)))


def test_none_mode_is_the_spikformer_readout():
  logits, aux = _forward('none', 0.0)
  assert np.all(aux['active'] == 1)
  # Spikformer: head(mean over T of the token mean of the last block's output).
  feat = aux['block_outputs'][:, -1].mean(axis=2).mean(axis=0)
  head = _variables()['params']['head']
  want = feat @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  np.testing.assert_allclose(logits, want, atol=1e-5)
  assert np.any(aux['block_stats']['q_lif'] > 0), 'the test network does not spike'


def test_halted_tokens_are_frozen():
  _, aux = _forward('spatiotemporal', -1.0)
  active = aux['active'].reshape(T * L, B, N)
  assert 0 < active.mean() < 1, 'need a mix of halted and active tokens'
  z_in = aux['block_inputs'].reshape(T * L, B, N, -1)
  z_out = aux['block_outputs'].reshape(T * L, B, N, -1)
  halted = active == 0
  np.testing.assert_array_equal(z_out[halted], z_in[halted])


def test_isps_input_identical_over_time_sps_not():
  _, aux_isps = _forward('none', 0.0, 'isps')
  _, aux_sps = _forward('none', 0.0, 'sps')
  sim_isps = np.asarray(halting.temporal_similarity(aux_isps['block_inputs']))
  sim_sps = np.asarray(halting.temporal_similarity(aux_sps['block_inputs']))
  np.testing.assert_allclose(sim_isps[0], 1.0, atol=1e-6)
  assert np.all(sim_sps[0] < 1.0 - 1e-3)
  emb = aux_isps['embed']
  assert np.all(emb == emb[:1])


@pytest.mark.parametrize('mode', ['spatiotemporal', 'spatial', 'temporal'])
def test_gradients_reach_halting_params_and_every_block(mode):
  cfg = tiny_model_config(**{'halt.mode': mode, 'halt.learnable': True, 'halt.beta': -1.0,
                             'halt.alpha_p': 0.1, 'halt.alpha_d': 0.1, 'patch_embed': 'isps'})
  model = network.create_model(cfg)
  spec = spec_from_config(cfg)
  base = _variables()
  params = dict(base['params'], halt_gamma=jnp.float32(1.0), halt_beta=jnp.float32(-1.0))
  targets = jax.nn.one_hot(jnp.arange(B) % 10, 10)

  def loss_fn(p):
    (logits, aux), _ = model.apply({'params': p, 'batch_stats': base['batch_stats']},
                                   _images(), train=True, mutable=['batch_stats'])
    return losses.total_loss(logits, targets, aux, spec)[0]

  grads = jax.jit(jax.grad(loss_fn))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path
  assert float(grads['halt_gamma']) != 0 and float(grads['halt_beta']) != 0
  block = grads['encoder']['blocks']['block']
  per_block = np.stack([np.abs(np.asarray(g)).reshape(L, -1).sum(1)
                        for g in jax.tree.leaves(block)]).sum(0)
  assert np.all(per_block > 0), per_block


def test_forward_and_loss_compile_once():
  cfg = tiny_model_config(**{'halt.mode': 'spatiotemporal'})
  model = network.create_model(cfg)
  spec = spec_from_config(cfg)
  traces = []

  @jax.jit
  def step(variables, images, targets):
    traces.append(1)
    (logits, aux), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return losses.total_loss(logits, targets, aux, spec)[0]

  for seed in range(3):
    targets = jax.nn.one_hot(jnp.arange(B) + seed, 10)
    step(_variables(), _images(seed), targets).block_until_ready()
  assert len(traces) == 1


def test_soft_act_chain_gradient_matches_finite_differences():
  # The relaxed halting rule is smooth in the score parameters: compare jax.grad with central
  # differences over a fixed sequence of block outputs.
  z = jax.random.uniform(jax.random.PRNGKey(2), (6, 2, 5, 3)) * 3.0

  def readout_loss(gb, temperature):
    gamma, beta = gb
    state = halting.init_state(2, 5, 3)
    for k in range(6):
      h = halting.halting_score(z[k], gamma, beta, 0)
      state, _ = halting.act_step(state, z[k], h, 0.01, temperature, final=k == 5)
    return jnp.sum(jnp.sin(state.out)) + 0.1 * jnp.sum(state.rho)

  gb = jnp.array([0.7, -1.5], jnp.float32)
  grad = np.asarray(jax.grad(readout_loss)(gb, jnp.float32(0.3)))
  eps = 1e-2
  for i in range(2):
    d = jnp.zeros(2).at[i].set(eps)
    fd = (readout_loss(gb + d, 0.3) - readout_loss(gb - d, 0.3)) / (2 * eps)
    np.testing.assert_allclose(grad[i], float(fd), rtol=2e-2, atol=1e-3)
  assert np.all(grad != 0)


def test_soft_mask_at_zero_temperature_is_the_hard_model():
  logits_hard, _ = _forward('spatiotemporal', -1.0)
  cfg = tiny_model_config(**{'halt.mode': 'spatiotemporal', 'halt.beta': -1.0,
                             'halt.soft_mask': True})
  model = network.create_model(cfg)
  logits_soft0, _ = jax.jit(lambda v, x: model.apply(v, x, halt_temperature=0.0))(
      _variables(), _images())
  np.testing.assert_allclose(np.asarray(logits_soft0), logits_hard, atol=1e-6)

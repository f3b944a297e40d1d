"""The QKFormer backbone (zhouchenlin2096/QKFormer `cifar10/model.py`): its patch embeddings and
Q-K token-attention stages 1 and 2, which make the token map of the halting encoder (stage 3).

Stage 3 is Spikformer's SSA block with bias-free q, k, v (`layers.SSABlock`). Everything here
runs densely, all T timesteps at once with time folded into the batch (as the reference, so
BatchNorm pools the timesteps in training); docs/method.md section 3 says why only stage 3 halts.
Parameter names follow the PyTorch state_dict. Shapes: B batch, N tokens, C width.
"""
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from stas_jax.model import layers
from stas_jax.model import matmul
from stas_jax.model import neurons
from stas_jax.model.spec import ModelSpec

# LIF layers of the stages before the encoder, by module, named as in the state_dict.
EMBED_INIT_LIFS = ('proj_lif', 'proj1_lif', 'proj_res_lif')
EMBED_STAGE_LIFS = ('proj3_lif', 'proj4_lif', 'proj_res_lif')
TOKEN_ATTN_LIFS = ('q_lif', 'k_lif', 'attn_lif', 'proj_lif')
MLP_LIFS = ('mlp1_lif', 'mlp2_lif')
# Stage-3 block LIFs: `layers.SSABlock`'s names -> the reference's (`stage3.<l>.<name>`).
ENCODER_LIF_NAMES = {'q_lif': 'ssa.q_lif', 'k_lif': 'ssa.k_lif', 'v_lif': 'ssa.v_lif',
                     'attn_lif': 'ssa.attn_lif', 'proj_lif': 'ssa.proj_lif',
                     'fc1_lif': 'mlp.mlp1_lif', 'fc2_lif': 'mlp.mlp2_lif'}


def stage_widths(spec: ModelSpec) -> tuple[int, int, int]:
  """Widths of stages 1, 2, 3: embed_dims / 4, / 2, / 1."""
  return spec.dim // 4, spec.dim // 2, spec.dim


def stage_sides(spec: ModelSpec) -> tuple[int, int, int]:
  """Token-grid sides of stages 1, 2, 3 (the image side over patch_size / 4, / 2, / 1)."""
  g = spec.grid_size
  return 4 * g, 2 * g, g


def init_pools(spec: ModelSpec) -> int:
  """Max-pools after patch_embed1's first LIF: 0 for the reference's patch size 4 [ours]."""
  return int(round(math.log2(spec.patch_size))) - 2


def _dense(spec: ModelSpec, features: int, name: str, bias: bool) -> layers.Linear:
  return layers.Linear(features, use_bias=bias, dtype=matmul.compute_dtype(spec.dtype), name=name)


def _conv3x3(spec: ModelSpec, features: int, name: str) -> layers.Conv3x3:
  return layers.Conv3x3(features, matmul.compute_dtype(spec.dtype), name=name)


class _Module(nn.Module):
  """Shared fields: the spec, batch statistics or running averages, the BatchNorm axis."""
  spec: ModelSpec
  train: bool = False
  bn_axis_name: str | None = None

  def bn(self, name: str) -> layers.BatchNorm:
    return layers.batch_norm(self.spec, name, self.bn_axis_name)

  def lif_on(self, y: jax.Array, steps: int, threshold: float | None = None) -> jax.Array:
    """A multi-step LIF over time folded into the leading axis (steps * B, ...)."""
    p = self.spec.lif() if threshold is None else self.spec.attn_lif()
    return layers.multistep_lif(y, steps, p)


class TokenQKAttention(_Module):
  """Token_QK_Attention: a per-head binary token mask from the summed q spikes, times k.

  q, k = LIF(BN(x W)) (bias-free 1x1 convs); m[n, h] = attn_lif(sum of head h's q spikes of
  token n), threshold 0.5; y = m[n, head(c)] * k[n, c]; out = LIF(BN(y W + b)). No V.
  """
  width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (steps * B, N, C) -> (proj_lif spikes like x, per-image spike sums (B,))."""
    s, c = self.spec, self.width
    batch = x.shape[0] // steps
    q = self.lif_on(self.bn('q_bn')(_dense(s, c, 'q_conv', False)(x), self.train), steps)
    k = self.lif_on(self.bn('k_bn')(_dense(s, c, 'k_conv', False)(x), self.train), steps)
    head_sum = einops.reduce(q, 'b n (h d) -> b n h', 'sum', h=s.heads)
    mask = self.lif_on(head_sum, steps, threshold=s.neuron.attn_v_threshold)
    y = einops.rearrange(mask[..., None] * einops.rearrange(k, 'b n (h d) -> b n h d', h=s.heads),
                         'b n h d -> b n (h d)')
    out = self.lif_on(self.bn('proj_bn')(_dense(s, c, 'proj_conv', True)(y), self.train), steps)
    sums = lambda a: layers.image_sums(a, batch)
    return out, {'q_lif': sums(q), 'k_lif': sums(k), 'attn_lif': sums(mask), 'y': sums(y),
                 'proj_lif': sums(out)}


class MLP(_Module):
  """MLP: LIF(BN(LIF(BN(x W1 + b1)) W2 + b2)), hidden width mlp_ratio * C (1x1 convs)."""
  width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (steps * B, N, C) -> (mlp2_lif spikes like x, per-image sums (B,))."""
    s, c = self.spec, self.width
    batch = x.shape[0] // steps
    hidden = int(c * s.mlp_ratio)
    h1 = self.lif_on(self.bn('mlp1_bn')(_dense(s, hidden, 'mlp1_conv', True)(x), self.train), steps)
    h2 = self.lif_on(self.bn('mlp2_bn')(_dense(s, c, 'mlp2_conv', True)(h1), self.train), steps)
    sums = lambda a: layers.image_sums(a, batch)
    return h2, {'mlp1_lif': sums(h1), 'mlp2_lif': sums(h2)}


class TokenSpikingTransformer(_Module):
  """A stage-1 or stage-2 block: x + tssa(x), then + mlp(x); the stream holds small integers."""
  width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, steps: int,
               unit: int = 1) -> tuple[jax.Array, jax.Array, dict]:
    """x (steps * B, N, C) -> (block output, attention output (proj_lif spikes), sums).

    `unit`: spikes in one unit of x (an I-SPS rate); the sums `tssa.x_in` and `mlp.x_mid` of
    what enters the q, k and mlp1 convolutions count spikes.
    """
    batch = x.shape[0] // steps
    attn, a_stats = TokenQKAttention(self.spec, self.train, self.bn_axis_name, width=self.width,
                                     name='tssa')(x, steps)
    mid = x + attn
    mlp, m_stats = MLP(self.spec, self.train, self.bn_axis_name, width=self.width,
                       name='mlp')(mid, steps)
    x_spikes = layers.image_sums(x, batch) * unit
    a_stats['x_in'] = x_spikes
    m_stats['x_mid'] = x_spikes + layers.image_sums(attn, batch)
    stats = {f'tssa.{k}': v for k, v in a_stats.items()}
    stats.update({f'mlp.{k}': v for k, v in m_stats.items()})
    return mid + mlp, attn, stats


class PatchEmbedInit(_Module):
  """patch_embed1: s = LIF(BN(conv3x3(image))); out = LIF(BN(conv3x3(s))) + LIF(BN(conv1x1(s))).

  For a patch size above 4, s is max-pooled (3, 2, 1) `init_pools` times before the two convs
  [ours: the reference's patch size is 4; this is where Spikformer's SPS pools too].
  """

  def setup(self):
    s = self.spec
    c = stage_widths(s)[0]
    self.proj_conv = _conv3x3(s, c // 2, 'proj_conv')
    self.proj_bn = self.bn('proj_bn')
    self.proj1_conv = _conv3x3(s, c, 'proj1_conv')
    self.proj1_bn = self.bn('proj1_bn')
    self.proj_res_conv = _dense(s, c, 'proj_res_conv', False)
    self.proj_res_bn = self.bn('proj_res_bn')

  def stem(self, images: jax.Array) -> jax.Array:
    """conv0 + BN0 on the analog image (B, H, W, C) -> input current; the image is static, so
    one pass gives what the reference computes at every timestep."""
    return self.proj_bn(self.proj_conv(images), self.train)

  def pool(self, s0: jax.Array) -> jax.Array:
    for _ in range(init_pools(self.spec)):
      s0 = layers.max_pool(s0)
    return s0

  def __call__(self, x: jax.Array, steps: int, mode: str,
               x_spikes: jax.Array) -> tuple[jax.Array, dict, int]:
    """The two branches on the first LIF's (pooled) spikes x (steps * B, H, W, C/2).

    Args:
      x: spikes (steps = T), or under I-SPS (steps = 1) their integration over T.
      steps: timesteps folded into the leading axis.
      mode: the I-SPS tail mode of the branch LIFs (used when steps = 1).
      x_spikes: the spikes that x stands for, like x (x itself, or T x for a mean of T).

    Returns:
      (out (steps * B, H, W, C), per-image sums (B,), spikes in one unit of out).
    """
    s = self.spec
    batch = x.shape[0] // steps
    stats = {'conv_in': layers.image_sums(x_spikes, batch)}
    a, stats['proj1_lif'], out_unit = layers.fire(
        s, self.proj1_bn(self.proj1_conv(x), self.train), steps, mode)
    r, stats['proj_res_lif'], _ = layers.fire(
        s, self.proj_res_bn(self.proj_res_conv(x), self.train), steps, mode)
    return a + r, stats, out_unit


class PatchEmbeddingStage(_Module):
  """patch_embed2 / 3 on x (C/2 channels, H x W): a = LIF(BN(conv3x3(x)));
  b = LIF(maxpool(BN(conv3x3(a)))), the pool on the real-valued BatchNorm output;
  r = LIF(BN(conv1x1 stride 2 (x))); out = b + r at H/2 x W/2. No LIF before the convs."""
  width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, steps: int, mode: str,
               x_spikes: jax.Array) -> tuple[jax.Array, dict, int]:
    """x (steps * B, H, W, C/2) -> (out (steps * B, H/2, W/2, C), sums, out spikes per unit);
    arguments as `PatchEmbedInit.__call__`."""
    s, c = self.spec, self.width
    batch = x.shape[0] // steps
    sums = lambda a: layers.image_sums(a, batch)
    stats = {'conv3_in': sums(x_spikes)}
    a, stats['proj3_lif'], a_unit = layers.fire(
        s, self.bn('proj3_bn')(_conv3x3(s, c, 'proj3_conv')(x), self.train), steps, mode)
    stats['conv4_in'] = sums(a) * a_unit
    b = layers.max_pool(self.bn('proj4_bn')(_conv3x3(s, c, 'proj4_conv')(a), self.train))
    b, stats['proj4_lif'], out_unit = layers.fire(s, b, steps, mode)
    # A 1x1 convolution of stride 2 without padding reads the even rows and columns.
    x2 = x[:, ::2, ::2, :]
    stats['res_in'] = sums(x_spikes[:, ::2, ::2, :])
    r, stats['proj_res_lif'], _ = layers.fire(
        s, self.bn('proj_res_bn')(_dense(s, c, 'proj_res_conv', False)(x2), self.train), steps,
        mode)
    return b + r, stats, out_unit


class Tokenizer(nn.Module):
  """QKFormer up to the encoder: patch_embed1, stage1, patch_embed2, stage2, patch_embed3.

  Per timestep (`model.patch_embed = 'sps'`) every layer runs T steps, as the reference. Under
  I-SPS (`isps.integrate_at = 'first_lif'`) each patch embedding runs its convolutions once, on
  its input integrated over T by `model.isps.reduce` (patch_embed1: its first LIF's spikes, as
  in Spikformer's I-SPS; patch_embed2 / 3: the previous stage's output), its LIFs firing by
  `model.isps.tail` (entries 1, 2, 3 for patch embeddings 1, 2, 3); stages 1 and 2 run T steps
  on the constant token map (docs/method.md section 4). `sps_output` integrates the per-timestep
  output of patch_embed3.
  """
  spec: ModelSpec
  bn_axis_name: str | None = None

  def _modules(self, train: bool):
    s, b = self.spec, self.bn_axis_name
    w = stage_widths(s)
    return (PatchEmbedInit(s, train, b, name='patch_embed1'),
            TokenSpikingTransformer(s, train, b, width=w[0], name='stage1'),
            PatchEmbeddingStage(s, train, b, width=w[1], name='patch_embed2'),
            TokenSpikingTransformer(s, train, b, width=w[1], name='stage2'),
            PatchEmbeddingStage(s, train, b, width=w[2], name='patch_embed3'))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool,
               capture: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Images (B, H, W, C) -> encoder input (T, B, N, D) and the aux sums.

    Returns:
      u: (T, B, N, D) the stage-3 token map per timestep.
      aux: per-image (B,) sums keyed like the reference modules ('patch_embed1.proj_lif',
        'stage1.0.tssa.q_lif', 'patch_embed2.conv3_in', ...: spike counts of every LIF and the
        spikes entering every conv, a value v of an integrated input counting v * its spikes
        per unit) and `token_values` (T, B, N); with `capture` also 'captures', the
        (T, B, N, C) outputs 'patch_embed<i>_out' (i = 1, 2, 3), 'stage<i>_attn_out' and
        'stage<i>_out' (i = 1, 2).
    """
    s = self.spec
    steps_t = s.timesteps
    pe1, st1, pe2, st2, pe3 = self._modules(train)
    modes = s.isps.tail_modes
    once = s.isps_once
    steps = 1 if once else steps_t
    s0 = neurons.lif_constant_input(pe1.stem(images), steps_t, s.lif())    # (T, B, H, W, C0)
    aux = {'patch_embed1.proj_lif': jnp.sum(s0, axis=(0, 2, 3, 4))}
    captures = {}

    def over_time(a):  # (steps * B, h, w, c) -> (T, B, h * w, c), broadcast when steps = 1
      a = einops.rearrange(a, '(t b) h w c -> t b (h w) c', t=steps)
      return jnp.broadcast_to(a, (steps_t,) + a.shape[1:])

    def embed_input(a, a_spikes, side):
      """(T, B, N, c) stage output and the spikes it stands for -> the next patch embedding's
      input (steps * B, side, side, c): as it is, or integrated over T under I-SPS."""
      if once:
        a, a_spikes = layers.integrate(s, a)[None], jnp.sum(a_spikes, 0)[None]
      fold = lambda v: einops.rearrange(v, 't b (h w) c -> (t b) h w c', h=side)
      return fold(a), fold(a_spikes)

    x0 = pe1.pool(layers.integrate(s, s0) if once else s0.reshape((-1,) + s0.shape[2:]))
    x, st, unit = pe1(x0, steps, modes[0], x0 * (s.spikes_per_unit if once else 1))
    aux.update({f'patch_embed1.{k}': v for k, v in st.items()})
    sides = stage_sides(s)
    for i, (stage, embed) in enumerate(((st1, pe2), (st2, pe3)), start=1):
      xt = over_time(x)                                              # (T, B, N, c)
      captures[f'patch_embed{i}_out'] = xt
      # The stage runs T steps, on a token map constant over t under I-SPS.
      y, attn, st = stage(xt.reshape((-1,) + xt.shape[2:]), steps_t, unit)
      aux.update({f'stage{i}.0.{k}': v for k, v in st.items()})
      y = y.reshape(xt.shape)
      captures[f'stage{i}_attn_out'] = attn.reshape(xt.shape)
      captures[f'stage{i}_out'] = y
      # What y stands for in spikes: its input part counts `unit` spikes per unit.
      y_spikes = y + (unit - 1) * xt if unit != 1 else y
      x_in, x_spikes = embed_input(y, y_spikes, sides[i - 1])
      x, st, unit = embed(x_in, steps, modes[i], x_spikes)
      aux.update({f'patch_embed{i + 1}.{k}': v for k, v in st.items()})
    u = over_time(x)
    if s.patch_embed == 'isps' and not once:  # integrate_at == 'sps_output'
      u = jnp.broadcast_to(layers.integrate(s, u), u.shape)
    captures['patch_embed3_out'] = u
    aux['token_values'] = jnp.sum(u, axis=-1)
    if capture:
      aux['captures'] = captures
    return u, aux

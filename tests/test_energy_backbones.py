"""stas_jax.model.energy for SDT and QKFormer: hand-built aux dicts for tiny specs, checked
against arithmetic done by hand (the rules: docs/method.md section 7)."""
import numpy as np
import pytest

from stas_jax.model import energy

# Both tiny specs: T = 2, one encoder block, B = 2 images, N = 4 tokens. The encoder's mask:
# image 0 has all tokens at t0 and tokens 0-1 at t1, image 1 all at t0 and token 0 at t1:
# 4 + 2 = 6 and 4 + 1 = 5 active token-steps, 11 in all; both images active at both steps.
ACTIVE = np.zeros((2, 1, 2, 4), np.float32)
ACTIVE[0, 0, 0] = [1, 1, 1, 1]
ACTIVE[1, 0, 0] = [1, 1, 0, 0]
ACTIVE[0, 0, 1] = [1, 1, 1, 1]
ACTIVE[1, 0, 1] = [1, 0, 0, 0]


def _per_cell(b0, b1):
  """(T=2, L=1, B=2) block stat from per-image (t0, t1) values."""
  return np.array([[[b0[0], b1[0]]], [[b0[1], b1[1]]]], np.float32)


def _pair(a, b):
  return np.array([a, b], np.float32)


def _check(out, sops, split_pj, rates):
  for name, want in sops.items():
    np.testing.assert_allclose(np.asarray(out['sops'][name]), np.float32(want), rtol=1e-6,
                               err_msg=name)
  assert set(out['sops']) == set(sops)
  for name, want in split_pj.items():
    np.testing.assert_allclose(out['energy_split_mj'][name], np.array(want) * 1e-9, rtol=1e-6,
                               err_msg=name)
  total = np.sum([split_pj[k] for k in split_pj], axis=0)
  np.testing.assert_allclose(out['energy_mj'], total * 1e-9, rtol=1e-6)
  assert set(out['firing_rates']) == set(rates)
  for name, want in rates.items():
    np.testing.assert_allclose(out['firing_rates'][name], want, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(out['token_ratio'], [6 / 8, 5 / 8], rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# SDT: 8x8 one-channel image, patch 4 (pools after stages 2 and 3, the last on the BatchNorm
# output before LIF3): MS_SPS channels (1, 2, 4, 8), D = 8, hidden 16, 2 classes.
# ---------------------------------------------------------------------------------------------
SDT = dict(backbone='sdt', image_size=8, in_channels=1, num_classes=2, patch_size=4, dim=8,
           depth=1, heads=1, mlp_ratio=2, timesteps=2)


def sdt_aux():
  block_stats = {
      'shortcut_lif': _per_cell((10, 6), (8, 3)),
      'q_lif': _per_cell((5, 2), (4, 1)),
      'k_lif': _per_cell((6, 3), (2, 1)),
      'v_lif': _per_cell((7, 1), (3, 0)),
      'kv_and': _per_cell((3, 1), (1, 0)),
      'talking_heads_lif': _per_cell((2, 1), (1, 1)),
      'qkv': _per_cell((4, 2), (3, 1)),
      'fc1_lif': _per_cell((12, 7), (9, 3)),
      'fc2_lif': _per_cell((20, 5), (10, 2)),
  }
  sps_stats = {'conv1_in': _pair(30, 20), 'conv2_in': _pair(25, 15), 'conv3_in': _pair(12, 8),
               'rpe_in': _pair(10, 6), 'proj_lif': _pair(40, 24), 'proj_lif1': _pair(50, 14),
               'proj_lif2': _pair(60, 4), 'proj_lif3': _pair(30, 10)}
  return {'active': ACTIVE, 'block_stats': block_stats, 'sps_stats': sps_stats,
          'head_stats': {'head_lif': _pair(6, 3)}}


SDT_SOPS = {  # [image 0, image 1]
    'patch_embed.proj_conv1': [30 * 9 * 2, 20 * 9 * 2],                 # 540, 360
    'patch_embed.proj_conv2': [25 * 9 * 4, 15 * 9 * 4],                 # 900, 540
    'patch_embed.proj_conv3': [12 * 9 * 8, 8 * 9 * 8],                  # 864, 576
    'patch_embed.rpe_conv': [10 * 9 * 8, 6 * 9 * 8],                    # 720, 432
    'patch_embed.rpe_add': [2 * 4 * 8, 2 * 4 * 8],                      # T N D float adds: 64
    'attention.q_conv': [(10 + 6) * 8, (8 + 3) * 8],                    # 128, 88
    'attention.k_conv': [128, 88],
    'attention.v_conv': [128, 88],
    'attention.kv_and': [6 + 3, 2 + 1],                                 # one per k spike
    'attention.kv_sum': [3 + 1, 1 + 0],                                 # one per k * v = 1
    'attention.q_kv': [5 + 2, 4 + 1],                                   # one per q spike
    'attention.proj_conv': [(4 + 2) * 8, (3 + 1) * 8],                  # 48, 32
    'attention.residual_add': [6 * 8, 5 * 8],                           # active tokens x D
    'mlp.fc1_conv': [(12 + 7) * 16, (9 + 3) * 16],                      # 304, 192
    'mlp.fc2_conv': [(20 + 5) * 8, (10 + 2) * 8],                       # 200, 96
    'mlp.residual_add': [48, 40],
    'head.linear': [6 * 2, 3 * 2],                                      # head spikes x classes
    'patch_embed': [3088, 1972],
    'attention': [128 * 3 + 9 + 4 + 7 + 48 + 48, 88 * 3 + 3 + 1 + 5 + 32 + 40],   # 500, 345
    'mlp': [304 + 200 + 48, 192 + 96 + 40],                             # 552, 328
    'head': [12, 6],
    'total': [3088 + 500 + 552 + 12, 1972 + 345 + 328 + 6],
}
# conv0: 8 * 8 * 1 * 1 * 9 = 576 MACs = 2649.6 pJ; no head MACs (its input is spikes).
SDT_SPLIT_PJ = {'patch_embed': [2649.6 + 0.9 * 3088, 2649.6 + 0.9 * 1972],
                'attention': [0.9 * 500, 0.9 * 345], 'mlp': [0.9 * 552, 0.9 * 328],
                'head': [0.9 * 12, 0.9 * 6]}
# Neurons per image x steps: LIF0 8*8*1, LIF1 8*8*2, LIF2 8*8*4, LIF3 (pooled twice) 2*2*8,
# each over T = 2; block LIFs over the 11 active token-steps, the talking-heads LIF over the
# 4 (timestep, image) pairs with an active token, the head LIF over T * D = 16 per image.
SDT_RATES = {
    'patch_embed.proj_lif': 64 / (2 * 128), 'patch_embed.proj_lif1': 64 / (2 * 256),
    'patch_embed.proj_lif2': 64 / (2 * 512), 'patch_embed.proj_lif3': 40 / (2 * 64),
    'block.0.attn.shortcut_lif': 27 / 88, 'block.0.attn.q_lif': 12 / 88,
    'block.0.attn.k_lif': 12 / 88, 'block.0.attn.v_lif': 11 / 88,
    'block.0.attn.talking_heads_lif': 5 / 32, 'block.0.mlp.fc1_lif': 31 / 88,
    'block.0.mlp.fc2_lif': 37 / 176, 'head_lif': 9 / 32,
}


def test_sdt_hand_counted_sops_energy_and_rates():
  out = energy.estimate(sdt_aux(), SDT)
  _check(out, SDT_SOPS, SDT_SPLIT_PJ, SDT_RATES)
  np.testing.assert_array_equal(out['macs']['patch_embed.proj_conv'], [576, 576])
  np.testing.assert_array_equal(out['macs']['head'], [0, 0])


def test_sdt_isps_runs_the_tail_and_the_final_add_once():
  out = energy.estimate(sdt_aux(), dict(SDT, patch_embed='isps'))
  np.testing.assert_array_equal(out['sops']['patch_embed.rpe_add'], [32, 32])  # N D, once
  rates = out['firing_rates']
  np.testing.assert_allclose(rates['patch_embed.proj_lif'], 64 / (2 * 128))  # LIF0: T steps
  np.testing.assert_allclose(rates['patch_embed.proj_lif3'], 40 / (2 * 32))  # the tail: once


def test_sdt_mlp_ratio_one_adds_its_extra_residual():
  out = energy.estimate(sdt_aux(), dict(SDT, mlp_ratio=1))
  np.testing.assert_array_equal(out['sops']['mlp.residual_add'], [2 * 48, 2 * 40])


# ---------------------------------------------------------------------------------------------
# QKFormer: 8x8 one-channel image, dim 32 (stage widths 8, 16, 32), 2 heads, hidden 2x, depth 3
# (one stage-3 block); stage sides 8, 4, 2 (N = 4); conv0 1 -> 4 channels.
# ---------------------------------------------------------------------------------------------
QK = dict(backbone='qkformer', image_size=8, in_channels=1, num_classes=2, patch_size=4, dim=32,
          depth=3, heads=2, mlp_ratio=2, timesteps=2)


def qkformer_aux():
  sps = {'patch_embed1.proj_lif': (100, 60), 'patch_embed1.conv_in': (90, 50),
         'patch_embed1.proj1_lif': (80, 40), 'patch_embed1.proj_res_lif': (70, 30)}
  for i, base in ((1, 10), (2, 20)):
    st, pe = f'stage{i}.0', f'patch_embed{i + 1}'
    sps.update({f'{st}.tssa.x_in': (base + 5, base), f'{st}.tssa.q_lif': (base + 4, base - 1),
                f'{st}.tssa.k_lif': (base + 3, base - 2), f'{st}.tssa.attn_lif': (6, 2),
                f'{st}.tssa.y': (base + 2, base - 3), f'{st}.tssa.proj_lif': (base, 4),
                f'{st}.mlp.x_mid': (base + 9, base + 1), f'{st}.mlp.mlp1_lif': (2 * base, base),
                f'{st}.mlp.mlp2_lif': (base - 4, 3), f'{pe}.conv3_in': (base + 30, base + 10),
                f'{pe}.proj3_lif': (base + 7, base), f'{pe}.conv4_in': (base + 7, base),
                f'{pe}.proj4_lif': (5, 3), f'{pe}.res_in': (base + 1, base - 5),
                f'{pe}.proj_res_lif': (4, 1)})
  sps = {k: _pair(*v) for k, v in sps.items()}
  sps['token_values'] = np.ones((2, 2, 4), np.float32)  # read only when U is a rate
  block_stats = {
      'x_in': _per_cell((10, 6), (8, 3)), 'q_lif': _per_cell((5, 2), (4, 1)),
      'k_lif': _per_cell((6, 3), (2, 1)), 'v_lif': _per_cell((7, 1), (3, 0)),
      'qk_map': _per_cell((9, 4), (5, 1)), 'attn_lif': _per_cell((4, 2), (3, 1)),
      'proj_lif': _per_cell((3, 1), (2, 0)), 'x_mid': _per_cell((12, 7), (9, 3)),
      'fc1_lif': _per_cell((20, 5), (10, 2)), 'fc2_lif': _per_cell((6, 2), (4, 1)),
  }
  return {'active': ACTIVE, 'block_stats': block_stats, 'sps_stats': sps}


QK_SOPS = {  # [image 0, image 1]; stage i width c, hidden 2c; 3x3 convs fan out to 9 c
    'patch_embed.patch_embed1.proj1_conv': [90 * 9 * 8, 50 * 9 * 8],    # 6480, 3600
    'patch_embed.patch_embed1.proj_res_conv': [90 * 8, 50 * 8],         # 720, 400
    'attention.stage1.q_conv': [15 * 8, 10 * 8], 'attention.stage1.k_conv': [15 * 8, 10 * 8],
    'attention.stage1.head_sum': [14, 9],                               # one per q spike
    'attention.stage1.mask_k': [13, 8],                                 # one per k spike
    'attention.stage1.proj_conv': [12 * 8, 7 * 8],
    'mlp.stage1.mlp1_conv': [19 * 16, 11 * 16], 'mlp.stage1.mlp2_conv': [20 * 8, 10 * 8],
    'patch_embed.patch_embed2.proj3_conv': [40 * 9 * 16, 20 * 9 * 16],  # 5760, 2880
    'patch_embed.patch_embed2.proj4_conv': [17 * 9 * 16, 10 * 9 * 16],  # 2448, 1440
    'patch_embed.patch_embed2.proj_res_conv': [11 * 16, 5 * 16],
    'attention.stage2.q_conv': [25 * 16, 20 * 16], 'attention.stage2.k_conv': [25 * 16, 20 * 16],
    'attention.stage2.head_sum': [24, 19], 'attention.stage2.mask_k': [23, 18],
    'attention.stage2.proj_conv': [22 * 16, 17 * 16],
    'mlp.stage2.mlp1_conv': [29 * 32, 21 * 32], 'mlp.stage2.mlp2_conv': [40 * 16, 20 * 16],
    'patch_embed.patch_embed3.proj3_conv': [50 * 9 * 32, 30 * 9 * 32],  # 14400, 8640
    'patch_embed.patch_embed3.proj4_conv': [27 * 9 * 32, 20 * 9 * 32],  # 7776, 5760
    'patch_embed.patch_embed3.proj_res_conv': [21 * 32, 15 * 32],
    # Stage 3 by Spikformer's rules, D = 32, head size 16, hidden 64.
    'attention.stage3.q_conv': [16 * 32, 11 * 32], 'attention.stage3.k_conv': [16 * 32, 11 * 32],
    'attention.stage3.v_conv': [16 * 32, 11 * 32],
    'attention.stage3.qk': [5 * 4 + 2 * 2, 4 * 4 + 1 * 1],              # sum Q x active
    'attention.stage3.qk_v': [13 * 16, 6 * 16], 'attention.stage3.proj_conv': [6 * 32, 4 * 32],
    'mlp.stage3.mlp1_conv': [19 * 64, 12 * 64], 'mlp.stage3.mlp2_conv': [25 * 32, 12 * 32],
}
QK_SOPS['patch_embed'] = [6480 + 720 + 5760 + 2448 + 176 + 14400 + 7776 + 672,
                          3600 + 400 + 2880 + 1440 + 80 + 8640 + 5760 + 480]
QK_SOPS['attention'] = [120 * 2 + 14 + 13 + 96 + 400 * 2 + 24 + 23 + 352 + 512 * 3 + 24 + 208
                        + 192, 80 * 2 + 9 + 8 + 56 + 320 * 2 + 19 + 18 + 272 + 352 * 3 + 17
                        + 96 + 128]
QK_SOPS['mlp'] = [304 + 160 + 928 + 640 + 1216 + 800, 176 + 80 + 672 + 320 + 768 + 384]
QK_SOPS['total'] = [sum(QK_SOPS[g][i] for g in ('patch_embed', 'attention', 'mlp'))
                    for i in (0, 1)]
# conv0: 8 * 8 * 1 * 4 * 9 = 2304 MACs (10598.4 pJ); head 32 * 2 = 64 MACs (294.4 pJ).
QK_SPLIT_PJ = {'patch_embed': [10598.4 + 0.9 * QK_SOPS['patch_embed'][0],
                               10598.4 + 0.9 * QK_SOPS['patch_embed'][1]],
               'attention': [0.9 * v for v in QK_SOPS['attention']],
               'mlp': [0.9 * v for v in QK_SOPS['mlp']], 'head': [294.4, 294.4]}
# Neurons per image x T = 2 steps; spikes of both images.
QK_RATES = {
    'patch_embed1.proj_lif': 160 / (2 * 8 * 8 * 4 * 2),
    'patch_embed1.proj1_lif': 120 / (2 * 8 * 8 * 8 * 2),
    'patch_embed1.proj_res_lif': 100 / (2 * 8 * 8 * 8 * 2),
    'stage1.0.tssa.q_lif': 23 / (2 * 64 * 8 * 2), 'stage1.0.tssa.k_lif': 21 / (2 * 64 * 8 * 2),
    'stage1.0.tssa.attn_lif': 8 / (2 * 64 * 2 * 2),                    # one neuron per head
    'stage1.0.tssa.proj_lif': 14 / (2 * 64 * 8 * 2),
    'stage1.0.mlp.mlp1_lif': 30 / (2 * 64 * 16 * 2), 'stage1.0.mlp.mlp2_lif': 9 / (2 * 64 * 8 * 2),
    'patch_embed2.proj3_lif': 27 / (2 * 64 * 16 * 2),                   # before the pool
    'patch_embed2.proj4_lif': 8 / (2 * 16 * 16 * 2),
    'patch_embed2.proj_res_lif': 5 / (2 * 16 * 16 * 2),
    'stage2.0.tssa.q_lif': 43 / (2 * 16 * 16 * 2), 'stage2.0.tssa.k_lif': 41 / (2 * 16 * 16 * 2),
    'stage2.0.tssa.attn_lif': 8 / (2 * 16 * 2 * 2),
    'stage2.0.tssa.proj_lif': 24 / (2 * 16 * 16 * 2),
    'stage2.0.mlp.mlp1_lif': 60 / (2 * 16 * 32 * 2),
    'stage2.0.mlp.mlp2_lif': 19 / (2 * 16 * 16 * 2),
    'patch_embed3.proj3_lif': 47 / (2 * 16 * 32 * 2),
    'patch_embed3.proj4_lif': 8 / (2 * 4 * 32 * 2),
    'patch_embed3.proj_res_lif': 5 / (2 * 4 * 32 * 2),
    'stage3.0.ssa.q_lif': 12 / (11 * 32), 'stage3.0.ssa.k_lif': 12 / (11 * 32),
    'stage3.0.ssa.v_lif': 11 / (11 * 32), 'stage3.0.ssa.attn_lif': 10 / (11 * 32),
    'stage3.0.ssa.proj_lif': 6 / (11 * 32), 'stage3.0.mlp.mlp1_lif': 37 / (11 * 64),
    'stage3.0.mlp.mlp2_lif': 13 / (11 * 32),
}


def test_qkformer_hand_counted_sops_energy_and_rates():
  out = energy.estimate(qkformer_aux(), QK)
  _check(out, QK_SOPS, QK_SPLIT_PJ, QK_RATES)


def test_qkformer_isps_patch_embeddings_fire_once():
  """Under I-SPS the branch LIFs of each patch embedding run once (single_step tails), its
  first LIF still T steps; stage 1 and 2 neurons run T steps."""
  rates = energy.estimate(qkformer_aux(), dict(QK, patch_embed='isps'))['firing_rates']
  np.testing.assert_allclose(rates['patch_embed1.proj_lif'], 160 / (2 * 8 * 8 * 4 * 2))
  np.testing.assert_allclose(rates['patch_embed1.proj1_lif'], 120 / (2 * 8 * 8 * 8))
  np.testing.assert_allclose(rates['patch_embed3.proj4_lif'], 8 / (2 * 4 * 32))
  np.testing.assert_allclose(rates['stage2.0.tssa.q_lif'], 43 / (2 * 16 * 16 * 2))


@pytest.mark.parametrize('config', [SDT, QK], ids=['sdt', 'qkformer'])
def test_missing_sums_are_named(config):
  aux = sdt_aux() if config is SDT else qkformer_aux()
  del aux['block_stats']['q_lif']
  with pytest.raises(KeyError, match='q_lif'):
    energy.estimate(aux, config)

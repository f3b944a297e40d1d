"""docs/studies/blank_tokens.py: the blank-token mask and the per-group means, by hand."""
import importlib.util
import os

import numpy as np

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'docs', 'studies', 'blank_tokens.py')
spec = importlib.util.spec_from_file_location('blank_tokens', PATH)
blank_tokens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blank_tokens)


def test_blank_tokens_marks_patches_that_hold_only_the_background():
  images = np.full((2, 4, 4), -0.5, np.float32)   # 2 x 2 patches of 2 x 2 pixels
  images[0, 0, 3] = 1.0                           # image 0: top-right patch (token 1)
  images[1, 3, 0] = 0.2                           # image 1: bottom-left patch (token 2)
  images[1, 2, 2] = 0.7                           # image 1: bottom-right patch (token 3)
  np.testing.assert_array_equal(
      blank_tokens.blank_tokens(images, 2),
      [[True, False, True, True], [True, True, False, False]])


def test_group_stats_are_means_over_the_groups_tokens():
  # T = 2, L = 1, one image of 2 tokens: token 0 active at both cells, token 1 at the first.
  active = np.array([[[[1., 1.]]], [[[1., 0.]]]])
  h = np.array([[[[0.1, 0.5]]], [[[0.3, 0.9]]]])
  spikes = np.array([[4., 10.]])
  group = np.array([[True, False]])
  assert blank_tokens.group_stats(active, h, spikes, group) == {
      'cells': 2.0, 'h': np.mean([0.1, 0.3]), 'spikes': 4.0}
  assert blank_tokens.group_stats(active, h, spikes, ~group) == {
      'cells': 1.0, 'h': np.mean([0.5, 0.9]), 'spikes': 10.0}

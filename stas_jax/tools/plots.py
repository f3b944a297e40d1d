"""Study figures (matplotlib, Agg, PNG): halting heat maps, temporal similarity of block inputs,
token ratio per (timestep, block) cell, and the ablation's accuracy-versus-energy scatter.

Every function takes plain numpy arrays (as written to eval.json) and a path, and returns it.
"""
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

DPI = 90  # keeps the committed PNGs well under 200 KB


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches='tight')
  plt.close(fig)
  return path


def cell_labels(timesteps: int, depth: int) -> list:
  """'t1 l1', 't1 l2', ... for the (T, L) grid in raster order (1-based, as in the paper)."""
  return [f't{t + 1} l{l + 1}' for t in range(timesteps) for l in range(depth)]


def halting_cells(active: np.ndarray, mode: str) -> np.ndarray:
  """Per token, the raster index of the grid cell at which it halted.

  Args:
    active: (T, L, K, N) mask in effect when block l ran at timestep t.
    mode: the halting mode. In spatial mode every timestep re-activates each token, so the
      value is instead the number of cells that processed the token, minus one.

  Returns:
    (K, N) int array in [0, T * L - 1].
  """
  steps, depth = active.shape[:2]
  flat = (np.asarray(active) > 0.5).reshape((steps * depth,) + active.shape[2:])
  if mode == 'spatial':
    return flat.sum(0) - 1
  # Masks never re-open in the other modes: the last active cell is the halting cell.
  last = steps * depth - 1 - np.argmax(flat[::-1], axis=0)
  return np.where(flat.any(0), last, 0)


def halting_heatmap(path: str, images: np.ndarray, active: np.ndarray, mode: str,
                    labels: Sequence[int] | None = None,
                    predictions: Sequence[int] | None = None) -> str:
  """A-ViT / AT-SNN style figure: per image, the picture, its halting-cell map and the
  active-token map of every (t, l) cell.

  Args:
    path: PNG to write.
    images: (K, H, W, C) display images (uint8 pixels or floats).
    active: (T, L, K, N) masks, N = grid_size ** 2 tokens in raster order.
    mode: halting mode (see `halting_cells`).
    labels, predictions: optional per-image class ids for the titles.
  """
  active = np.asarray(active, np.float32)
  steps, depth, count, tokens = active.shape
  grid = int(round(np.sqrt(tokens)))
  cells = halting_cells(active, mode).reshape(count, grid, grid)
  num_cells = steps * depth
  cols = 2 + num_cells
  fig, axes = plt.subplots(count, cols, figsize=(1.15 * cols, 1.25 * count + 0.4),
                           squeeze=False)
  cmap = plt.get_cmap('viridis', num_cells)
  names = cell_labels(steps, depth)
  for k in range(count):
    img = np.asarray(images[k], np.float32)
    img = img[..., 0] if img.shape[-1] == 1 else img / max(float(img.max()), 1.0)
    ax = axes[k, 0]
    ax.imshow(img, cmap='gray')
    title = []
    if labels is not None:
      title.append(f'label {int(labels[k])}')
    if predictions is not None:
      title.append(f'pred {int(predictions[k])}')
    ax.set_title(', '.join(title), fontsize=7)
    # The halting-cell map over the image, each token covering its patch.
    height, width = img.shape[:2]
    axes[k, 1].imshow(img, cmap='gray', extent=(0, width, height, 0))
    im = axes[k, 1].imshow(cells[k], cmap=cmap, vmin=-0.5, vmax=num_cells - 0.5, alpha=0.65,
                           extent=(0, width, height, 0), interpolation='nearest')
    for c in range(num_cells):
      t, l = divmod(c, depth)
      axes[k, 2 + c].imshow(active[t, l, k].reshape(grid, grid), cmap='Greys_r', vmin=0, vmax=1)
      if k == 0:
        axes[k, 2 + c].set_title(names[c], fontsize=7)
    if k == 0:
      axes[k, 1].set_title('cells used' if mode == 'spatial' else 'halting cell', fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  cbar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01,
                      ticks=range(num_cells))
  cbar.ax.set_yticklabels([str(c + 1) if mode == 'spatial' else n for c, n in
                           enumerate(names)], fontsize=6)
  cbar.set_label('cells used' if mode == 'spatial' else 'halting cell (t, l)', fontsize=7)
  fig.suptitle(f'Token halting ({mode}): the cell where each token halted, and the tokens '
               'processed at each (t, l) cell (white)', fontsize=8)
  return _save(fig, path)


def temporal_similarity(path: str, curves: Mapping[str, np.ndarray],
                        title: str = 'Cosine similarity of block inputs, t vs t+1') -> str:
  """One panel per encoder block: similarity between consecutive timesteps, one line per run.

  Args:
    path: PNG to write.
    curves: {legend label: (L, T - 1) array} (`halting.temporal_similarity`).
    title: figure title.
  """
  arrays = {k: np.asarray(v, np.float32) for k, v in curves.items()}
  depth = max(a.shape[0] for a in arrays.values())
  fig, axes = plt.subplots(1, depth, figsize=(2.8 * depth, 2.6), squeeze=False, sharey=True)
  for l in range(depth):
    ax = axes[0, l]
    for (label, sim), marker in zip(arrays.items(), 'osd^v<>'):
      if l < sim.shape[0] and sim.shape[1]:
        x = np.arange(1, sim.shape[1] + 1)
        ax.plot(x, sim[l], marker=marker, label=label)
        ax.set_xticks(x, [f'{t}-{t + 1}' for t in x])
    ax.set_title(f'block {l + 1} input', fontsize=9)
    ax.set_xlabel('timesteps')
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel('cosine similarity')
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def token_ratio_cells(path: str, ratio: np.ndarray, title: str = 'Token ratio per cell') -> str:
  """(T, L) heat map of the fraction of tokens active at each (timestep, block) cell."""
  ratio = np.asarray(ratio, np.float32)
  steps, depth = ratio.shape
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * depth, 0.8 + 0.45 * steps))
  im = ax.imshow(ratio, cmap='magma', vmin=0, vmax=1, aspect='auto')
  for t in range(steps):
    for l in range(depth):
      ax.text(l, t, f'{ratio[t, l]:.2f}', ha='center', va='center', fontsize=7,
              color='white' if ratio[t, l] < 0.6 else 'black')
  ax.set_xticks(range(depth), [f'l{l + 1}' for l in range(depth)])
  ax.set_yticks(range(steps), [f't{t + 1}' for t in range(steps)])
  ax.set_xlabel('block')
  ax.set_ylabel('timestep')
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def _place_labels(fig, ax, labelled):
  """Annotates (label, x, y) points, moving a label below or left of its point when it would
  overlap one already placed."""
  fig.canvas.draw()  # settles the axis limits, so that label boxes are where they will be
  renderer = fig.canvas.get_renderer()
  placed = []
  for label, x, y in labelled:
    for offset, align in (((4, 3), 'left'), ((4, -8), 'left'), ((-4, 3), 'right'),
                          ((-4, -8), 'right')):
      text = ax.annotate(label, (x, y), textcoords='offset points', xytext=offset,
                         fontsize=6.5, ha=align)
      box = text.get_window_extent(renderer)
      if not any(box.overlaps(other) for other in placed):
        break
      text.remove()
    else:
      text = ax.annotate(label, (x, y), textcoords='offset points', xytext=(4, 3), fontsize=6.5)
      box = text.get_window_extent(renderer)
    placed.append(box)


def accuracy_energy(path: str, points: Sequence[tuple[str, float, float, str]],
                    title: str = 'Accuracy vs energy',
                    errors: Sequence[tuple[float, float]] | None = None) -> str:
  """Scatter of top-1 accuracy (%) against energy (mJ / image), one labelled point per row.

  Args:
    path: PNG to write.
    points: (label, energy_mj, top1 in %, group) per row; groups share a colour and marker.
    title: the figure title.
    errors: optional (energy std, top-1 std) per point, drawn as error bars (e.g. over seeds).
  """
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  groups = list(dict.fromkeys(p[3] for p in points))
  styles = dict(zip(groups, zip(plt.get_cmap('tab10').colors, 'os^dv<>p')))
  for group in groups:
    idx = [i for i, p in enumerate(points) if p[3] == group]
    sel = [points[i] for i in idx]
    color, marker = styles[group]
    ax.scatter([p[1] for p in sel], [p[2] for p in sel], color=color, marker=marker, s=36,
               label=group)
    if errors is not None:
      ax.errorbar([p[1] for p in sel], [p[2] for p in sel], xerr=[errors[i][0] for i in idx],
                  yerr=[errors[i][1] for i in idx], fmt='none', ecolor=color, alpha=0.6,
                  capsize=2, lw=0.8)
  _place_labels(fig, ax, [(p[0], p[1], p[2]) for p in points])
  ax.set_xlabel('energy (mJ / image)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)

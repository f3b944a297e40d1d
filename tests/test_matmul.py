"""Matmuls and convs in float32 and in mixed precision, against references computed in float64
(or by XLA's own convolution) on the same rounded operands."""
import jax
import jax.numpy as jnp
import numpy as np

from stas_jax.model import matmul

BF16 = jnp.bfloat16


def _rounded(a):
  """a rounded to bfloat16, as a float64 numpy array."""
  return np.asarray(jnp.asarray(a, BF16).astype(jnp.float32), np.float64)


def test_conv3x3_value_and_custom_gradient_match_lax():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 7, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 4))

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  np.testing.assert_allclose(np.asarray(matmul.conv3x3(x, w)), np.asarray(ref(x, w)), atol=1e-5)
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  got = jax.grad(loss(matmul.conv3x3), (0, 1))(x, w)
  want = jax.grad(loss(ref), (0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_bf16_dot_accumulates_in_float32_forward_and_backward():
  # Values chosen so that a bfloat16 result (8 significant bits) would be off by ~1e-3.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64)) * 3
  w = jax.random.normal(jax.random.PRNGKey(1), (64, 7))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7))
  f = lambda x, w: matmul.dot(x.astype(BF16), w.astype(BF16))
  y, vjp = jax.vjp(f, x, w)
  assert y.dtype == jnp.float32
  xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
  np.testing.assert_allclose(np.asarray(y), xr @ wr, rtol=1e-5, atol=1e-5)
  dx, dw = vjp(g)
  assert dx.dtype == dw.dtype == jnp.float32   # cotangents of the float32 inputs
  # The gradient products take the rounded cotangent; their results are rounded to bfloat16
  # (the operands' dtype) on the way back, so compare at that precision.
  np.testing.assert_allclose(np.asarray(dx), _rounded(gr @ wr.T), rtol=2 ** -8, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw), _rounded(np.einsum('bnk,bnf->kf', xr, gr)),
                             rtol=2 ** -8, atol=1e-6)


def test_float32_dot_is_plain_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
  np.testing.assert_array_equal(np.asarray(matmul.dot(x, w)), np.asarray(jnp.dot(x, w)))
  gx = jax.grad(lambda x: jnp.sum(jnp.sin(matmul.dot(x, w))))(x)
  np.testing.assert_array_equal(np.asarray(gx),
                                np.asarray(jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))(x)))


def test_bf16_conv3x3_matches_xla_on_the_rounded_operands():
  x = (jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 5, 8)) < 0.3).astype(jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 4))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 5, 4))
  f = lambda x, w: matmul.conv3x3(x.astype(BF16), w.astype(BF16))
  y, vjp = jax.vjp(f, x, w)
  assert y.dtype == jnp.float32
  as32 = lambda a: jnp.asarray(_rounded(a), jnp.float32)
  y_ref, vjp_ref = jax.vjp(matmul.xla_conv3x3, as32(x), as32(w))
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
  dx, dw = vjp(g)
  dx_ref, dw_ref = vjp_ref(as32(g))
  assert dx.dtype == dw.dtype == jnp.float32
  # Rounded to bfloat16 on the way back: within one bfloat16 ulp of the float32 reference.
  for got, want in ((dx, dx_ref), (dw, dw_ref)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2 ** -8, atol=1e-6)


def test_conv3x3_kernel_gradient_forms_match_float64():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 5, 4))
  dy = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 5, 7))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 4, 7))
  for i in range(3):
    for j in range(3):
      want[i, j] = np.einsum('mhwc,mhwf->cf', xp[:, i:i + 6, j:j + 5], np.asarray(dy, np.float64))
  for form in (matmul.kernel_grad_taps, matmul.kernel_grad_conv):
    got = form(x, dy)
    assert got.shape == (3, 3, 4, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_conv3x3_kernel_gradient_form_follows_the_platform():
  """CPU lowers the nine per-tap GEMMs; GPU and TPU one convolution per gradient (exported for
  those platforms here, without their devices)."""
  from jax import export

  def grads(x, w):
    return jax.grad(lambda x, w: jnp.sum(matmul.conv3x3(x, w) ** 2), (0, 1))(x, w)

  args = (jax.ShapeDtypeStruct((2, 6, 5, 4), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 4, 7), jnp.float32))
  ops = {}
  for platform in ('cpu', 'cuda', 'tpu'):
    text = export.export(jax.jit(grads), platforms=[platform])(*args).mlir_module()
    ops[platform] = (text.count('stablehlo.convolution'), text.count('stablehlo.dot_general'))
  assert ops['cpu'] == (2, 9)                   # forward + input gradient; nine taps
  assert ops['cuda'] == ops['tpu'] == (3, 0)    # forward + input + kernel gradient

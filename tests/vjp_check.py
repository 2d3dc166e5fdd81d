"""Shared check for hand-written gradients: value and VJP equal autodiff of the plain formula."""

import jax
import numpy as np


def _f32(x):
  return np.asarray(x, np.float32)


def _scale(x):
  return max(1.0, float(np.max(np.abs(_f32(x)))))


def assert_vjp_matches(plain, fused, primals, cotangent, tol):
  """`fused(*primals)` and its cotangents match `plain`'s within `tol` x magnitude."""
  want_y, want_vjp = jax.vjp(plain, *primals)
  got_y, got_vjp = jax.vjp(fused, *primals)
  np.testing.assert_allclose(_f32(got_y), _f32(want_y), atol=tol * _scale(want_y))
  for got, want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(_f32(got), _f32(want), atol=tol * _scale(want))

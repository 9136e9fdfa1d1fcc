"""Training many small classifiers at once: one jit-compiled loop, vmapped over stacked
parameters and datasets (methods x perturbation levels x seeds in ROAR / GOAR).

    params = retrain.train_many(model, xs, ys, keys, steps=300, batch_size=64)   # (M, ...) trees
    acc = retrain.accuracy_many(model, params, x_test, y_test)                    # (M,)

`xs` (M, N, ...) and `ys` (M, N) hold one training set per model; model m starts from
`model.init(keys[m])` and sees minibatches drawn from its own set by `fold_in(keys[m], step)`, so
`train_many` on M models equals M calls of `train_one` (the same function, not vmapped), up to
floating-point reassociation. Adam with weight decay (optax.adamw), softmax cross-entropy.

`retrain_and_test(..., mesh=distributed.make_mesh())` splits the models over the mesh's `data`
axis (on a pod: every host's devices), each device training its share; every process gets every
accuracy.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffgeo_jax import distributed


def _check(xs, ys, batched: bool):
  lead = 2 if batched else 1
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  if xs.ndim < lead + 1 or ys.shape != xs.shape[:lead]:
    raise ValueError(f'x must be ({"M, " if batched else ""}N, ...) with y '
                     f'({"M, " if batched else ""}N), got {xs.shape} and {ys.shape}')
  return xs, ys


def _train(model: nn.Module, x, y, key, steps: int, batch_size: int, learning_rate: float,
           weight_decay: float):
  """One model: init from `key`, `steps` Adam steps on minibatches of (x, y); returns params."""
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, x[:1])['params']
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(p, xb, yb):
    logits = model.apply({'params': p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def step(i, carry):
    p, opt = carry
    idx = jax.random.randint(jax.random.fold_in(data_key, i), (batch_size,), 0, x.shape[0])
    g = jax.grad(loss_fn)(p, x[idx], y[idx])
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


@functools.partial(jax.jit, static_argnames=('model', 'steps', 'batch_size', 'learning_rate',
                                             'weight_decay'))
def _train_many(model, xs, ys, keys, steps, batch_size, learning_rate, weight_decay):
  return jax.vmap(lambda x, y, k: _train(model, x, y, k, steps, batch_size, learning_rate,
                                         weight_decay))(xs, ys, keys)


@functools.partial(jax.jit, static_argnames=('model', 'steps', 'batch_size', 'learning_rate',
                                             'weight_decay'))
def _train_one(model, x, y, key, steps, batch_size, learning_rate, weight_decay):
  return _train(model, x, y, key, steps, batch_size, learning_rate, weight_decay)


def train_many(model: nn.Module, xs, ys, keys, *, steps: int, batch_size: int = 64,
               learning_rate: float = 1e-3, weight_decay: float = 0.0):
  """Stacked params (leading axis M) of M models trained on (xs[m], ys[m]) from keys[m]."""
  xs, ys = _check(xs, ys, batched=True)
  if keys.shape[0] != xs.shape[0]:
    raise ValueError(f'keys must hold one key per model ({xs.shape[0]}), got {keys.shape}')
  return _train_many(model, xs, ys, keys, int(steps), int(batch_size), float(learning_rate),
                     float(weight_decay))


def train_one(model: nn.Module, x, y, key, *, steps: int, batch_size: int = 64,
              learning_rate: float = 1e-3, weight_decay: float = 0.0):
  """The same training for one model (the sequential reference of `train_many`)."""
  x, y = _check(x, y, batched=False)
  return _train_one(model, x, y, key, int(steps), int(batch_size), float(learning_rate),
                    float(weight_decay))


@functools.partial(jax.jit, static_argnames=('model',))
def _predict_many(model, params, xs):
  return jax.vmap(lambda p, x: jnp.argmax(model.apply({'params': p}, x), axis=-1))(params, xs)


def accuracy_many(model: nn.Module, params, xs, ys) -> jax.Array:
  """(M,) test accuracy of each stacked model m on (xs[m], ys[m])."""
  xs, ys = _check(xs, ys, batched=True)
  return jnp.mean(_predict_many(model, params, xs) == ys, axis=1)


class MLP(nn.Module):
  """The retrained classifier: a ReLU MLP on the flattened input (N, ...) -> (N, num_classes).
  (A small CNN vmapped over parameters trains 1.4x slower than one model at a time on XLA:CPU,
  whose grouped-convolution backward is slow; dense layers batch into matrix products.)"""
  hidden: tuple[int, ...] = (64, 64)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


def _train_and_test(model, x, key, x_test, y, y_test, steps, batch_size, learning_rate,
                    weight_decay):
  """One model trained on (x, y) from `key`, then its accuracy on (x_test, y_test)."""
  p = _train(model, x, y, key, steps, batch_size, learning_rate, weight_decay)
  return jnp.mean(jnp.argmax(model.apply({'params': p}, x_test), axis=-1) == y_test)


@functools.lru_cache(maxsize=16)
def _train_and_test_many(model, steps, batch_size, learning_rate, weight_decay, mesh):
  """(xs, keys, x_tests, y, y_test) -> (M,) accuracies, the models split over `mesh` (one
  compilation per shape, reused across calls)."""
  def many(xs, keys, x_tests, y, y_test):
    return jax.vmap(lambda x, k, xt: _train_and_test(
        model, x, k, xt, y, y_test, steps, batch_size, learning_rate, weight_decay))(
            xs, keys, x_tests)
  return distributed.data_parallel(many, mesh, num_batched=3)


def retrain_and_test(model: nn.Module, x_train, y_train, x_test, y_test, seeds, *, steps: int,
                     batch_size: int = 64, learning_rate: float = 1e-3,
                     weight_decay: float = 0.0, mesh=None):
  """(L, S) test accuracies: for each of L training sets x_train (L, N, ...) (labels y_train (N,)
  shared), S models (one per seed) trained in one vmapped run and tested on x_test[l] (L, N', ...)
  with labels y_test (N',). With `mesh` the L * S models are split over its `data` axis
  (`distributed.data_parallel`: call it on every process) and the result is numpy on every
  process."""
  x_train, x_test = jnp.asarray(x_train), jnp.asarray(x_test)
  levels, s = x_train.shape[0], len(seeds)
  if x_test.shape[0] != levels:
    raise ValueError(f'x_train and x_test must hold the same number of sets, got '
                     f'{x_train.shape[0]} and {x_test.shape[0]}')
  rep = lambda a: jnp.repeat(a, s, axis=0)  # model m = level m // S, seed m % S
  keys = jnp.tile(jnp.stack([jax.random.key(int(seed)) for seed in seeds]), levels)
  if mesh is not None:
    many = _train_and_test_many(model, int(steps), int(batch_size), float(learning_rate),
                                float(weight_decay), mesh)
    acc = many(rep(x_train), keys, rep(x_test), jnp.asarray(y_train), jnp.asarray(y_test))
    return acc.reshape(levels, s)
  ys = jnp.broadcast_to(jnp.asarray(y_train), (levels * s,) + jnp.shape(y_train))
  params = train_many(model, rep(x_train), ys, keys, steps=steps, batch_size=batch_size,
                      learning_rate=learning_rate, weight_decay=weight_decay)
  yt = jnp.broadcast_to(jnp.asarray(y_test), (levels * s,) + jnp.shape(y_test))
  return accuracy_many(model, params, rep(x_test), yt).reshape(levels, s)

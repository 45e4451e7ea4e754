"""Adafactor factoring rules, parity with optax, state layout; AdamW; gradient clipping."""

from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polyglot_jax.parallel import axes
from polyglot_jax.training.optimizers import (Adafactor, AdamW, FactoredRulesState, factor_layout,
                                              matrix_mask)
from polyglot_jax.training.schedules import create_learning_rate_schedule

SCHEDULE = create_learning_rate_schedule("constant * linear_warmup", base_learning_rate=0.1,
                                         warmup_steps=2)


def make_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {name: jax.random.normal(key, shape) for key, (name, shape) in zip(keys, shapes.items())}


def run_steps(tx: optax.GradientTransformation, params: Any, steps: int = 3) -> tuple[list, Any]:
  """Applies `steps` random gradients; returns the updates of every step and the final state."""
  state, update = tx.init(params), jax.jit(tx.update)
  all_updates = []
  for step in range(steps):
    grads = jax.tree.map(lambda p, s=step: 3.0 * jax.random.normal(jax.random.key(100 + s),
                                                                   p.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
  return all_updates, state


@pytest.mark.parametrize("axes, shape, row, col, averaging", [
    (("embed", "mlp"), (512, 2048), (0,), (1,), (0, 1)),
    (("mlp", "embed"), (2048, 512), (1,), (0,), (0, 1)),
    (("vocab", "embed"), (32128, 512), (1,), (0,), (0, 1)),
    # Several COLUMN axes form one joint column (as the fused 'joined_kv' kernel would).
    (("embed", "heads", "kv"), (512, 8, 64), (0,), (1, 2), (0, 1, 2)),
    (("heads", "kv", "embed"), (8, 64, 512), (2,), (0, 1), (0, 1, 2)),
    # BATCH axes are never averaged over: statistics stay per layer / per expert.
    (("layers", "embed", "mlp"), (4, 512, 1024), (1,), (2,), (1, 2)),
    (("expert", "embed", "expert_mlp"), (8, 512, 1024), (1,), (2,), (1, 2)),
    # Not factored: a vector, a NONE axis, a dim below min_dim_size_to_factor.
    (("embed",), (512,), (), (), (0,)),
    (("layers", "embed"), (4, 512), (), (), (1,)),
    (("heads", "relpos_buckets"), (8, 32), (), (), (0, 1)),
    (("embed", "rank"), (512, 256), (), (), (0, 1)),
    (("embed", "mlp"), (64, 2048), (), (), (0, 1)),
    # The joint column size decides: 2 heads x 64 = 128 reaches the threshold.
    (("embed", "heads", "kv"), (512, 2, 64), (0,), (1, 2), (0, 1, 2)),
])
def test_factoring_decisions(axes, shape, row, col, averaging) -> None:
  layout = factor_layout(axes, shape, min_dim_size_to_factor=128)
  assert (layout.row_dims, layout.col_dims, layout.averaging_dims) == (row, col, averaging)


def test_factored_false_disables_factoring() -> None:
  assert not factor_layout(("embed", "mlp"), (512, 2048), factored=False).factored


def test_unknown_axis_error() -> None:
  message = ("logical axis 'foo' has no Adafactor factoring rule; "
             "add it to polyglot_jax.parallel.axes.FACTOR_RULES")
  with pytest.raises(ValueError, match=f"^{message}$"):
    factor_layout(("embed", "foo"), (4, 4))
  tx = Adafactor(learning_rate=0.1).build({"w": ("embed", "foo")})
  with pytest.raises(ValueError, match=f"^{message}$"):
    tx.init({"w": jnp.zeros((4, 4))})


def test_every_axis_in_design_has_a_rule() -> None:
  design_axes = ("batch length embed mlp heads kv joined_kv vocab relpos_buckets layers expert "
                 "expert_mlp unmodeled rank kv_heads").split()
  assert set(design_axes) <= set(axes.FACTOR_RULES)


# Where our rules pick the same dims as optax's heuristic (ROW = second-largest dim,
# COLUMN = largest), the two optimizers must agree; min_dim_size_to_factor=4 keeps arrays tiny.
PARITY_SHAPES = {"wi": (4, 8), "wo": (8, 4), "scale": (8,), "relpos": (2, 3), "small": (3, 8)}
PARITY_AXES = {"wi": ("embed", "mlp"), "wo": ("mlp", "embed"), "scale": ("embed",),
               "relpos": ("heads", "relpos_buckets"), "small": ("embed", "mlp")}


@pytest.mark.parametrize("extra", [{}, {"beta1": 0.9, "weight_decay": 1e-2}])
def test_adafactor_matches_optax(extra: dict) -> None:
  params = make_params(PARITY_SHAPES)
  ours = Adafactor(learning_rate=SCHEDULE, min_dim_size_to_factor=4, **extra).build(PARITY_AXES)
  reference = optax.adafactor(
      learning_rate=SCHEDULE, min_dim_size_to_factor=4, momentum=extra.get("beta1"),
      weight_decay_rate=extra.get("weight_decay"))
  our_updates, our_state = run_steps(ours, params)
  ref_updates, ref_state = run_steps(reference, params)
  for got, want in zip(our_updates, ref_updates):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9), got, want)
  # Same statistics; ours keep reduced dims as size 1 and unused slots as (1,) * ndim.
  for slot in ("v_row", "v_col", "v"):
    for name, shape in PARITY_SHAPES.items():
      got, want = getattr(our_state[0], slot)[name], getattr(ref_state[0], slot)[name]
      if want.shape == (1,) and np.prod(shape) > 1:  # slot unused by optax
        assert got.shape == (1,) * len(shape)
      else:
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-6)


def test_state_layout() -> None:
  shapes = {"encoder": {"layers": {"query": (2, 4, 2, 4), "scale": (2, 4)}},
            "token_embedder": {"embedding": (8, 4)}}
  param_axes = {"encoder": {"layers": {"query": ("layers", "embed", "heads", "kv"),
                                       "scale": ("layers", "embed")}},
                "token_embedder": {"embedding": ("vocab", "embed")}}
  params = jax.tree.map(jnp.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))
  tx = Adafactor(learning_rate=0.1, min_dim_size_to_factor=4, grad_clip_norm=1.0)
  state = tx.build(param_axes).init(params)

  factored_state = [s for s in state if isinstance(s, FactoredRulesState)]
  assert len(factored_state) == 1
  q = {slot: getattr(factored_state[0], slot)["encoder"]["layers"]["query"].shape
       for slot in ("v_row", "v_col", "v")}
  assert q == {"v_row": (2, 4, 1, 1), "v_col": (2, 1, 2, 4), "v": (1, 1, 1, 1)}
  scale = {slot: getattr(factored_state[0], slot)["encoder"]["layers"]["scale"].shape
           for slot in ("v_row", "v_col", "v")}
  assert scale == {"v_row": (1, 1), "v_col": (1, 1), "v": (2, 4)}

  param_paths = {path: leaf.ndim for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if leaf.ndim == 0:  # counters
      continue
    matches = [p for p in param_paths if path[-len(p):] == p]
    assert len(matches) == 1, jax.tree_util.keystr(path)
    assert leaf.ndim == param_paths[matches[0]], jax.tree_util.keystr(path)


def test_scanned_stack_updates_like_separate_layers() -> None:
  # Different parameter scales per layer: per-layer RMS statistics give different update sizes.
  stacked = make_params({"w": (2, 4, 8)})["w"] * jnp.array([1.0, 5.0])[:, None, None]
  grads = jax.random.normal(jax.random.key(7), stacked.shape) * jnp.array([1.0, 9.0])[:, None, None]
  tx = Adafactor(learning_rate=0.1, min_dim_size_to_factor=4)

  def update(axes: tuple[str, ...], param: jax.Array, grad: jax.Array) -> jax.Array:
    built = tx.build({"w": axes})
    return jax.jit(built.update)({"w": grad}, built.init({"w": param}), {"w": param})[0]["w"]

  scanned = update(("layers", "embed", "mlp"), stacked, grads)
  for i in range(2):
    np.testing.assert_allclose(scanned[i], update(("embed", "mlp"), stacked[i], grads[i]),
                               rtol=1e-6)


def test_unfused_heads_update_like_fused_joined_kv() -> None:
  fused = make_params({"q": (4, 8)})
  unfused = {"q": fused["q"].reshape(4, 2, 4)}
  tx = Adafactor(learning_rate=0.1, min_dim_size_to_factor=4)
  fused_updates, _ = run_steps(tx.build({"q": ("embed", "joined_kv")}), fused)
  unfused_updates, _ = run_steps(tx.build({"q": ("embed", "heads", "kv")}), unfused)
  for f, u in zip(fused_updates, unfused_updates):
    np.testing.assert_allclose(f["q"], u["q"].reshape(4, 8), rtol=1e-6)


def test_bfloat16_params_keep_dtype_with_float32_statistics() -> None:
  params = {"w": jnp.ones((4, 8), jnp.bfloat16)}
  tx = Adafactor(learning_rate=0.1, min_dim_size_to_factor=4).build({"w": ("embed", "mlp")})
  updates, state = tx.update(params, tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  assert state[0].v_row["w"].dtype == jnp.float32


def test_adamw_matches_optax() -> None:
  params = make_params(PARITY_SHAPES)
  ours = AdamW(learning_rate=SCHEDULE, weight_decay=0.1, decay_matrices_only=False)
  reference = optax.adamw(SCHEDULE, weight_decay=0.1)
  for got, want in zip(run_steps(ours.build(PARITY_AXES), params)[0],
                       run_steps(reference, params)[0]):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


def test_adamw_decays_matrices_only() -> None:
  axes = {"kernel": ("embed", "mlp"), "scale": ("embed",), "scanned_scale": ("layers", "embed"),
          "scanned_kernel": ("layers", "embed", "mlp")}
  mask = matrix_mask(axes)
  assert mask == {"kernel": True, "scale": False, "scanned_scale": False, "scanned_kernel": True}
  params = make_params({"kernel": (4, 8), "scale": (8,), "scanned_scale": (2, 4),
                        "scanned_kernel": (2, 4, 8)})
  ours = AdamW(learning_rate=SCHEDULE, weight_decay=0.1).build(axes)
  reference = optax.adamw(SCHEDULE, weight_decay=0.1, mask=mask)
  for got, want in zip(run_steps(ours, params)[0], run_steps(reference, params)[0]):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


def test_grad_clip_norm_clips_before_the_optimizer() -> None:
  # With eps=1 Adam's first update g / (|g| + 1) depends on the gradient's scale, so it shows
  # whether the optimizer saw the clipped gradient.
  params = make_params({"w": (4, 8)})
  grads = {"w": 10.0 * jnp.ones((4, 8))}  # global norm 10 * sqrt(32)
  clipped_grads = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
  assert float(optax.global_norm(clipped_grads)) == pytest.approx(1.0, rel=1e-6)

  def first_update(grad_clip_norm: float | None, g: dict) -> jax.Array:
    tx = AdamW(learning_rate=1.0, eps=1.0, grad_clip_norm=grad_clip_norm).build({"w": ("embed",
                                                                                      "mlp")})
    return tx.update(g, tx.init(params), params)[0]["w"]

  np.testing.assert_allclose(first_update(1.0, grads), first_update(None, clipped_grads),
                             rtol=1e-6)
  assert not np.allclose(first_update(1.0, grads), first_update(None, grads))


def test_learning_rate_fn_and_gin_binding() -> None:
  assert float(AdamW(learning_rate=3e-4).learning_rate_fn(10)) == pytest.approx(3e-4)
  gin.clear_config()
  try:
    gin.parse_config("""
        create_learning_rate_schedule.factors = "constant * linear_warmup"
        create_learning_rate_schedule.base_learning_rate = 1.0
        create_learning_rate_schedule.warmup_steps = 10
        Adafactor.learning_rate = @create_learning_rate_schedule()
        Adafactor.grad_clip_norm = 1.0
    """)
    optimizer = Adafactor()
  finally:
    gin.clear_config()
  assert optimizer.grad_clip_norm == 1.0
  assert float(optimizer.learning_rate_fn(5)) == pytest.approx(0.5)


def test_adafactor_under_optax_masked() -> None:
  # Frozen parameters (PEFT) reach the inner transformation as optax.MaskedNode.
  params = make_params({"frozen": (4, 8), "trained": (4, 8)})
  axes = {"frozen": ("embed", "mlp"), "trained": ("embed", "mlp")}
  tx = Adafactor(learning_rate=0.1, min_dim_size_to_factor=4)
  masked = optax.masked(tx.build(axes), {"frozen": False, "trained": True})
  masked_updates, _ = run_steps(masked, params)
  alone_updates, _ = run_steps(tx.build({"trained": axes["trained"]}),
                               {"trained": params["trained"]})
  for got, want in zip(masked_updates, alone_updates):
    np.testing.assert_allclose(got["trained"], want["trained"], rtol=1e-6)

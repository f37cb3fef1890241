"""Backward Pallas Triton kernels of the portable FlashAttention.

FlashAttention-2 Algorithm 2 (https://arxiv.org/abs/2307.08691), split into
two deterministic kernels (no atomics, so repeated runs are bit-identical):

1. ``_dq_kernel``: per query tile, first the pre-pass of line 4,
   ``delta = rowsum(dO * O) - dlse`` (the log-sum-exp cotangent folded in:
   ``d lse / d logits = p``), written out for the dK/dV kernel together with
   the saved base-2 ``lse`` in which ``-inf`` (rows that saw nothing) is
   turned into ``+inf``, so that recomputed probabilities
   ``exp2(s * c - lse)`` are exactly 0 there without any per-tile select.
   Then it walks the visible key blocks (the same plan as the forward),
   recomputes ``p`` and ``dS = p * (dP - delta)`` and accumulates
   ``dQ = dS K``; with a bias it also writes dbias tiles (reduced in-kernel
   over the packed heads / rows when the bias broadcasts there).
2. ``_dkdv_kernel``: per key block, walks the query tiles that see it (the
   transposed plan), in the transposed orientation ``s^T = K Q^T`` so that
   ``dV = p^T dO`` and ``dK = dS^T Q`` need no transposes of p or dS. The G
   packed query heads of a GQA group are rows of the same tile, so dK/dV
   come out already summed over the group. With ``split_dkdv`` (large head
   dims) a key block gets two programs, one accumulating dV and one dK, so
   each holds one float32 ``[block_kv, H]`` accumulator instead of two.

Sinks get their gradient outside the kernels from per-row quantities only:
``d sink_n = -sum_{b,t} exp(sink_n - lse) * delta``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import common
from pallas_kernels.flash.common import BlockSizes, Spec

__all__ = ["backward"]


# ---------------------------------------------------------------------------
# 1. Pre-pass, dQ (and dbias).
# ---------------------------------------------------------------------------


def _dbias_layout(sp: Spec, num_q_blocks: int):
  """Shape of the in-kernel dbias buffer [B, N', T', S'] (reduced later)."""
  _, nb, tb, sb = sp.bias_shape
  return (sp.batch, sp.num_heads if nb > 1 else sp.num_kv_heads,
          sp.q_len if tb > 1 else num_q_blocks, sp.kv_len if sb > 1 else 1)


def _reduce_rows(ds, rows: common.Rows, kh, i, keep_t: bool, keep_g: bool):
  """Sums a [M, C] tile over the rows the bias broadcasts along.

  Returns ``(tile [R, C], n_idx [R, 1], t_idx [R, 1], row_mask or None)``
  indexing the dbias buffer (whose head axis is K when heads are summed and
  whose T axis counts query blocks when rows are summed).
  """
  m, c = ds.shape
  full_rows = jnp.full((1, 1), 0, jnp.int32)
  if keep_t and keep_g:
    n_idx = (rows.n[:, None] if rows.packed
             else jnp.full((m, 1), rows.n, jnp.int32))
    return ds, n_idx, rows.t[:, None], rows.valid()
  if rows.packed:
    d3 = ds.reshape(rows.block_t, rows.g_pad, c)
    if keep_t:
      t = rows.t0 + jnp.arange(rows.block_t, dtype=jnp.int32)
      mask = t < rows.seq_len if rows.ragged else None
      return (jnp.sum(d3, axis=1), jnp.full((rows.block_t, 1), kh, jnp.int32),
              t[:, None], mask)
    if keep_g:
      gi = jnp.arange(rows.g_pad, dtype=jnp.int32)
      mask = gi < rows.g if rows.g_pad > rows.g else None
      return (jnp.sum(d3, axis=0), (kh * rows.g + gi)[:, None],
              jnp.full((rows.g_pad, 1), i, jnp.int32), mask)
  elif keep_t:
    return (ds, jnp.full((m, 1), kh, jnp.int32), rows.t[:, None],
            rows.valid())
  return (jnp.sum(ds, axis=0, keepdims=True), full_rows + kh,
          full_rows + i, None)


def _dq_kernel(dbias_in_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref,
               dlse_ref, plan_ref, aux_ref, bias_ref, marr_ref, qseg_ref,
               kvseg_ref, qlen_ref, kvlen_ref, dq_ref, delta_ref, lseb_ref,
               dbias_ref, *, sp: Spec, plan: common.Plan, block_t: int,
               block_kv: int):
  del dbias_in_ref  # aliased with dbias_ref (zero-initialised)
  pid, kh, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  i = (plan.num_rows - 1 - pid) if plan.reverse else pid
  hgrp = kh if plan.num_groups > 1 else 0
  kv_ragged = sp.kv_len % block_kv != 0
  rows = common.Rows.make(i, kh, block_t=block_t, g_pad=sp.g_pad, g=sp.group,
                          seq_len=sp.q_len, ragged=sp.q_len % block_t != 0)
  kv_len_b = common.scalar(kvlen_ref, b) if sp.kv_lengths else None
  tm = common.TileMath(sp, False, b, kh, bias_ref, marr_ref, aux_ref, plan,
                       kv_len_b)

  q = rows.load(q_ref, b, sp.hp, sp.head_dim)
  do = rows.load(do_ref, b, sp.hvp, sp.value_head_dim)
  # The pre-pass (Algorithm 2, line 4), once per row: every row belongs to
  # exactly one program. Stored for the dK/dV kernel.
  o = rows.load(o_ref, b, sp.hvp, sp.value_head_dim)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  if dlse_ref is not None:
    delta = delta - rows.load_stat(dlse_ref, b, other=0.0)
  lse = rows.load_stat(lse_ref, b, other=-jnp.inf)
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  rows.store_stat(delta_ref, b, delta)
  rows.store_stat(lseb_ref, b, lse)
  q_seg = rows.load_seq(qseg_ref, b, other=0) if sp.segment_ids else None

  n_full, n_part, f0, p0 = common.plan_counts(plan_ref, hgrp, i)
  if sp.q_lengths:
    live = rows.t0 < common.scalar(qlen_ref, b)
    n_full, n_part = jnp.where(live, n_full, 0), jnp.where(live, n_part, 0)
  if sp.kv_lengths:
    limit = common.cdiv_dyn(kv_len_b, block_kv)
    n_full = common.clamp_range(n_full, f0, limit, plan.full_range)
    n_part = common.clamp_range(n_part, p0, limit, plan.partial_range)

  dbias_on = sp.bias_shape is not None
  if dbias_on:
    _, nb, tb, sb = sp.bias_shape
    keep_t, keep_g = tb > 1, nb > 1
  dq0 = jnp.zeros((rows.size, sp.hp), jnp.float32)
  col0 = None
  if dbias_on and sb == 1:
    probe = _reduce_rows(jnp.zeros((rows.size, 1), jnp.float32), rows, kh,
                         i, keep_t, keep_g)[0]
    col0 = jnp.zeros(probe.shape, jnp.float32)

  def body(jj, carry, *, partial):
    dq, col = carry
    j = common.plan_block(plan_ref, plan, hgrp, i, jj, full=not partial,
                          start=p0 if partial else f0)
    ragged = partial and kv_ragged
    kv_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
    k = common.load_kv(k_ref, b, j, kh, block_kv, sp.hp, sp.head_dim,
                       sp.kv_len, ragged)
    v = common.load_kv(v_ref, b, j, kh, block_kv, sp.hvp, sp.value_head_dim,
                       sp.kv_len, ragged)
    s = common.dot(q, k, trans_b=True, precision=sp.precision)
    x, c, th = tm.scores(s, rows, kv_pos, ragged)
    kv_seg = (common.load_vec(kvseg_ref, b, j, block_kv, sp.kv_len, ragged)
              if sp.segment_ids else None)
    vis = tm.visibility(rows, kv_pos, i, j, partial=partial,
                        kv_ragged=ragged, q_seg=q_seg, kv_seg=kv_seg)
    if vis is not None:
      x = jnp.where(vis, x, -jnp.inf)
    p = jnp.exp2(x * c - lse[:, None])
    dp = common.dot(do, v, trans_b=True, precision=sp.precision)
    ds = p * (dp - delta[:, None])
    if th is not None:
      ds = ds * (1.0 - th * th)  # through c * tanh(x / c)
    if dbias_on:
      if sb == 1:
        red = _reduce_rows(jnp.sum(ds, axis=1, keepdims=True), rows, kh, i,
                           keep_t, keep_g)[0]
        col = col + red
      else:
        tile, n_idx, t_idx, rmask = _reduce_rows(ds, rows, kh, i, keep_t,
                                                 keep_g)
        mask = None if rmask is None else rmask[:, None]
        if ragged:
          mask = common._and(mask, (kv_pos < sp.kv_len)[None, :])
        view = dbias_ref.at[common.i32(b), n_idx, t_idx, kv_pos[None, :]]
        plgpu.store(view, tile.astype(dbias_ref.dtype), mask=mask)
    dq = dq + common.dot(ds.astype(k.dtype), k, precision=sp.precision)
    return dq, col

  carry = (dq0, col0)
  carry = jax.lax.fori_loop(0, n_full, functools.partial(body, partial=False),
                            carry)
  dq, col = jax.lax.fori_loop(0, n_part, functools.partial(body, partial=True),
                              carry)
  rows.store(dq_ref, b, dq * sp.scale, sp.head_dim)
  if col is not None:
    _, n_idx, t_idx, rmask = _reduce_rows(
        jnp.zeros((rows.size, 1), jnp.float32), rows, kh, i, keep_t, keep_g)
    view = dbias_ref.at[common.i32(b), n_idx, t_idx,
                        jnp.zeros((1, 1), jnp.int32)]
    plgpu.store(view, col.astype(dbias_ref.dtype),
                mask=None if rmask is None else rmask[:, None])


# ---------------------------------------------------------------------------
# 2. dK / dV.
# ---------------------------------------------------------------------------


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, plan_ref,
                 aux_ref, bias_ref, marr_ref, qseg_ref, kvseg_ref, qlen_ref,
                 kvlen_ref, dk_ref, dv_ref, *, sp: Spec, plan: common.Plan,
                 block_t: int, block_kv: int, split: bool):
  pid, kh, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if split:
    # Programs 2r and 2r + 1 compute dV and dK of the same key block (they
    # read the same Q and dO tiles at about the same time: L2 reuse).
    part, pid = pid % 2, pid // 2
  j = (plan.num_rows - 1 - pid) if plan.reverse else pid
  hgrp = kh if plan.num_groups > 1 else 0
  kv_ragged = sp.kv_len % block_kv != 0
  t_ragged = sp.q_len % block_t != 0
  kv_len_b = common.scalar(kvlen_ref, b) if sp.kv_lengths else None
  tm = common.TileMath(sp, True, b, kh, bias_ref, marr_ref, aux_ref, plan,
                       kv_len_b)
  kv_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)

  n_full, n_part, f0, p0 = common.plan_counts(plan_ref, hgrp, j)
  if sp.kv_lengths:
    live = j * block_kv < kv_len_b
    n_full, n_part = jnp.where(live, n_full, 0), jnp.where(live, n_part, 0)
  if sp.q_lengths:
    limit = common.cdiv_dyn(common.scalar(qlen_ref, b), block_t)
    n_full = common.clamp_range(n_full, f0, limit, plan.full_range)
    n_part = common.clamp_range(n_part, p0, limit, plan.partial_range)

  def run(want_dk: bool, want_dv: bool):
    k = common.load_kv(k_ref, b, j, kh, block_kv, sp.hp, sp.head_dim,
                       sp.kv_len, kv_ragged)
    v = (common.load_kv(v_ref, b, j, kh, block_kv, sp.hvp,
                        sp.value_head_dim, sp.kv_len, kv_ragged)
         if want_dk else None)
    kv_seg = (common.load_vec(kvseg_ref, b, j, block_kv, sp.kv_len,
                              kv_ragged) if sp.segment_ids else None)

    def body(ii, carry, *, partial):
      dk, dv = carry
      i = common.plan_block(plan_ref, plan, hgrp, j, ii, full=not partial,
                            start=p0 if partial else f0)
      rows = common.Rows.make(i, kh, block_t=block_t, g_pad=sp.g_pad,
                              g=sp.group, seq_len=sp.q_len,
                              ragged=partial and t_ragged)
      q = rows.load(q_ref, b, sp.hp, sp.head_dim)
      do = rows.load(do_ref, b, sp.hvp, sp.value_head_dim)
      lse = rows.load_stat(lse_ref, b, other=jnp.inf)
      st = common.dot(k, q, trans_b=True, precision=sp.precision)  # [bk, M]
      x, c, th = tm.scores(st, rows, kv_pos, partial and kv_ragged)
      q_seg = rows.load_seq(qseg_ref, b, other=0) if sp.segment_ids else None
      vis = tm.visibility(rows, kv_pos, i, j, partial=partial,
                          kv_ragged=partial and kv_ragged, q_seg=q_seg,
                          kv_seg=kv_seg)
      if vis is not None:
        x = jnp.where(vis, x, -jnp.inf)
      pt = jnp.exp2(x * c - lse[None, :])
      if want_dv:
        dv = dv + common.dot(pt.astype(do.dtype), do, precision=sp.precision)
      if want_dk:
        delta = rows.load_stat(delta_ref, b, other=0.0)
        dpt = common.dot(v, do, trans_b=True,
                         precision=sp.precision)  # [bk, M]
        dst = pt * (dpt - delta[None, :])
        if th is not None:
          dst = dst * (1.0 - th * th)
        dk = dk + common.dot(dst.astype(q.dtype), q, precision=sp.precision)
      return dk, dv

    carry = (jnp.zeros((block_kv, sp.hp), jnp.float32) if want_dk else None,
             jnp.zeros((block_kv, sp.hvp), jnp.float32) if want_dv else None)
    carry = jax.lax.fori_loop(0, n_full,
                              functools.partial(body, partial=False), carry)
    dk, dv = jax.lax.fori_loop(0, n_part,
                               functools.partial(body, partial=True), carry)
    if want_dk:
      common.store_kv(dk_ref, b, j, kh, dk * sp.scale, sp.head_dim,
                      sp.kv_len, kv_ragged)
    if want_dv:
      common.store_kv(dv_ref, b, j, kh, dv, sp.value_head_dim, sp.kv_len,
                      kv_ragged)

  if not split:
    run(True, True)
  else:
    pl.when(part == 0)(lambda: run(False, True))
    pl.when(part == 1)(lambda: run(True, False))


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def backward(sp: Spec, bs: BlockSizes, q, k, v, bias, mask_array, qseg, kvseg,
             qlen, kvlen, sinks, out, lse2, d_out, d_lse):
  """Gradients ``(dq, dk, dv, dbias | None, dsinks | None)``.

  ``lse2`` is the forward's base-2 log-sum-exp [B, T, N]; ``d_lse`` the
  natural-log lse cotangent in the same [B, T, N] layout (or None).
  """
  ins = (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, out, lse2,
         d_out, d_lse)

  # Pre-pass + dQ (+ dbias).
  bt, bk = common.tile_shape(bs.block_q_dq, bs.block_kv_dq, sp)
  plan, plan_arr, aux = common.make_plan(sp.mask, sp.q_len, sp.kv_len, bt, bk,
                                         sp.num_kv_heads, sp.group)
  aux = None if aux is None else jnp.asarray(aux)
  row_stat = common.out_struct(lse2.shape, jnp.float32, *ins)
  out_shape = [common.out_struct(q.shape, q.dtype, *ins), row_stat, row_stat]
  dbias_buf = None
  aliases = {}
  if bias is not None:
    dbias_buf = jnp.zeros(_dbias_layout(sp, plan.num_rows), jnp.float32)
    out_shape.append(common.out_struct(dbias_buf.shape, jnp.float32, *ins))
    aliases = {0: 3}
  kernel = functools.partial(_dq_kernel, sp=sp, plan=plan, block_t=bt,
                             block_kv=bk)
  if bias is None:
    kernel = functools.partial(_no_dbias, kernel)
  res = pl.pallas_call(
      kernel,
      grid=(plan.num_rows, sp.num_kv_heads, sp.batch),
      out_shape=tuple(out_shape),
      input_output_aliases=aliases,
      interpret=sp.interpret,
      name="attnjax_flash_bwd_dq",
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_dq,
                                           num_stages=bs.num_stages_dq),
  )(dbias_buf, q, k, v, out, d_out, lse2, d_lse, jnp.asarray(plan_arr), aux,
    bias, mask_array, qseg, kvseg, qlen, kvlen)
  dq, delta, lseb = res[:3]
  dbias = None
  if bias is not None:
    dbias = res[3]
    bb, nb, tb, _ = sp.bias_shape
    axes = tuple(a for a, keep in enumerate((bb > 1, nb > 1, tb > 1))
                 if not keep)
    dbias = jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype)

  # dK, dV (two programs per key block with split_dkdv).
  bt, bk = common.tile_shape(bs.block_q_dkv, bs.block_kv_dkv, sp)
  plan, plan_arr, aux = common.make_plan(sp.mask, sp.q_len, sp.kv_len, bt, bk,
                                         sp.num_kv_heads, sp.group,
                                         kv_major=True)
  aux = None if aux is None else jnp.asarray(aux)
  split = bool(bs.split_dkdv)
  kernel = functools.partial(_dkdv_kernel, sp=sp, plan=plan, block_t=bt,
                             block_kv=bk, split=split)
  dk, dv = pl.pallas_call(
      kernel,
      grid=(plan.num_rows * (2 if split else 1), sp.num_kv_heads, sp.batch),
      out_shape=(common.out_struct(k.shape, k.dtype, *ins),
                 common.out_struct(v.shape, v.dtype, *ins)),
      interpret=sp.interpret,
      name="attnjax_flash_bwd_dkdv",
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_dkv,
                                           num_stages=bs.num_stages_dkv),
  )(q, k, v, d_out, lseb, delta, jnp.asarray(plan_arr), aux, bias, mask_array,
    qseg, kvseg, qlen, kvlen)

  dsinks = None
  if sinks is not None:
    # d lse / d sink = exp(sink - lse), d out / d sink = -that * out.
    sink2 = sinks.astype(jnp.float32) * common.LOG2E
    w = jnp.where(lse2 == -jnp.inf, 0.0,
                  jnp.exp2(sink2[None, None, :] - lse2))
    dsinks = (-jnp.sum(w * delta, axis=(0, 1))).astype(sinks.dtype)
  return dq, dk, dv, dbias, dsinks


def _no_dbias(kernel, dbias_in_ref, *refs):
  """Adapts the dQ kernel when there is no bias (no dbias output)."""
  kernel(dbias_in_ref, *refs, None)

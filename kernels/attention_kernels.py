"""Triton JIT code of the flash-attention kernels (launch planning: ``attention_plan.py``; autograd: ``attention.py``).

All kernels take SDPA-layout ``(B, H, S, D)`` tensors through explicit strides (unit last
stride) and a 2-D grid ``(row blocks, B*H)``. The head dim is covered by up to two
power-of-two column chunks ``DA`` and ``DB`` (``HAS_B``), loaded with ``tl.arange`` + mask
(``MASK_A``/``MASK_B``), so hd 40/80/160 cost 48/80/160 columns of MMA work, not 64/128/256.
Scores are kept in base 2: ``qk_scale = scale * log2(e)``, ``LSE`` is ``log2(sum(exp2))``.
``UPCAST`` widens dot operands to fp32 (only for bf16 under the CPU interpreter, whose numpy
dot has no bf16); ``PREC`` is ``tl.dot``'s ``input_precision``; ``ALIGN`` is the largest
power of two dividing every stride (see ``_hint``).

Sequence lengths are never specialised (``_SEQ_JIT``): Triton turns an int argument equal to 1
into a compile-time constant, so ``SEQ_K == 1`` (or ``SEQ_Q == 1``) would give a kernel whose
key (query) loop has a constant single trip, is folded away and is lowered without the
``cp.async`` pipeline and with a different wgmma wait structure than every other length. On
an H200 (Triton 3.6) that variant returned wrong dQ at ``Sk == 1`` and wrong dK at
``Sq == 1`` for hd 160 (bf16/fp16) while ``Sk == 7`` / ``Sq == 7`` with the same tiles were
right. With the lengths kept as runtime ints, length 1 runs the same code as any length.
"""
import triton
import triton.language as tl

# see the module docstring: a length of 1 must not become a constexpr
_SEQ_JIT = triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K"])


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _hint(stride, ALIGN: tl.constexpr):
    # The JIT only marks ints divisible by 16; hd 40 rows (stride 40) would then be read
    # 2 bytes at a time and never pipelined. The host passes the largest power of two
    # dividing every stride; rebuilding the stride as a product with it lets the compiler's
    # alignment analysis see that (tl.multiple_of does not attach to a kernel argument), so
    # 16-byte vector loads and cp.async stay possible. A shift and a multiply per program.
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _load2d(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    # Masks are emitted only where the shape needs them, so aligned tiles keep wide loads.
    if ROW_MASK:
        if COL_MASK:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if COL_MASK:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store2d(ptrs, val, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    val = val.to(ptrs.dtype.element_ty)
    if ROW_MASK:
        if COL_MASK:
            tl.store(ptrs, val, mask=row_ok[:, None] & col_ok[None, :])
        else:
            tl.store(ptrs, val, mask=row_ok[:, None])
    else:
        if COL_MASK:
            tl.store(ptrs, val, mask=col_ok[None, :])
        else:
            tl.store(ptrs, val)


# --------------------------------------------------------------------------- forward
@_SEQ_JIT
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, SEQ_Q, SEQ_K, qk_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    stride_qb = _hint(stride_qb, ALIGN)
    stride_qh = _hint(stride_qh, ALIGN)
    stride_qm = _hint(stride_qm, ALIGN)
    stride_kb = _hint(stride_kb, ALIGN)
    stride_kh = _hint(stride_kh, ALIGN)
    stride_kn = _hint(stride_kn, ALIGN)
    stride_vb = _hint(stride_vb, ALIGN)
    stride_vh = _hint(stride_vh, ALIGN)
    stride_vn = _hint(stride_vn, ALIGN)
    stride_ob = _hint(stride_ob, ALIGN)
    stride_oh = _hint(stride_oh, ALIGN)
    stride_om = _hint(stride_om, ALIGN)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    m_ok = offs_m < SEQ_Q
    a_ok = offs_a < HEAD_DIM
    b_ok = offs_b < HEAD_DIM

    q_base = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    q_a = _load2d(q_base + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
    if HAS_B:
        q_b = _load2d(q_base + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)

    for start_n in range(0, SEQ_K, BLOCK_N):
        kn = start_n + offs_n
        n_ok = kn < SEQ_K
        k_rows = k_base + kn[:, None] * stride_kn
        v_rows = v_base + kn[:, None] * stride_vn
        k_a = _load2d(k_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
        s = _mm(q_a, tl.trans(k_a), UPCAST, PREC)
        if HAS_B:
            k_b = _load2d(k_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
            s = _mma(q_b, tl.trans(k_b), s, UPCAST, PREC)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)
        v_a = _load2d(v_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
        acc_a = _mma(p, v_a, acc_a * alpha[:, None], UPCAST, PREC)
        if HAS_B:
            v_b = _load2d(v_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
            acc_b = _mma(p, v_b, acc_b * alpha[:, None], UPCAST, PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_base = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
    _store2d(o_base + offs_a[None, :], acc_a * inv_l[:, None], m_ok, a_ok, not EVEN_M, MASK_A)
    if HAS_B:
        _store2d(o_base + offs_b[None, :], acc_b * inv_l[:, None], m_ok, b_ok, not EVEN_M, MASK_B)
    # base-2 log-sum-exp of the scaled scores; (B*H, SEQ_Q) contiguous fp32
    lse = m_i + tl.math.log2(l_i)
    if EVEN_M:
        tl.store(LSE + bh * SEQ_Q + offs_m, lse)
    else:
        tl.store(LSE + bh * SEQ_Q + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["SEQ_K"])
def _attn_bwd_split_sum_kernel(
    DK_PART, DV_PART, DK, DV,
    stride_ps, stride_pb, stride_ph, stride_pn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, N_SPLIT: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Sums the fp32 dK/dV partials of the query-split path and casts them into dk/dv (any
    # strides): one launch for both, where ``dk.copy_(part.sum(0))`` twice was four.
    stride_dkb = _hint(stride_dkb, ALIGN)
    stride_dkh = _hint(stride_dkh, ALIGN)
    stride_dkn = _hint(stride_dkn, ALIGN)
    stride_dvb = _hint(stride_dvb, ALIGN)
    stride_dvh = _hint(stride_dvh, ALIGN)
    stride_dvn = _hint(stride_dvn, ALIGN)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    part = b * stride_pb + h * stride_ph + offs_n[:, None] * stride_pn + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for s in range(N_SPLIT):
        dk += tl.load(DK_PART + s * stride_ps + part, mask=mask, other=0.0)
        dv += tl.load(DV_PART + s * stride_ps + part, mask=mask, other=0.0)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@_SEQ_JIT
def _attn_bwd_dkdv_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    H, SEQ_Q, SEQ_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, N_SPLIT: tl.constexpr, FUSED: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # A program holds one key/value block and sweeps query blocks, accumulating dK and dV
    # (fp32 partials when N_SPLIT programs share the key block). Scores are held transposed
    # (keys x queries), so dK/dV accumulate without a transpose.
    #
    # FUSED (the single-pass backward, when BLOCK_N >= SEQ_K: cross-attention's 77 keys):
    # the block is *every* key, so each swept query block's rows of P and dS are complete
    # here; the program also derives delta = rowsum(dO * O) and writes dQ = dS K for them
    # (no atomics: nobody else touches these rows), and no dQ kernel runs. P and dP are then
    # computed once, not once per kernel. Otherwise delta comes from the dQ kernel (DELTA)
    # and O/DQ are not touched.
    stride_qb = _hint(stride_qb, ALIGN)
    stride_qh = _hint(stride_qh, ALIGN)
    stride_qm = _hint(stride_qm, ALIGN)
    stride_kb = _hint(stride_kb, ALIGN)
    stride_kh = _hint(stride_kh, ALIGN)
    stride_kn = _hint(stride_kn, ALIGN)
    stride_vb = _hint(stride_vb, ALIGN)
    stride_vh = _hint(stride_vh, ALIGN)
    stride_vn = _hint(stride_vn, ALIGN)
    stride_ob = _hint(stride_ob, ALIGN)
    stride_oh = _hint(stride_oh, ALIGN)
    stride_om = _hint(stride_om, ALIGN)
    stride_dob = _hint(stride_dob, ALIGN)
    stride_doh = _hint(stride_doh, ALIGN)
    stride_dom = _hint(stride_dom, ALIGN)
    stride_dqb = _hint(stride_dqb, ALIGN)
    stride_dqh = _hint(stride_dqh, ALIGN)
    stride_dqm = _hint(stride_dqm, ALIGN)
    stride_dks = _hint(stride_dks, ALIGN)
    stride_dkb = _hint(stride_dkb, ALIGN)
    stride_dkh = _hint(stride_dkh, ALIGN)
    stride_dkn = _hint(stride_dkn, ALIGN)
    stride_dvs = _hint(stride_dvs, ALIGN)
    stride_dvb = _hint(stride_dvb, ALIGN)
    stride_dvh = _hint(stride_dvh, ALIGN)
    stride_dvn = _hint(stride_dvn, ALIGN)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    pid_n = pid // N_SPLIT  # always 0 when FUSED: the grid is (N_SPLIT, B*H)
    split = pid % N_SPLIT
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    n_ok = offs_n < SEQ_K
    a_ok = offs_a < HEAD_DIM
    b_ok = offs_b < HEAD_DIM

    # This program's key/value tile stays on chip for the whole query sweep.
    k_rows = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
    v_rows = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
    k_a = _load2d(k_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
    v_a = _load2d(v_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
    if HAS_B:
        k_b = _load2d(k_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
        v_b = _load2d(v_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)

    # Query blocks are dealt out to the N_SPLIT programs sharing this key block.
    n_mblocks = tl.cdiv(SEQ_Q, BLOCK_M)
    per_split = tl.cdiv(n_mblocks, N_SPLIT)
    m_lo = split * per_split * BLOCK_M
    m_hi = tl.minimum((split + 1) * per_split * BLOCK_M, n_mblocks * BLOCK_M)
    q_bh = Q + b * stride_qb + h * stride_qh
    do_bh = DO + b * stride_dob + h * stride_doh
    o_bh = O + b * stride_ob + h * stride_oh
    dq_bh = DQ + b * stride_dqb + h * stride_dqh
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + offs_mm
        m_ok = offs_m < SEQ_Q
        q_rows = q_bh + offs_m[:, None] * stride_qm
        do_rows = do_bh + offs_m[:, None] * stride_dom
        q_a = _load2d(q_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
        do_a = _load2d(do_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
        if HAS_B:
            q_b = _load2d(q_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
            do_b = _load2d(do_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
        if FUSED:
            o_rows = o_bh + offs_m[:, None] * stride_om
            o_a = _load2d(o_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
            delta = tl.sum(o_a.to(tl.float32) * do_a.to(tl.float32), 1)
            if HAS_B:
                o_b = _load2d(o_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
                delta += tl.sum(o_b.to(tl.float32) * do_b.to(tl.float32), 1)
        if EVEN_M:
            lse = tl.load(LSE + bh * SEQ_Q + offs_m)
            if not FUSED:
                delta = tl.load(DELTA + bh * SEQ_Q + offs_m)
        else:
            # +inf makes exp2(s - lse) exactly 0 for rows past the end
            lse = tl.load(LSE + bh * SEQ_Q + offs_m, mask=m_ok, other=float("inf"))
            if not FUSED:
                delta = tl.load(DELTA + bh * SEQ_Q + offs_m, mask=m_ok, other=0.0)
        s_t = _mm(k_a, tl.trans(q_a), UPCAST, PREC)
        dp_t = _mm(v_a, tl.trans(do_a), UPCAST, PREC)
        if HAS_B:
            s_t = _mma(k_b, tl.trans(q_b), s_t, UPCAST, PREC)
            dp_t = _mma(v_b, tl.trans(do_b), dp_t, UPCAST, PREC)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if FUSED and not EVEN_N:
            # key rows past SEQ_K are zero-filled (s = 0, p = exp2(-lse) != 0): harmless for
            # dK/dV (those rows are never stored) but dQ sums over keys
            p_t = tl.where(n_ok[:, None], p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
        p_t = p_t.to(DO.dtype.element_ty)
        dv_a = _mma(p_t, do_a, dv_a, UPCAST, PREC)
        dk_a = _mma(ds_t, q_a, dk_a, UPCAST, PREC)
        if HAS_B:
            dv_b = _mma(p_t, do_b, dv_b, UPCAST, PREC)
            dk_b = _mma(ds_t, q_b, dk_b, UPCAST, PREC)
        if FUSED:
            dq_rows = dq_bh + offs_m[:, None] * stride_dqm
            dq_a = _mm(tl.trans(ds_t), k_a, UPCAST, PREC)
            _store2d(dq_rows + offs_a[None, :], dq_a * sm_scale, m_ok, a_ok, not EVEN_M, MASK_A)
            if HAS_B:
                dq_b = _mm(tl.trans(ds_t), k_b, UPCAST, PREC)
                _store2d(dq_rows + offs_b[None, :], dq_b * sm_scale, m_ok, b_ok, not EVEN_M, MASK_B)

    dk_rows = DK + split * stride_dks + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
    dv_rows = DV + split * stride_dvs + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
    _store2d(dk_rows + offs_a[None, :], dk_a * sm_scale, n_ok, a_ok, not EVEN_N, MASK_A)
    _store2d(dv_rows + offs_a[None, :], dv_a, n_ok, a_ok, not EVEN_N, MASK_A)
    if HAS_B:
        _store2d(dk_rows + offs_b[None, :], dk_b * sm_scale, n_ok, b_ok, not EVEN_N, MASK_B)
        _store2d(dv_rows + offs_b[None, :], dv_b, n_ok, b_ok, not EVEN_N, MASK_B)


@_SEQ_JIT
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, SEQ_Q, SEQ_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    stride_qb = _hint(stride_qb, ALIGN)
    stride_qh = _hint(stride_qh, ALIGN)
    stride_qm = _hint(stride_qm, ALIGN)
    stride_kb = _hint(stride_kb, ALIGN)
    stride_kh = _hint(stride_kh, ALIGN)
    stride_kn = _hint(stride_kn, ALIGN)
    stride_vb = _hint(stride_vb, ALIGN)
    stride_vh = _hint(stride_vh, ALIGN)
    stride_vn = _hint(stride_vn, ALIGN)
    stride_ob = _hint(stride_ob, ALIGN)
    stride_oh = _hint(stride_oh, ALIGN)
    stride_om = _hint(stride_om, ALIGN)
    stride_dob = _hint(stride_dob, ALIGN)
    stride_doh = _hint(stride_doh, ALIGN)
    stride_dom = _hint(stride_dom, ALIGN)
    stride_dqb = _hint(stride_dqb, ALIGN)
    stride_dqh = _hint(stride_dqh, ALIGN)
    stride_dqm = _hint(stride_dqm, ALIGN)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nn = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    m_ok = offs_m < SEQ_Q
    a_ok = offs_a < HEAD_DIM
    b_ok = offs_b < HEAD_DIM

    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    do_rows = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
    q_a = _load2d(q_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
    do_a = _load2d(do_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
    # delta = rowsum(dO * O) for this program's rows (it owns all their columns): computed
    # here instead of by a separate launch, and stored for the dK/dV kernel that runs after.
    o_rows = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
    o_a = _load2d(o_rows + offs_a[None, :], m_ok, a_ok, not EVEN_M, MASK_A)
    delta = tl.sum(o_a.to(tl.float32) * do_a.to(tl.float32), 1)
    if HAS_B:
        q_b = _load2d(q_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
        do_b = _load2d(do_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
        o_b = _load2d(o_rows + offs_b[None, :], m_ok, b_ok, not EVEN_M, MASK_B)
        delta += tl.sum(o_b.to(tl.float32) * do_b.to(tl.float32), 1)
    if EVEN_M:
        lse = tl.load(LSE + bh * SEQ_Q + offs_m)
        tl.store(DELTA + bh * SEQ_Q + offs_m, delta)
    else:
        lse = tl.load(LSE + bh * SEQ_Q + offs_m, mask=m_ok, other=float("inf"))
        tl.store(DELTA + bh * SEQ_Q + offs_m, delta, mask=m_ok)
    dq_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)

    k_bh = K + b * stride_kb + h * stride_kh
    v_bh = V + b * stride_vb + h * stride_vh
    for start_n in range(0, SEQ_K, BLOCK_N):
        kn = start_n + offs_nn
        n_ok = kn < SEQ_K
        k_rows = k_bh + kn[:, None] * stride_kn
        v_rows = v_bh + kn[:, None] * stride_vn
        k_a = _load2d(k_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
        v_a = _load2d(v_rows + offs_a[None, :], n_ok, a_ok, not EVEN_N, MASK_A)
        s = _mm(q_a, tl.trans(k_a), UPCAST, PREC)
        dp = _mm(do_a, tl.trans(v_a), UPCAST, PREC)
        if HAS_B:
            k_b = _load2d(k_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
            v_b = _load2d(v_rows + offs_b[None, :], n_ok, b_ok, not EVEN_N, MASK_B)
            s = _mma(q_b, tl.trans(k_b), s, UPCAST, PREC)
            dp = _mma(do_b, tl.trans(v_b), dp, UPCAST, PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if not EVEN_N:
            # keys past SEQ_K: s = 0 there, so p = exp2(-lse) is finite but not 0; zero it
            # instead of relying on the zero-filled K rows to cancel it in ds @ K
            p = tl.where(n_ok[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq_a = _mma(ds, k_a, dq_a, UPCAST, PREC)
        if HAS_B:
            dq_b = _mma(ds, k_b, dq_b, UPCAST, PREC)

    dq_rows = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
    _store2d(dq_rows + offs_a[None, :], dq_a * sm_scale, m_ok, a_ok, not EVEN_M, MASK_A)
    if HAS_B:
        _store2d(dq_rows + offs_b[None, :], dq_b * sm_scale, m_ok, b_ok, not EVEN_M, MASK_B)

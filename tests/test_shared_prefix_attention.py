"""shared_prefix_attention against float64 attention, and its equivalence with tree_attention and SDPA."""
import pytest
import torch
import torch.nn.functional as F

from o1kernels import SharedPrefixPlan, TreeAttentionPlan, shared_prefix_attention, tree_attention
from attention_reference import LSE_TOLERANCES, TOLERANCES, attention_f64, backends_on, random_values, report_mismatch
from test_tree_attention import BACKEND_PATHS, check_layout_covers

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = backends_on("cpu")


def _inputs(b, g, p, s, hq, hkv, d, dtype, device, *, lens="random"):
    """Random q/prefix/suffix tensors, lengths (random incl. 0 and full, or full) and groups."""
    q = (torch.randn(b, hq, d, device=device) * 2).to(dtype)
    prefix_k = torch.randn(g, p, hkv, d, device=device).to(dtype)
    prefix_v = random_values((g, p, hkv, d), dtype, device)
    suffix_k = torch.randn(b, s, hkv, d, device=device).to(dtype)
    suffix_v = random_values((b, s, hkv, d), dtype, device)
    if lens == "full":
        prefix_lens = torch.full((g,), p, device=device)
        suffix_lens = torch.full((b,), s, device=device)
    else:
        prefix_lens = torch.randint(0, p + 1, (g,), device=device)
        prefix_lens[0] = p
        suffix_lens = torch.randint(0, s + 1, (b,), device=device)
        suffix_lens[: min(b, 2)] = torch.tensor([s, 0][: min(b, 2)])
    branch_group = torch.randint(0, g, (b,), device=device)
    return q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group


def _branch_kv(prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, i):
    """Branch i's own concatenated copy of its prefix and suffix keys/values."""
    g, pl, sl = int(branch_group[i]), int(prefix_lens[int(branch_group[i])]), int(suffix_lens[i])
    return (torch.cat([prefix_k[g, :pl], suffix_k[i, :sl]]).cpu(), torch.cat([prefix_v[g, :pl], suffix_v[i, :sl]]).cpu())


def _reference(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, sm_scale):
    outs, lses = [], []
    for i in range(q.shape[0]):
        k, v = _branch_kv(prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, i)
        o, lse = attention_f64(q[i], k, v, sm_scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _check(backend, args, with_groups=True, sm_scale=None, plan=None):
    q, pk, pv, sk, sv, pl, sl, bg = args
    o, lse = shared_prefix_attention(q, pk, pv, sk, sv, prefix_lens=pl, suffix_lens=sl,
                                     branch_group=bg if with_groups else None, sm_scale=sm_scale, return_lse=True,
                                     backend=backend, plan=plan)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o_ref, lse_ref = _reference(q, pk, pv, sk, sv, pl, sl, bg, scale)
    report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[q.dtype])
    report_mismatch(f"lse ({backend})", lse, lse_ref, *LSE_TOLERANCES[q.dtype])


# (B, G, P, S, Hq, Hkv, D)
CASES = [
    (1, 1, 97, 17, 4, 4, 16),     # one branch, GQA 1
    (6, 3, 40, 9, 8, 2, 64),      # three prompts (maybe one without branches), GQA 4
    (9, 2, 33, 1, 8, 1, 32),      # MQA, suffix of one token
    (5, 1, 0, 12, 16, 2, 128),    # empty prefix, GQA 8
    (4, 2, 21, 0, 4, 2, 16),      # empty suffix
    (3, 1, 0, 0, 4, 1, 16),       # both empty: o = 0, lse = -inf
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-g{}-p{}-s{}-hq{}-hkv{}-d{}".format(*c))
def test_shared_prefix_matches_float64(backend, path, dtype, case, device="cpu"):
    args = _inputs(*case, dtype, device)
    if path == "auto":
        _check(backend, args, with_groups=case[1] > 1)
    else:
        b, g, p, s = case[:4]
        plan = SharedPrefixPlan(b, p, s, num_prefixes=g, device=device, path=path)
        _check(backend, args, plan=plan)


@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_plan_reused_across_steps(backend, path):
    """One SharedPrefixPlan over several decode steps: lengths grow, groups change, values set on the plan."""
    b, g, p, s, hq, hkv, d = 10, 3, 45, 12, 8, 2, 32
    plan = SharedPrefixPlan(b, p, s, num_prefixes=g, path=path, branch_group=[i % g for i in range(b)],
                            num_heads=(hq, hkv), head_dim=d)
    q, pk, pv, sk, sv, pl, sl, bg = _inputs(b, g, p, s, hq, hkv, d, torch.float32, "cpu")
    for step in range(3):
        sl = torch.clamp(sl + 1, max=s)
        plan.set_lengths(prefix_lens=pl, suffix_lens=sl.tolist())
        if step == 2:
            bg = torch.randint(0, g, (b,))
            plan.set_branch_group(bg)
        q = torch.randn_like(q)
        o, lse = shared_prefix_attention(q, pk, pv, sk, sv, return_lse=True, backend=backend, plan=plan)
        if step < 2:
            bg = torch.tensor([i % g for i in range(b)])
        o_ref, lse_ref = _reference(q, pk, pv, sk, sv, pl, sl, bg, d ** -0.5)
        report_mismatch(f"o step {step}", o, o_ref, *TOLERANCES[torch.float32])
        report_mismatch(f"lse step {step}", lse, lse_ref, *LSE_TOLERANCES[torch.float32])


@pytest.mark.parametrize("path", ("auto", "cascade", "decode"))
@pytest.mark.parametrize("b,g,p,s", [(9, 2, 33, 5), (40, 3, 700, 300), (1, 1, 5000, 0), (4, 4, 0, 9), (0, 1, 8, 8)])
def test_plan_layouts_cover_each_segment_once_per_branch(path, b, g, p, s):
    groups = torch.randint(0, g, (b,))
    plan = SharedPrefixPlan(b, p, s, num_prefixes=g, branch_group=groups, path=path)
    caps = [p] * g + [s] * b
    queries = [torch.nonzero(groups == gi).flatten().tolist() for gi in range(g)] + [[i] for i in range(b)]
    for lay in (plan.layout("split"), plan.layout("fused", 16, 2, 64), plan.layout("fused", 8, 8, 128)):
        check_layout_covers(lay, caps, queries, b)
        assert lay.page_table.tolist() == list(range(g)) + list(range(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults_full_lengths_single_prompt(backend):
    q, pk, pv, sk, sv, _, _, _ = args = _inputs(7, 1, 45, 6, 4, 2, 32, torch.float32, "cpu", lens="full")
    o = shared_prefix_attention(q, pk, pv, sk, sv, backend=backend, sm_scale=0.3)
    o_ref, _ = _reference(*args, 0.3)
    report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_unchecked_lengths_and_groups_are_clamped(backend, path):
    """Index values that skip the host check (CUDA, validate=False) are clamped by the backends."""
    q, pk, pv, sk, sv, _, _, _ = _inputs(4, 2, 20, 5, 4, 2, 16, torch.float32, "cpu")
    plan = SharedPrefixPlan(4, 20, 5, num_prefixes=2, path=path)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    plan.seg_lens.copy_(i32(99, -3, -1, 5, 6, 100))  # what an unchecked device tensor could hold
    plan.branch_group.copy_(i32(0, 7, -2, 1))
    plan.refill_groups()
    o, lse = shared_prefix_attention(q, pk, pv, sk, sv, sm_scale=0.25, return_lse=True, backend=backend, plan=plan)
    o_ref, lse_ref = _reference(q, pk, pv, sk, sv, i32(20, 0), i32(0, 5, 5, 5), i32(0, 1, 0, 1), 0.25)
    report_mismatch("o", o, o_ref, *TOLERANCES[torch.float32])
    report_mismatch("lse", lse, lse_ref, *LSE_TOLERANCES[torch.float32])



def test_capture_misuse_raises(monkeypatch):
    """Inside a CUDA-graph capture (the capture state patched in: no GPU here): a call without plan= raises (its
    cached plan could be evicted and freed while the graph reads it), as do set_lengths / set_branch_group with
    Python ints (copied from a host buffer recycled after the capture); a call with a plan that has run, and values
    in tensors on the plan's device, are taken."""
    import sys

    import o1kernels.plan as plan_module

    spa = sys.modules["o1kernels.shared_prefix_attention"]  # the package exports a function of the same name
    q, pk, pv, sk, sv, pl, sl, bg = _inputs(4, 2, 16, 8, 4, 2, 16, torch.float32, "cpu")
    plan = SharedPrefixPlan(4, 16, 8, num_prefixes=2)
    shared_prefix_attention(q, pk, pv, sk, sv, prefix_lens=pl, suffix_lens=sl, branch_group=bg, plan=plan)
    monkeypatch.setattr(spa, "capturing", lambda device: True)
    monkeypatch.setattr(plan_module, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="needs plan="):
        shared_prefix_attention(q, pk, pv, sk, sv, prefix_lens=pl, suffix_lens=sl, branch_group=bg)
    before = (plan.seg_lens.clone(), plan.branch_group.clone())
    with pytest.raises(RuntimeError, match="suffix_lens: inside a CUDA-graph capture pass an int32/int64 tensor"):
        plan.set_lengths(suffix_lens=[1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="branch_group: inside a CUDA-graph capture"):
        plan.set_branch_group([0, 1, 0, 1])
    assert torch.equal(plan.seg_lens, before[0]) and torch.equal(plan.branch_group, before[1])
    plan.set_lengths(suffix_lens=torch.tensor([1, 2, 3, 4]))
    plan.set_branch_group(torch.tensor([1, 0, 1, 0]))
    _check("auto", (q, pk, pv, sk, sv, pl, torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 1, 0])), plan=plan)

def _sdpa_reference(q, kv_per_branch, sm_scale):
    """Plain SDPA (float64) over each branch's own concatenated K/V; empty K/V -> o = 0."""
    group = q.shape[1] // kv_per_branch[0][0].shape[1]
    outs = []
    for i, (k, v) in enumerate(kv_per_branch):
        if k.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1:], dtype=torch.float64))
            continue
        kh = k.double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, T, D]
        vh = v.double().transpose(0, 1).repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q[i].double().cpu().unsqueeze(1), kh, vh, scale=sm_scale).squeeze(1))
    return torch.stack(outs)


def _two_level_tree(pk, pv, sk, sv, pl, sl, bg, page_size):
    """The same data as a paged pool (pages of all prefixes, then of all suffixes, then shuffled) and a plan."""
    g, p, hkv, d = pk.shape
    b, s = sk.shape[:2]
    pp, sp = -(-p // page_size), -(-s // page_size)

    def pages_of(x, n_pages):  # [n, T, Hkv, D] -> [n * n_pages, page_size, Hkv, D], zero padded
        padded = x.new_zeros(x.shape[0], n_pages * page_size, hkv, d)
        padded[:, : x.shape[1]] = x
        return padded.reshape(-1, page_size, hkv, d)

    k_pages = torch.cat([pages_of(pk, pp), pages_of(sk, sp)])
    v_pages = torch.cat([pages_of(pv, pp), pages_of(sv, sp)])
    perm = torch.randperm(k_pages.shape[0])  # pool slot perm[j] holds page j
    k_cache, v_cache = torch.empty_like(k_pages), torch.empty_like(v_pages)
    k_cache[perm], v_cache[perm] = k_pages, v_pages
    segments = [(perm[gi * pp:(gi + 1) * pp].tolist(), int(pl[gi]), torch.nonzero(bg == gi).flatten().tolist())
                for gi in range(g)]
    segments += [(perm[g * pp + i * sp:g * pp + (i + 1) * sp].tolist(), int(sl[i]), [i]) for i in range(b)]
    return k_cache, v_cache, TreeAttentionPlan(segments, b, page_size, device=pk.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,b,g,p,s,hq,hkv,d", [
    (torch.float32, 64, 1, 97, 17, 16, 4, 64),   # many branches over one prompt, GQA 4
    (torch.bfloat16, 64, 1, 97, 17, 16, 4, 64),
    (torch.float16, 12, 3, 50, 1, 8, 8, 16),     # several prompts, GQA 1
])
def test_tree_equals_shared_prefix_equals_sdpa(backend, dtype, b, g, p, s, hq, hkv, d, device="cpu"):
    q, pk, pv, sk, sv, pl, sl, bg = _inputs(b, g, p, s, hq, hkv, d, dtype, device)
    k_cache, v_cache, plan = _two_level_tree(pk, pv, sk, sv, pl, sl, bg, page_size=16)
    o_tree, lse_tree = tree_attention(q, k_cache, v_cache, plan, return_lse=True, backend=backend)
    o_sp, lse_sp = shared_prefix_attention(q, pk, pv, sk, sv, prefix_lens=pl, suffix_lens=sl, branch_group=bg,
                                           return_lse=True, backend=backend)
    kv = [_branch_kv(pk, pv, sk, sv, pl, sl, bg, i) for i in range(b)]
    o_sdpa = _sdpa_reference(q, kv, d ** -0.5)
    atol, rtol = TOLERANCES[dtype]
    report_mismatch("tree_attention vs SDPA", o_tree, o_sdpa, atol, rtol)
    report_mismatch("shared_prefix_attention vs SDPA", o_sp, o_sdpa, atol, rtol)
    # Both read the same rounded inputs through the same kernels' math: they agree to rounding of o.
    report_mismatch("tree_attention vs shared_prefix_attention", o_tree, o_sp, atol, rtol)
    report_mismatch("lse tree vs shared prefix", lse_tree, lse_sp, *LSE_TOLERANCES[dtype])


# ---- bad input --------------------------------------------------------------------------------------------------

def _good_kwargs():
    q, pk, pv, sk, sv, pl, sl, bg = _inputs(3, 2, 8, 4, 4, 2, 16, torch.float16, "cpu")
    return dict(q=q, prefix_k=pk, prefix_v=pv, suffix_k=sk, suffix_v=sv, prefix_lens=pl, suffix_lens=sl,
                branch_group=bg)


@pytest.mark.parametrize("name,bad,exc,match", [
    ("q", torch.randn(3, 64, dtype=torch.float16), ValueError, "q must have 3 dimensions"),
    ("q", [1.0], TypeError, "q must be a torch.Tensor"),
    ("prefix_k", torch.randn(2, 8, 2, 16), TypeError, r"prefix_k must have q's dtype \(torch.float16\)"),
    ("prefix_v", torch.randn(2, 9, 2, 16, dtype=torch.float16), ValueError, r"prefix_v must have shape \[2, 8, 2, 16\]"),
    ("prefix_k", torch.randn(0, 8, 2, 16, dtype=torch.float16), ValueError, "at least one prefix"),
    ("suffix_k", torch.randn(4, 4, 2, 16, dtype=torch.float16), ValueError, r"suffix_k must have shape \[3, \*, 2, 16\]"),
    ("suffix_v", torch.randn(3, 5, 2, 16, dtype=torch.float16), ValueError, r"suffix_v must have shape \[3, 4, 2, 16\]"),
    ("suffix_v", torch.randn(3, 4, 2, 16, dtype=torch.float16, device="meta"), ValueError, "suffix_v must be on cpu"),
    ("prefix_lens", torch.tensor([1.0, 2.0]), TypeError, "prefix_lens must have dtype"),
    ("prefix_lens", torch.tensor([1, 2, 3]), ValueError, r"prefix_lens must have shape \[2\]"),
    ("prefix_lens", torch.tensor([9, 0]), ValueError, r"prefix_lens values must be in \[0, 8\], got values in \[0, 9\]"),
    ("suffix_lens", torch.tensor([1, -1, 0]), ValueError, r"suffix_lens values must be in \[0, 4\]"),
    ("suffix_lens", torch.tensor([[1, 1, 0]]), ValueError, "suffix_lens must have 1 dimensions"),
    ("branch_group", torch.tensor([0, 2, 1]), ValueError, r"branch_group values must be in \[0, 1\], got values in \[0, 2\]"),
    ("branch_group", None, ValueError, r"branch_group is required when there are several prefixes \(G = 2\)"),
    ("branch_group", torch.tensor([0, 1]), ValueError, r"branch_group must have shape \[3\]"),
])
def test_shared_prefix_rejects_bad_input(name, bad, exc, match):
    kwargs = _good_kwargs()
    kwargs[name] = bad
    with pytest.raises(exc, match=match):
        shared_prefix_attention(**kwargs)


def test_planned_call_rejects_a_plan_of_other_shapes():
    kwargs = _good_kwargs()
    with pytest.raises(ValueError, match=r"plan was built for \(B, G, P, S\) = \(3, 2, 8, 5\), got \(3, 2, 8, 4\)"):
        shared_prefix_attention(**kwargs, plan=SharedPrefixPlan(3, 8, 5, num_prefixes=2))
    with pytest.raises(TypeError, match="plan must be a SharedPrefixPlan"):
        shared_prefix_attention(**kwargs, plan=TreeAttentionPlan([], 3, 4))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: SharedPrefixPlan(-1, 8, 4), ValueError, r"num_branches must be an int in \[0, 2\*\*31 - 1\]"),
    (lambda: SharedPrefixPlan(3, 8, 4, num_prefixes=0), ValueError, r"num_prefixes must be an int in \[1"),
    (lambda: SharedPrefixPlan(3, 2**31, 4), ValueError, "prefix_capacity"),
    (lambda: SharedPrefixPlan(3, 8, 4, num_prefixes=2, branch_group=[0, 2, 1]), ValueError,
     r"branch_group values must be in \[0, 1\], got values in \[0, 2\]"),
    (lambda: SharedPrefixPlan(3, 8, 4, branch_group=[0, 0]), ValueError, "branch_group must have 3 entries"),
    (lambda: SharedPrefixPlan(3, 8, 4).set_lengths(prefix_lens=[9]), ValueError, r"prefix_lens values must be in \[0, 8\]"),
    (lambda: SharedPrefixPlan(3, 8, 4).set_lengths(suffix_lens=torch.tensor([1.0, 2, 3])), TypeError, "suffix_lens must have dtype"),
    (lambda: SharedPrefixPlan(3, 8, 4, device="cpu:x"), ValueError, "device must be a torch device"),
    (lambda: SharedPrefixPlan(3, 8, 4, path="tree"), ValueError, "path must be one of"),
])
def test_shared_prefix_plan_rejects_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_shared_prefix_rejects_bad_heads_and_options():
    kwargs = _good_kwargs()
    kwargs["q"] = torch.randn(3, 3, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"num q heads \(3\) must be a positive multiple of num kv heads \(2\)"):
        shared_prefix_attention(**kwargs)
    with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
        shared_prefix_attention(**_good_kwargs(), sm_scale=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        shared_prefix_attention(**_good_kwargs(), backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        shared_prefix_attention(**_good_kwargs(), backend="cuda")


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_prefix_cuda(dtype):
    for backend in backends_on("cuda"):
        for case in CASES:
            args = _inputs(*case, dtype, "cuda")
            _check(backend, args, with_groups=case[1] > 1)
        test_tree_equals_shared_prefix_equals_sdpa(backend, dtype, 64, 2, 300, 40, 32, 8, 128, device="cuda")
    # validate=True checks CUDA index values on the host
    kwargs = {k: v.cuda() for k, v in _good_kwargs().items()}
    kwargs["suffix_lens"][0] = 5
    with pytest.raises(ValueError, match=r"suffix_lens values must be in \[0, 4\]"):
        shared_prefix_attention(**kwargs, validate=True)

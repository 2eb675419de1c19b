"""The fused CPU kernels (lorakit.kernels): the same outputs as the eager path, the fallback, and bad input."""
import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit import kernels
from lorakit.routing import Routing
from models import gpt2, llama

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def ops():
    """The compiled ops; the tests that need them skip on a machine that cannot build them (no C++ compiler)."""
    try:
        with kernels.using("compiled"):
            return kernels.sgmv()
    except kernels.KernelError as e:
        pytest.skip(f"the kernels cannot be built here: {e}")


@pytest.fixture(scope="module", params=["native", "generic"])
def any_ops(request, ops):
    """The compiled ops, and on AVX2 machines also the generic loops (those AVX-512 and Arm CPUs run)."""
    if request.param == "native":
        return ops
    if not ops.avx2_tiles():
        pytest.skip("the native build runs the generic loops already")
    try:
        return kernels.generic_ops()
    except kernels.KernelError as e:
        pytest.skip(str(e))


def adapted(variants=(("a", "lora", 3), ("b", "lora", 8), ("c", "lora", 20), ("d", "dora", 4)), model=None):
    """A tiny Llama with random (B ≠ 0) adapters of ranks that are and are not multiples of 8."""
    model = model or llama(eos_token_id=None, pad_token_id=0)
    for i, (name, variant, r) in enumerate(variants):
        torch.manual_seed(10 + i)
        lorakit.inject(model, lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant=variant, init_lora_weights=False,
                                                    target_modules="all-linear"), name)
    return model


def routed(model, names, inputs):
    with torch.no_grad(), lorakit.route(model, names):
        return model(inputs).logits


NAMES = ["c", "a", "__base__", "b", "d", "a", "c", "b"]


@pytest.mark.parametrize("names", [NAMES, sorted(NAMES), ["a"] * 8], ids=["shuffled", "grouped", "one adapter"])
def test_fused_equals_eager_and_each_row_alone(ops, names):
    model = adapted()
    ids = torch.randint(0, 128, (8, 5), generator=torch.Generator().manual_seed(0))
    with kernels.using("eager"):
        eager = routed(model, names, ids)
    with kernels.using("compiled"):
        fused = routed(model, names, ids)
        for i, name in enumerate(names[:4]):  # a row alone, through the kernels too
            alone = routed(model, [name], ids[i:i + 1])
            torch.testing.assert_close(fused[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), lorakit.disabled(model):
        base = model(ids).logits
    for i, name in enumerate(names):  # the adapters change every routed row (B ≠ 0), and only those
        assert (name == "__base__") == torch.allclose(fused[i], base[i], atol=1e-6)


def test_kernels_run_and_gpt2_conv1d_matches(ops, monkeypatch):
    calls = counting_shrinks(ops, monkeypatch)
    model = adapted([("a", "lora", 4), ("b", "lora", 12)], model=gpt2())
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(1))
    fused = routed(model, ["b", "a", "__base__", "a"], ids)
    assert calls  # the fused path ran (one shrink per adapted layer)
    monkeypatch.undo()
    with kernels.using("eager"):
        torch.testing.assert_close(fused, routed(model, ["b", "a", "__base__", "a"], ids), atol=1e-5, rtol=1e-5)


def counting_shrinks(ops, monkeypatch) -> list:
    """Make the kernels count shrink calls (the list grows by one per call)."""
    calls, shrink = [], ops.shrink
    counting = SimpleNamespace(shrink=lambda *a: calls.append(1) or shrink(*a), expand=ops.expand,
                               bf16_dot=ops.bf16_dot)
    monkeypatch.setattr(kernels, "sgmv", lambda: counting)
    return calls


def test_layers_fed_the_same_input_share_one_shrink(ops, monkeypatch):
    """q/k/v and gate/up learn on the first pass that they share an input, then shrink once per layer input:
    4 shrinks per decoder layer instead of 7, with the same outputs bit for bit."""
    model = adapted()
    ids = torch.randint(0, 128, (8, 5), generator=torch.Generator().manual_seed(0))
    calls = counting_shrinks(ops, monkeypatch)
    first = routed(model, NAMES, ids)
    layers = model.model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert attn.q_proj._followers == [attn.k_proj, attn.v_proj] and mlp.gate_proj._followers == [mlp.up_proj]
    assert attn.o_proj._followers == [] and mlp.down_proj._followers == []
    learned, calls[:] = len(calls), []
    second = routed(model, NAMES, ids)
    assert learned == 7 * len(layers) and len(calls) == 4 * len(layers)
    assert torch.equal(first, second)
    monkeypatch.undo()
    with kernels.using("eager"):
        torch.testing.assert_close(second, routed(model, NAMES, ids), atol=1e-5, rtol=1e-5)


class TwoHeads(torch.nn.Module):
    """Two projections fed the same input, unless `y` is given (as cross-attention feeds k/v another tensor)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 24), torch.nn.Linear(16, 32)

    def forward(self, x, y=None, bump=False):
        a = self.first(x)
        if bump:
            x.add_(1.0)  # an in-place change between the two calls
        return torch.cat([a, self.second(x if y is None else y)], dim=-1)


@pytest.mark.parametrize("case", ["other tensor", "changed in place", "inference mode"])
def test_a_follower_shrinks_alone_when_its_input_is_not_the_shared_one(ops, case):
    model = TwoHeads()
    for i, name in enumerate("ab"):
        torch.manual_seed(i)
        lorakit.inject(model, lorakit.AdapterConfig(r=4 + 4 * i, init_lora_weights=False,
                                                    target_modules=["first", "second"]), name)
    model.eval()
    x, y = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    names = ["b", "a"]

    def run(kw, mode, grad_mode=torch.no_grad):
        with kernels.using(mode), grad_mode(), lorakit.route(model, names):
            return model(x.clone(), **kw)  # made inside: an inference tensor in inference mode

    run({}, "compiled")  # learns that `second` follows `first`
    assert model.first._followers == [model.second]
    torch.testing.assert_close(run({}, "compiled"), run({}, "eager"), atol=1e-5, rtol=1e-5)  # shared here
    kw = {"other tensor": {"y": y}, "changed in place": {"bump": True}, "inference mode": {}}[case]
    grad_mode = torch.inference_mode if case == "inference mode" else torch.no_grad
    fused = run(kw, "compiled", grad_mode)
    torch.testing.assert_close(fused, run(kw, "eager", grad_mode), atol=1e-5, rtol=1e-5)
    with lorakit.disabled(model), torch.no_grad():
        base = model(x.clone(), **kw)
    assert (fused - base).abs().amax(dim=(1, 2)).min() > 1e-3  # both rows' adapters changed the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_accumulate_in_fp32(ops, dtype):
    """fp32 factors with 16-bit activations: fp32 accumulation, one rounding when `out` is written."""
    g = torch.Generator().manual_seed(7)
    x, out = torch.randn(12, 64, generator=g).to(dtype), torch.randn(12, 48, generator=g).to(dtype)
    a, b = torch.randn(6, 64, generator=g) / 8, torch.randn(48, 6, generator=g) / 4
    bounds, no_order = torch.tensor([0, 12]), torch.empty(0, dtype=torch.long)
    want = out.float() + x.float() @ a.T @ b.T  # fp32 from the same 16-bit inputs
    got = out.clone()
    ops.expand(got, no_order, bounds, ops.shrink(x, no_order, bounds, [kernels.down_factor(a)]), [0],
               [kernels.up_factor(b)], 0)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= 2 * (want.to(dtype).float() - want).abs().max() + 1e-6
    with torch.no_grad(), kernels.using("compiled"):
        assert kernels.uses(x.float()) and not kernels.uses(x.double())
        # half-precision layers use the kernels where the CPU has no GEMM instructions for them
        assert kernels.uses(x.half()) == (not kernels.native_half(torch.float16))
        assert kernels.uses(x.bfloat16()) == (kernels.bf16_dot() or not kernels.native_half(torch.bfloat16))


def test_native_half_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setitem(kernels._state, "flags", frozenset({"avx2", "fma"}))  # an AVX2-only x86 CPU
    assert not kernels.native_half(torch.bfloat16) and not kernels.native_half(torch.float16)
    monkeypatch.setitem(kernels._state, "flags", frozenset({"avx512f", "avx512_bf16"}))
    assert kernels.native_half(torch.bfloat16) and not kernels.native_half(torch.float16)
    monkeypatch.setitem(kernels._state, "flags", frozenset({"amx_bf16", "amx_fp16"}))
    assert kernels.native_half(torch.bfloat16) and kernels.native_half(torch.float16)
    monkeypatch.setitem(kernels._state, "flags", None)  # unreadable: keep the eager half-precision path
    assert kernels.native_half(torch.float16)


@pytest.mark.parametrize("rank", [5, 16, 33])
def test_bf16_pair_layout_matches_fp32_reference(ops, rank):
    """AVX512-BF16 dot products on bf16 factors: within the factors' and the result's bf16 rounding."""
    if not kernels.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16 (bf16 layers keep the eager path)")
    g = torch.Generator().manual_seed(rank)
    x, out = torch.randn(19, 96, generator=g).bfloat16(), torch.randn(19, 48, generator=g).bfloat16()
    a, b = torch.randn(rank, 96, generator=g) / 8, torch.randn(48, rank, generator=g) / 4
    order, bounds = torch.randperm(19, generator=g), torch.tensor([0, 7, 19])
    h = ops.shrink(x, order, bounds, [kernels.down_factor(a, pairs=True), kernels.down_factor(a / 2, pairs=True)])
    got = out.clone()
    ops.expand(got, order, bounds, h, [0, 0], [kernels.up_factor(b, 0.5, pairs=True)] * 2, 0)
    scales = torch.ones(19)
    scales[order[7:]] = 0.5  # the second segment's A is halved
    want = out.float() + 0.5 * scales[:, None] * (x.float() @ a.T @ b.T)
    delta = (want - out.float()).abs().max()
    assert (got.float() - want).abs().max() <= 0.02 * delta + (want.bfloat16().float() - want).abs().max()
    assert (got.float() - out.float()).abs().max() > 0.1 * delta  # the delta was added
    alone = out[order[3]:order[3] + 1].clone()  # and a row alone gets the same bits (single-row tiles)
    ops.expand(alone, torch.empty(0, dtype=torch.long), torch.tensor([0, 1]),
               ops.shrink(x[order[3]:order[3] + 1], torch.empty(0, dtype=torch.long), torch.tensor([0, 1]),
                          [kernels.down_factor(a, pairs=True)]), [0], [kernels.up_factor(b, 0.5, pairs=True)], 0)
    assert torch.equal(alone[0], got[order[3]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_through_the_kernels_close_to_eager(ops, monkeypatch, dtype):
    """bf16 factors in pair layout (AVX512-BF16) or fp32 factors (CPUs without half-precision GEMMs): the
    kernels run for this dtype whatever this CPU is (`native_half` pretends it has no such GEMMs)."""
    model = adapted([("a", "lora", 4), ("b", "lora", 8)]).to(dtype)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(2))
    names = ["b", "a", "a", "__base__"]
    with kernels.using("eager"):
        eager = routed(model, names, ids).float()
    monkeypatch.setattr(kernels, "native_half", lambda dtype: False)
    calls = counting_shrinks(ops, monkeypatch)
    with kernels.using("compiled"):
        fused = routed(model, names, ids).float()
    with torch.no_grad(), lorakit.disabled(model):
        base = model(ids).logits.float()
    assert calls
    assert (fused - eager).abs().max() <= 0.05 * eager.abs().max()
    assert (eager - base)[:3].abs().max() > 0.1  # the adapters matter at this scale


@pytest.mark.parametrize("change", ["in place", "replaced", "scale"])
@pytest.mark.parametrize("which", ["q_proj", "v_proj"], ids=["shrinking layer", "follower"])
def test_updated_weights_are_used_at_the_next_forward(ops, which, change):
    model = adapted([("a", "lora", 4), ("b", "lora", 8)])
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    routed(model, ["a", "b"], ids)  # learns the shared shrinks
    before = routed(model, ["a", "b"], ids)
    layer = getattr(model.model.layers[0].self_attn, which)
    with torch.no_grad():
        if change == "in place":
            layer.adapters["a"].lora_A.mul_(3.0)
        elif change == "replaced":
            layer.adapters["b"].lora_A = torch.nn.Parameter(layer.adapters["b"].lora_A * 2.0)
        else:
            layer.adapters["b"].scale *= 3.0
    after = routed(model, ["a", "b"], ids)
    with kernels.using("eager"):
        torch.testing.assert_close(after, routed(model, ["a", "b"], ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-4)


def test_dropout_in_training_mode_leaves_the_kernels(ops):
    """An adapter switched to training mode with dropout runs its dropout (off the kernels) even under no_grad,
    after forwards in eval mode that cached its kernel factors; back in eval mode it is deterministic again."""
    model = llama(eos_token_id=None, pad_token_id=0)
    for i, name in enumerate("ab"):
        torch.manual_seed(20 + i)
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False,
                                                    target_modules="all-linear"), name)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    model.eval()
    evaluated = routed(model, ["a", "b"], ids)
    torch.testing.assert_close(routed(model, ["a", "b"], ids), evaluated)
    model.train()
    assert not torch.allclose(routed(model, ["a", "b"], ids), routed(model, ["a", "b"], ids))
    model.eval()
    torch.testing.assert_close(routed(model, ["a", "b"], ids), evaluated)


def test_training_keeps_the_autograd_path(ops, monkeypatch):
    monkeypatch.setattr(kernels, "sgmv", lambda: pytest.fail("kernels used while gradients are needed"))
    model = adapted([("a", "lora", 4), ("b", "lora", 8)])
    lorakit.mark_trainable(model, ["a", "b"])
    with lorakit.route(model, ["a", "b"]):
        model(torch.randint(0, 128, (2, 5))).logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["a"].lora_A.grad.abs().sum() > 0


def test_direct_ops_match_a_reference(any_ops):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 24, generator=g)
    a = [torch.randn(r, 24, generator=g) for r in (5, 16)]
    b = [torch.randn(12, r, generator=g) for r in (5, 16)]
    order = torch.tensor([7, 1, 3, 9, 0, 4], dtype=torch.long)
    bounds = torch.tensor([0, 2, 6], dtype=torch.long)
    h = any_ops.shrink(x, order, bounds, [kernels.down_factor(m) for m in a])
    out = torch.randn(10, 20, generator=g)
    ref = out.clone()
    any_ops.expand(out, order, bounds, h, [0, 0], [kernels.up_factor(m, 0.5) for m in b], 8)
    for (lo, hi), am, bm in zip([(0, 2), (2, 6)], a, b):
        rows = order[lo:hi]
        ref[rows, 8:20] += 0.5 * x[rows] @ am.T @ bm.T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_out", [300, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_ops_match_a_reference_at_tile_sizes(any_ops, dtype, d_out):
    """Segments of 1..31 rows (single rows and segments of a few rows that stream, partial and full row tiles),
    ranks that fill one, several or part of a register tile, and 300 or 1100 output columns (several column groups
    and streamed chunks, full blocks and a ragged tail), against fp64."""
    g = torch.Generator().manual_seed(6)
    ranks, sizes = (1, 8, 24, 40, 16), (1, 4, 5, 13, 31)
    x = torch.randn(60, 72, generator=g)
    a = [torch.randn(r, 72, generator=g) / 8 for r in ranks]
    b = [torch.randn(d_out, r, generator=g) / 4 for r in ranks]
    order = torch.randperm(60, generator=g)[:sum(sizes)].contiguous()
    bounds = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.long)
    out = torch.randn(60, d_out + 10, generator=g)
    ref = out.double()
    for lo, hi, am, bm in zip(bounds[:-1], bounds[1:], a, b):
        rows = order[lo:hi]
        ref[rows, 10:] += 0.5 * x[rows].double() @ am.T.double() @ bm.T.double()
    out = out.to(dtype)
    h = any_ops.shrink(x.to(dtype), order, bounds, [kernels.down_factor(m) for m in a])
    any_ops.expand(out, order, bounds, h, [0] * len(ranks), [kernels.up_factor(m, 0.5) for m in b], 10)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16_bit_factors_give_the_bits_of_their_fp32_copies(any_ops, dtype, factor_dtype):
    """bf16 / fp16 factors (half the bytes) are widened exactly as they are read: the same bits as the kernels on
    fp32 copies of them, at tile sizes (single rows, partial and full tiles, ragged columns), mixed with an fp32
    factor in the same call."""
    g = torch.Generator().manual_seed(7)
    ranks, sizes = (8, 24, 3), (1, 13, 31)
    x = torch.randn(60, 72, generator=g).to(dtype)
    a = [(torch.randn(r, 72, generator=g) / 8).to(factor_dtype) for r in ranks]
    b = [(torch.randn(300, r, generator=g) / 4).to(factor_dtype) for r in ranks]
    order = torch.randperm(60, generator=g)[:sum(sizes)].contiguous()
    bounds = torch.tensor([0, 1, 14, 45], dtype=torch.long)
    out0 = torch.randn(60, 310, generator=g).to(dtype)

    def run(downs, ups):
        out = out0.clone()
        any_ops.expand(out, order, bounds, any_ops.shrink(x, order, bounds, downs), [0] * 3, ups, 10)
        return out

    downs, ups = [kernels.down_factor(m) for m in a], [kernels.up_factor(m) for m in b]
    assert [d.dtype for d in downs] == [factor_dtype] * 3 and [u.dtype for u in ups] == [factor_dtype] * 3
    assert kernels.up_factor(b[0], 0.5).dtype == torch.float32  # a scale would round: folded in fp32
    downs[2], ups[2] = downs[2].float(), ups[2].float()  # one segment on fp32 factors
    got = run(downs, ups)
    assert torch.equal(got, run([d.float() for d in downs], [u.float() for u in ups]))
    assert (got.double() - out0.double()).abs().amax() > 0.1  # the adapters did change the rows


def test_up_factor_reads_b_in_place_when_nothing_changes():
    bt = torch.randn(4, 32)  # (s·B)ᵀ as the server keeps it
    assert kernels.up_factor(bt.T).data_ptr() == bt.data_ptr()
    assert kernels.up_factor(bt.T, 0.5).data_ptr() != bt.data_ptr()


@pytest.mark.parametrize("bad", ["order", "bounds", "factor", "columns"])
def test_direct_ops_refuse_bad_input(any_ops, bad):
    x, out = torch.randn(4, 8), torch.zeros(4, 8)
    order, bounds = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4])
    at, bt, c0 = [kernels.down_factor(torch.randn(2, 8))], [kernels.up_factor(torch.randn(8, 2))], 0
    if bad == "order":
        order = torch.tensor([0, 1, 2, 9])
    elif bad == "bounds":
        bounds = torch.tensor([0, 5])
    elif bad == "factor":
        at = [torch.randn(8, 3)]  # not padded to a multiple of 8
    else:
        c0 = 4
    before = out.clone()
    with pytest.raises(RuntimeError):
        h = any_ops.shrink(x, order, bounds, at)
        any_ops.expand(out, order, bounds, h, [0], bt, c0)
    assert torch.equal(out, before)


def test_token_layout_covers_the_flattened_tokens():
    plan = Routing(["b", "a", "__base__", "a"]).plan(4, torch.device("cpu"))
    order, bounds = plan.token_layout(3)
    assert bounds.tolist() == [0, 3, 9]  # b (1 row) first: rows are gathered anyway, so sorted by size
    rows = {name: order[lo:hi].tolist() for (name, _, _), lo, hi in zip(plan.segments, bounds[:-1], bounds[1:])}
    assert rows == {"a": [3, 4, 5, 9, 10, 11], "b": [0, 1, 2]}


def test_modes_and_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_KERNELS", "eager")
    assert kernels.sgmv() is None and not kernels.uses(torch.zeros(1))
    monkeypatch.setenv("LORAKIT_KERNELS", "fast")
    with pytest.raises(kernels.KernelError, match="fast"):
        kernels.sgmv()
    with pytest.raises(kernels.KernelError):
        with kernels.using("fast"):
            pass
    # no compiler: auto warns once and falls back (same outputs, eager path); compiled refuses
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("LORAKIT_KERNELS", "auto")
    kernels.reset()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            assert kernels.sgmv() is None
        model = adapted([("a", "lora", 4)])
        ids = torch.randint(0, 128, (2, 5))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every layer
            assert routed(model, ["a", "__base__"], ids).shape == (2, 5, 128)
        monkeypatch.setenv("LORAKIT_KERNELS", "compiled")
        with pytest.raises(kernels.KernelError, match="no-such-compiler"):
            kernels.sgmv()
    finally:
        kernels.reset()


@pytest.mark.parametrize("d_in, d_out, ranks", [(40, 36, (3, 12)), (40, 300, (3, 12)), (130, 300, (20, 70)),
                                                (130, 1100, (20, 70))])
def test_a_rows_result_does_not_depend_on_its_batch(any_ops, d_in, d_out, ranks):
    """Bitwise: one row alone, and the same row at every position of batches of other rows and adapters (single
    rows, segments of a few rows and tiles take different loops: wide and narrow ranks, full and ragged column
    blocks and streamed chunks, one or several blocks of inputs)."""
    g = torch.Generator().manual_seed(5)
    x, out0 = torch.randn(19, d_in, generator=g), torch.randn(19, d_out, generator=g)
    at = [kernels.down_factor(torch.randn(r, d_in, generator=g)) for r in ranks]
    bt = [kernels.up_factor(torch.randn(d_out, r, generator=g)) for r in ranks]

    def lora(rows, adapter_of):  # rows of x through their adapters, grouped by adapter as a server lays them out
        order = torch.tensor(sorted(rows, key=adapter_of), dtype=torch.long)
        counts = [sum(adapter_of(r) == k for r in rows) for k in (0, 1)]
        bounds = torch.tensor([0, counts[0], counts[0] + counts[1]], dtype=torch.long)
        out = out0.clone()
        h = any_ops.shrink(x, order, bounds, at)
        any_ops.expand(out, order, bounds, h, [0, 0], bt, 0)
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # alone on one thread, the batches below on all of them
    try:
        alone = lora([7], lambda r: 1)[7]
    finally:
        torch.set_num_threads(threads)
    for batch in ([7, 1, 2], list(range(19)), [3, 5, 7, 9, 11, 13, 15, 17, 18], [2, 7, 9, 18, 4]):
        got = lora(batch, lambda r: 1 if r in (7, 2, 9, 18) or r > 10 else 0)
        assert torch.equal(got[7], alone)

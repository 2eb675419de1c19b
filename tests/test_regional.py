"""Regional multi-LoRA composition (`lorakit.compose.regional`): RegionGate per-token weights, LoRA-Composer's
attention hooks and latent re-initialisation, CLoRA's attention masks and fusion, on a seeded tiny UNet in float64.
Attention maps of a random UNet are noise: the tests check invariants, not images."""
import contextlib

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor

import lorakit
from lorakit.compose.diffusion import Composite, add_random_loras, embed, sample, tiny_text_encoder, tiny_unet
from lorakit.compose.regional import (CLoRA, PLAIN, LoRAComposer, Region, RegionGate, box_cells, clora_masks, fuse,
                                      morph, nt_xent, reinitialise)
from lorakit.errors import ConfigError, RoutingError
from lorakit.layers import AdaptedLayer
from unets import prompt_batch, unet_with

pytestmark = pytest.mark.usefixtures("one_thread_module")
NAMES = ["a", "b"]
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def unet():
    return unet_with(NAMES)


@pytest.fixture(scope="module")
def prompts():
    """(latents, cond, uncond) for a batch of 2, float64."""
    return prompt_batch()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@contextlib.contextmanager
def active(model, names):
    before = lorakit.active_adapters(model)
    lorakit.set_active(model, names)
    try:
        yield
    finally:
        lorakit.set_active(model, before)


@contextlib.contextmanager
def adapted_calls(model):
    """Every adapted layer's call: (path, layer, input, output), copied."""
    calls, handles = [], []
    for path, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, path=path: calls.append((path, mod, args[0].clone(), out.clone()))))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].clone()), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def run(unet, prompts, steps, schedule=None, latents=None):
    z, cond, uncond = prompts
    trajectory = []
    out = sample(unet, DDIMScheduler(), z if latents is None else latents, cond, uncond, steps, GUIDANCE, schedule,
                 callback=lambda i, t, lat: trajectory.append(lat))
    return out, trajectory


def ddim_step(scheduler, eps, t, latents):
    u, c = eps.chunk(2)
    return scheduler.step(u + GUIDANCE * (c - u), t, latents, return_dict=False)[0]


def first_step(prompts, steps=3):
    latents, cond, uncond = prompts
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[0]
    return scheduler, t, torch.cat([latents, latents]), torch.cat([uncond, cond])


def attention(unet, block, which):
    blocks = {"down": unet.down_blocks[0].attentions[0], "up": unet.up_blocks[1].attentions[1]}
    return getattr(blocks[block].transformer_blocks[0], which)


# ---- RegionGate --------------------------------------------------------------------------------
def test_region_gate_each_adapter_acts_on_its_region_only_in_every_layer(unet, prompts):
    """Non-square latent (8×12 → 4×6 in the mid block), per-sample masks tiled over the CFG batch: in every adapted
    layer, tokens outside both regions are the base output bit for bit, tokens of region j are adapter j alone, and
    cross-attention K/V (prompt tokens) are base."""
    _, cond, uncond = prompts
    latents = randn(2, 4, 8, 12, seed=3)
    mask_a = torch.zeros(2, 8, 12, dtype=torch.bool)
    mask_a[0, :4, :6], mask_a[1, 4:, 6:] = True, True  # differs per sample
    gate = RegionGate(NAMES, {"a": mask_a, "b": [0.0, 0.5, 0.5, 1.0]})
    box_b = {(8, 12): (slice(0, 4), slice(6, 12)), (4, 6): (slice(0, 2), slice(3, 6))}
    x, emb = torch.cat([latents, latents]), torch.cat([uncond, cond])
    with adapted_calls(unet) as calls, gate.route(unet):
        unet(x, 500, encoder_hidden_states=emb)
    grids, text = set(), 0
    for path, layer, inp, out in calls:
        base = layer.base_layer(inp)
        if path.endswith(("attn2.to_k", "attn2.to_v")):
            assert torch.equal(out, base), path
            text += 1
            continue
        h = {96: 8, 24: 4}[inp.shape[1]]  # 96 tokens per row: 8×12; 24: 4×6
        w = inp.shape[1] // h
        grids.add((h, w))
        in_a = mask_a[:, :: 8 // h, :: 12 // w].repeat(2, 1, 1).reshape(4, -1)  # nearest: every (8/h)-th cell
        in_b = torch.zeros(4, h, w, dtype=torch.bool)
        in_b[:, box_b[h, w][0], box_b[h, w][1]] = True
        in_b = in_b.reshape(4, -1)
        assert not (in_a & in_b).any()
        outside = ~(in_a | in_b)
        assert torch.equal(out[outside], base[outside]), path
        for name, inside in (("a", in_a), ("b", in_b)):
            with active(unet, [name]):
                alone = layer(inp)
            # the adapter alone fuses its add into one addmm; the gate adds w·delta: equal up to rounding
            torch.testing.assert_close(out[inside], alone[inside], rtol=0, atol=1e-12, msg=(path, name))
            assert (alone[inside] - base[inside]).abs().max() > 1e-3  # the adapter changes its region
    assert grids == {(8, 12), (4, 6)} and text == 8


def test_region_gate_covering_everything_is_that_adapter_alone():
    """LoRAs on pixel-token projections only (the gate leaves cross-attention K/V at base): one region over the whole
    latent, as a box or as a mask, gives the UNet with that adapter alone; a mask of zeros, the base UNet exactly."""
    pix = add_random_loras(tiny_unet().double(), NAMES, targets=["to_q", "to_out.0", "attn1.to_k", "attn1.to_v"])
    x, emb = randn(4, 4, 8, 8, seed=4), randn(4, 16, 32, seed=5)
    with active(pix, ["a"]):
        want = pix(x, 300, encoder_hidden_states=emb)[0]
    with lorakit.disabled(pix):
        base = pix(x, 300, encoder_hidden_states=emb)[0]
    assert (want - base).abs().max() > 1e-3
    for region in ([0, 0, 1, 1], torch.ones(8, 8)):
        gate = RegionGate(["a"], [region])
        with gate.route(pix):  # (alone, the adapter's add is fused into one addmm: equal up to rounding)
            torch.testing.assert_close(pix(x, 300, encoder_hidden_states=emb)[0], want, rtol=0, atol=1e-11)
    nowhere = RegionGate(["a"], [torch.zeros(2, 8, 8)])
    with nowhere.route(pix):
        assert torch.equal(pix(x, 300, encoder_hidden_states=emb)[0], base)


# ---- LoRA-Composer: isolation ------------------------------------------------------------------
BOXES = {"a": [0.0, 0.0, 0.5, 0.5], "b": [0.25, 0.5, 0.75, 1.0], "a2": [0.375, 0.25, 0.625, 0.5]}
CELLS = {"a": (0, 0, 4, 4), "b": (2, 4, 6, 8), "a2": (3, 2, 5, 4)}  # on the 8×8 grid; a2 overlaps a at (3, 2..3)


def cell_mask(t, left, b, r, h=8, w=8):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[t:b, left:r] = True
    return m.reshape(-1)


def composer_regions(embs=None):
    embs = embs or {}
    return [Region(n[0], BOXES[n], embs.get(n)) for n in ("a", "b", "a2")]


def test_box_cells_follow_the_reference_rounding():
    assert [box_cells(BOXES[n], 8, 8) for n in ("a", "b", "a2")] == [CELLS[n] for n in ("a", "b", "a2")]
    assert box_cells([0.3, 0.1, 0.7, 0.9], 10, 10) == (3, 1, 7, 9)  # 0.3·10 is 3.0000000000000004: still 3
    assert box_cells([0.1, 0.1, 0.2, 0.2], 4, 4) == (1, 1, 1, 1)  # empty on a coarse grid


def test_concept_isolation_zeroes_attention_between_boxes(unet):
    attn = attention(unet, "down", "attn1")
    hidden = randn(2, 64, 32, seed=6)
    probs = {}
    capture = (lambda key: lambda path, kind, p: probs.setdefault(key, p))
    with LoRAComposer(composer_regions(), watch=capture("masked")).installed(unet):
        attn(hidden)
    with LoRAComposer(composer_regions(), isolation=False, watch=capture("free")).installed(unet):
        attn(hidden)
    masked, free = (probs[k].view(2, attn.heads, 64, 64) for k in ("masked", "free"))
    boxes = {n: cell_mask(*CELLS[n]) for n in CELLS}
    blocked = torch.zeros(64, 64, dtype=torch.bool)
    for k in boxes:
        for j in boxes:
            if k != j:
                blocked |= boxes[k][:, None] & boxes[j][None, :]
    assert blocked.sum() > 0
    assert torch.equal(masked[..., blocked], torch.zeros_like(masked[..., blocked]))  # exactly 0
    assert (free[..., blocked] > 0).all()
    background = ~(boxes["a"] | boxes["b"] | boxes["a2"])
    assert torch.equal(masked[:, :, background], free[:, :, background])  # background queries unrestricted
    only_b = boxes["b"] & ~boxes["a"] & ~boxes["a2"]
    allowed = masked[:, :, only_b][..., ~blocked[only_b].any(0)]
    assert (allowed > 0).all()  # own box and background stay open
    overlap = boxes["a"] & boxes["a2"]  # in two boxes: blocked from keys in either, only background left
    assert torch.equal(masked[:, :, overlap][..., ~background], torch.zeros(2, attn.heads, 2, 64 - background.sum()))
    torch.testing.assert_close(masked.sum(-1), torch.ones(2, attn.heads, 64, dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_without_boxes_the_processors_are_diffusers_default(unet, prompts):
    empty = LoRAComposer([])
    hidden, ctx = randn(2, 64, 32, seed=7), randn(2, 16, 32, seed=8)
    for which, args in (("attn1", (hidden,)), ("attn2", (hidden, ctx))):
        attn = attention(unet, "down", which)
        with empty.installed(unet):
            got = attn(*args)
        default = attn.processor
        attn.set_processor(AttnProcessor())
        try:
            with lorakit.disabled(unet):
                want = attn(*args)
        finally:
            attn.set_processor(default)
        assert torch.equal(got, want), which  # the same computation as AttnProcessor, bit for bit
    _, t, x, emb = first_step(prompts)
    with empty.installed(unet):
        got = unet(x, t, encoder_hidden_states=emb)[0]
    with lorakit.disabled(unet):
        want = unet(x, t, encoder_hidden_states=emb)[0]  # AttnProcessor2_0 (scaled_dot_product_attention)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())  # restored


# ---- LoRA-Composer: injection ------------------------------------------------------------------
def test_concept_injection_outside_is_base_inside_is_the_concepts_lora_attention(unet):
    """Region a has its own prompt, b reads the global one, a2 (adapter a, its own prompt) overlaps a: inside,
    attention with base Q and each concept's LoRA K, V, to_out, averaged where boxes overlap."""
    attn = attention(unet, "up", "attn2")
    hidden, ctx = randn(4, 64, 32, seed=9), randn(4, 16, 32, seed=10)
    embs = {"a": randn(4, 16, 32, seed=11), "a2": randn(2, 12, 32, seed=12)}  # a2: 2 rows tiled over 4, 12 tokens
    with LoRAComposer(composer_regions(embs)).installed(unet):
        got = attn(hidden, ctx)
    default = attn.processor
    attn.set_processor(AttnProcessor())
    try:
        with lorakit.disabled(unet):
            base = attn(hidden, ctx)
    finally:
        attn.set_processor(default)

    def by_hand(name, emb):
        with active(unet, [name]):
            q = attn.to_q.base_layer(hidden).view(4, 64, attn.heads, -1).transpose(1, 2)
            k = attn.to_k(emb).view(4, emb.shape[1], attn.heads, -1).transpose(1, 2)
            v = attn.to_v(emb).view(4, emb.shape[1], attn.heads, -1).transpose(1, 2)
            o = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
            return attn.to_out[0](o.transpose(1, 2).reshape(4, 64, -1))

    each = {"a": by_hand("a", embs["a"]), "b": by_hand("b", ctx), "a2": by_hand("a", embs["a2"].repeat(2, 1, 1))}
    boxes = {n: cell_mask(*CELLS[n]) for n in CELLS}
    outside = ~(boxes["a"] | boxes["b"] | boxes["a2"])
    assert torch.equal(got[:, outside], base[:, outside])
    for name, own in (("a", boxes["a"] & ~boxes["a2"]), ("b", boxes["b"]), ("a2", boxes["a2"] & ~boxes["a"])):
        torch.testing.assert_close(got[:, own], each[name][:, own], rtol=0, atol=1e-12)
        assert (got[:, own] - base[:, own]).abs().max() > 1e-3
    both = boxes["a"] & boxes["a2"]
    torch.testing.assert_close(got[:, both], (each["a"][:, both] + each["a2"][:, both]) / 2, rtol=0, atol=1e-12)


def test_one_box_over_everything_is_sampling_with_the_lora_on_cross_attention():
    """With LoRAs on cross-attention K, V, out only, one box over the whole latent reading the global prompt is the
    model with that LoRA active: LoRA-Composer runs the LoRA nowhere else."""
    kv = add_random_loras(tiny_unet().double(), NAMES, targets=["attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
    encoder = tiny_text_encoder()
    cond = embed(encoder, torch.randint(1, 98, (1, 16), generator=torch.Generator().manual_seed(13))).double()
    uncond = embed(encoder, torch.zeros(1, 16, dtype=torch.long)).double()
    small = (randn(1, 4, 8, 8, seed=14), cond, uncond)
    with active(kv, ["b"]):
        want, _ = run(kv, small, 3)
    with lorakit.disabled(kv):
        base, _ = run(kv, small, 3)
    schedule = LoRAComposer([Region("b", [0, 0, 1, 1])])
    got, _ = run(kv, small, 3, schedule)
    assert schedule.passes == 3 and (want - base).abs().max() > 1e-3
    # bmm softmax vs scaled_dot_product_attention: ~1e-16 per pass, grown by the random UNet over 3 steps
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


# ---- LoRA-Composer: latent re-initialisation ---------------------------------------------------
def test_reinitialise_copies_the_best_window_into_the_box_and_restores_mean_and_std():
    latents = randn(2, 4, 8, 8, seed=15) * 1.7 + 0.3
    maps = torch.rand(2, 4, 4, 5, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * 0.1
    maps[0, 2:4, 0:2, 2] += 1.0  # sample 0: token 2 peaks in the window at (2, 0)
    maps[1, 1:3, 1:3, 3] += 0.6  # sample 1: tokens 2 + 3 peak at (1, 1)
    maps[1, 1:3, 1:3, 2] += 0.6
    boxes, tokens = [[0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.25]], [[2, 3], []]  # concept 1: no tokens, not moved
    out = reinitialise(latents, [maps, maps * 0], boxes, tokens)
    want = latents.clone()
    want[0, :, 0:4, 4:8] = latents[0, :, 4:8, 0:4]  # window (2, 0) on the 4×4 grid → latent rows 4-7, cols 0-3
    want[1, :, 0:4, 4:8] = latents[1, :, 2:6, 2:6]
    for s in range(2):
        w = want[s]
        torch.testing.assert_close(out[s], (w - w.mean()) / w.std() * latents[s].std() + latents[s].mean(),
                                   rtol=0, atol=1e-12)
        assert abs(out[s].mean() - latents[s].mean()) < 1e-6 and abs(out[s].std() - latents[s].std()) < 1e-6
    assert not torch.allclose(want, latents)


def test_composer_reinit_pass_moves_the_latents_before_the_first_step(unet, prompts):
    latents, cond, _ = prompts
    regions = [Region("a", [0.0, 0.0, 0.5, 0.5], tokens=[2, 3]), Region("b", [0.5, 0.5, 1.0, 1.0], cond, [5])]
    schedule = LoRAComposer(regions, reinit=True, downscale=2)
    with forwards(unet) as calls:
        run(unet, prompts, 3, schedule)
    assert len(calls) == schedule.passes == 4  # the t₀ pass, then one per step
    assert torch.equal(calls[0], torch.cat([latents, latents]))
    assert [m.shape for m in schedule.maps] == [(2, 4, 4, 16)] * 2
    torch.testing.assert_close(schedule.maps[0].sum(-1), torch.ones(2, 4, 4, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    moved = reinitialise(latents, schedule.maps, [r.box for r in regions], [r.tokens for r in regions])
    assert torch.equal(calls[1], torch.cat([moved, moved])) and not torch.allclose(moved, latents)


# ---- CLoRA -------------------------------------------------------------------------------------
def test_clora_with_one_lora_and_no_plain_prompt_is_plain_sampling_with_it(unet, prompts):
    with active(unet, ["b"]):
        want, _ = run(unet, prompts, 4)
    with lorakit.disabled(unet):
        base, _ = run(unet, prompts, 4)
    assert (want - base).abs().max() > 1e-3
    schedule = CLoRA(["b"], mask_tokens={"b": [2, 3]}, plain=False, downscale=2)
    got, _ = run(unet, prompts, 4, schedule)
    assert torch.equal(got, want) and schedule.passes == 4
    # b's threshold mask covers part of the latent; the rest takes the mean of the one prediction: weight 1 everywhere
    assert torch.equal(schedule.masks, torch.ones(1, 2, 8, 8, dtype=torch.float64))


def test_fuse_with_identical_masks_is_the_mean_and_a_clora_without_masks_is_lora_composite(unet, prompts):
    eps = [randn(4, 4, 8, 8, seed=s) for s in (20, 21, 22)]
    same = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(23), dtype=torch.float64) + 0.5
    torch.testing.assert_close(fuse(eps, same.repeat(3, 1, 1, 1)), torch.stack(eps).mean(0), rtol=0, atol=1e-12)
    assert torch.equal(fuse(eps, None), torch.stack(eps).mean(0))
    masks = torch.zeros(3, 2, 8, 8, dtype=torch.float64)
    masks[0, 0], masks[1, 1], masks[2, :, :4] = 1, 1, 1
    fused = fuse(eps, masks)  # per sample, both CFG halves (rows b and b + 2)
    for row in range(4):
        s = row % 2
        want = sum(masks[p, s] * eps[p][row] for p in range(3)) / masks[:, s].sum(0)
        torch.testing.assert_close(fused[row], want, rtol=0, atol=1e-12)
    # no mask tokens, no plain prompt: every mask is all ones → the mean of each LoRA's prediction (LoRA Composite)
    got, _ = run(unet, prompts, 3, CLoRA(NAMES, plain=False, downscale=2))
    want, _ = run(unet, prompts, 3, Composite(NAMES))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_mask_morphology_matches_3x3_neighbourhoods_with_opencv_borders():
    """erode = min over the in-grid 3×3 neighbours, dilate = max (outside the grid counts as neither); open = erode
    then dilate, close = dilate then erode; clora_masks applies it at the maps' resolution before upsampling."""
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(2, 6, 7, generator=g) > 0.45).float()

    def by_hand(x, pick):
        out = torch.empty_like(x)
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                for j in range(x.shape[2]):
                    out[b, i, j] = pick(x[b, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2])
        return out
    erode, dilate = by_hand(m, torch.min), by_hand(m, torch.max)
    assert torch.equal(morph(m, "erode"), erode) and torch.equal(morph(m, "dilate"), dilate)
    assert torch.equal(morph(m, "open"), by_hand(erode, torch.max))
    assert torch.equal(morph(m, "close"), by_hand(dilate, torch.min))
    assert torch.equal(morph(m, None), m) and not torch.equal(erode, m) and not torch.equal(dilate, m)
    assert torch.equal(morph(torch.ones(1, 3, 3), "erode"), torch.ones(1, 3, 3))  # the border is not eaten
    maps = [torch.rand(2, 6, 7, 4, generator=g) for _ in range(2)]
    plain, opened = clora_masks(maps, [[], [1]], (12, 14)), clora_masks(maps, [[], [1]], (12, 14), morphology="open")
    want = morph(plain[1, :, ::2, ::2], "open")
    assert torch.equal(opened[1, :, ::2, ::2], want) and torch.equal(opened[0], 1 - opened[1])
    with pytest.raises(ConfigError, match="morphology"):
        morph(m, "blur")
    with pytest.raises(ConfigError, match="morphology"):
        CLoRA(["a"], morphology="blur")


def test_clora_masks_partition_the_latent_and_fuse_each_prompts_prediction(unet, prompts):
    """Maps are the cross-attention probabilities at latent/2 averaged over layers, heads and CFG halves (checked
    against probabilities captured by another processor); the plain prompt's mask is the complement of the LoRA
    masks; step 0 is the masked fusion of each prompt's prediction with its LoRA alone."""
    latents, cond, uncond = prompts
    own = torch.cat([uncond, randn(2, 16, 32, seed=24)])
    schedule = CLoRA(NAMES, prompts={"b": own}, mask_tokens={"a": [2, 3], "b": [5]}, alpha=0.3, downscale=2)
    scheduler, t, x, emb = first_step(prompts)
    schedule.start(unet, list(scheduler.timesteps))
    eps, maps = schedule.passes_with_maps(unet, x, t, emb, 2)
    for key, m, e_in in ((PLAIN, maps[0], emb), ("a", maps[1], emb), ("b", maps[2], own)):
        captured = []
        keep = (lambda path, kind, p: captured.append(p) if (kind, p.shape[1]) == ("cross", 16) else None)
        watch = LoRAComposer([], watch=keep)
        with watch.installed(unet, base=False), active(unet, [] if key == PLAIN else [key]):
            unet(x, t, encoder_hidden_states=e_in)
        want = torch.stack([p.view(4, 8, 16, 16).mean(1) for p in captured]).mean(0).view(2, 2, 4, 4, 16).mean(0)
        assert len(captured) == 1  # the mid block is the only cross-attention at 4×4
        torch.testing.assert_close(m, want, rtol=0, atol=1e-12)
    masks = clora_masks(maps, [[], [2, 3], [5]], (8, 8), 0.3)
    union = (masks[1] + masks[2]).clamp(max=1)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks[0], 1 - union) and (masks.sum(0) >= 1).all()
    assert 0 < masks[1].sum() < masks[1].numel() and 0 < masks[2].sum() < masks[2].numel()
    for p, toks in ((1, [2, 3]), (2, [5])):  # by hand: union over tokens of A > α·max, nearest-upsampled ×2
        for s in range(2):
            m = torch.zeros(4, 4, dtype=torch.bool)
            for tok in toks:
                m |= maps[p][s, ..., tok] > 0.3 * maps[p][s, ..., tok].max()
            assert torch.equal(masks[p][s].bool(), m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    with active(unet, []):
        plain = unet(x, t, encoder_hidden_states=emb)[0]
    with active(unet, ["a"]):
        eps_a = unet(x, t, encoder_hidden_states=emb)[0]
    with active(unet, ["b"]):
        eps_b = unet(x, t, encoder_hidden_states=own)[0]
    for got, want in zip(eps, (plain, eps_a, eps_b)):
        assert torch.equal(got, want)  # recording leaves each pass's output unchanged
    _, trajectory = run(unet, prompts, 3, schedule)
    assert schedule.passes == 9
    torch.testing.assert_close(trajectory[0], ddim_step(scheduler, fuse([plain, eps_a, eps_b], masks), t, latents),
                               rtol=0, atol=1e-12)


def test_nt_xent_matches_its_formula_and_the_contrastive_update_lowers_it(unet, prompts):
    e = randn(4, 6, seed=25)
    labels = torch.tensor([0, 0, 1, 1])
    z = torch.nn.functional.normalize(e, dim=1)
    s = z @ z.T / 0.5
    want = []
    for a in range(4):
        for p in range(4):
            if a != p and labels[a] == labels[p]:
                neg = s[a][labels != labels[a]]
                want.append(-torch.log(s[a, p].exp() / (s[a, p].exp() + neg.exp().sum())))
    torch.testing.assert_close(nt_xent(e, labels, 0.5), torch.stack(want).mean(), rtol=0, atol=1e-12)
    assert nt_xent(e, torch.tensor([0, 1, 2, 3])) == 0
    contrast = [{PLAIN: [2], "a": [2]}, {PLAIN: [5], "b": [5]}]
    schedule = CLoRA(NAMES, mask_tokens={"a": [2], "b": [5]}, downscale=2, contrast=contrast, step_size=1e-3,
                     max_iter=1)
    latents, _, _ = prompts
    scheduler, t, x, emb = first_step(prompts)
    schedule.start(unet, list(scheduler.timesteps))
    before = schedule.loss(schedule.passes_with_maps(unet, x, t, emb, 2)[1])
    moved = schedule.update(unet, scheduler, latents, t, emb, 0)
    after = schedule.loss(schedule.passes_with_maps(unet, torch.cat([moved, moved]), t, emb, 2)[1])
    assert before > 0 and 0 < (latents - moved).abs().max() < 1e-2 and after < before
    with forwards(unet) as calls:
        run(unet, prompts, 3, schedule)
    assert len(calls) == schedule.passes == 9  # step 0: 3 passes in the update, reused by the prediction


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_step(unet, prompts):
    latents, cond, uncond = prompts
    for build in (lambda: RegionGate(NAMES, [[0, 0, 1.2, 1], [0, 0, 1, 1]]),
                  lambda: RegionGate(NAMES, [[0.5, 0, 0.5, 1], [0, 0, 1, 1]]),
                  lambda: RegionGate(NAMES, [[0, 0, 1, 1]]),
                  lambda: RegionGate(NAMES, [torch.ones(2, 8, 8), torch.ones(1, 8, 8)]),
                  lambda: RegionGate(NAMES, [torch.ones(8, 8) * 2, [0, 0, 1, 1]]),
                  lambda: RegionGate(NAMES, {"a": [0, 0, 1, 1]}),
                  lambda: LoRAComposer([Region("a", [-0.1, 0, 0.5, 0.5])]),
                  lambda: LoRAComposer([Region("a", [0, 0, 0.5])]),
                  lambda: LoRAComposer([Region("a", [0, 0, 1, 1], emb=torch.ones(16, 32))]),
                  lambda: LoRAComposer([Region("a", [0, 0, 1, 1])], reinit=True),
                  lambda: LoRAComposer([Region("a", [0, 0, 1, 1], tokens=[-1])]),
                  lambda: LoRAComposer([Region("a", [0, 0, 1, 1])], downscale=3),
                  lambda: CLoRA(NAMES, alpha=1.5), lambda: CLoRA(NAMES, mask_tokens={"zz": [1]}),
                  lambda: CLoRA(NAMES, prompts={"a": torch.ones(16, 32)}), lambda: CLoRA(NAMES, contrast=[{"zz": [1]}]),
                  lambda: CLoRA(["a", "a"])):
        with pytest.raises(ConfigError):
            build()
    with pytest.raises(ConfigError, match="top < bottom"):
        RegionGate(["a"], [[0, 0.6, 1, 0.4]])
    eps = [randn(4, 4, 8, 8, seed=s) for s in (30, 31)]
    holes = torch.ones(2, 2, 8, 8)
    holes[:, 0, 3, 3] = 0
    with pytest.raises(RoutingError, match="weight 0 in every mask"):
        fuse(eps, holes)
    with pytest.raises(RoutingError, match="masks"):
        fuse(eps, torch.ones(3, 2, 8, 8))
    with pytest.raises(ConfigError, match="one token list per map"):
        clora_masks([torch.rand(2, 4, 4, 16)] * 2, [[1]], (8, 8))
    gate_cases = [(RegionGate(NAMES, [torch.ones(2, 6, 6), torch.ones(2, 6, 6)]), "latent"),  # wrong mask size
                  (RegionGate(NAMES, [torch.ones(3, 8, 8), torch.ones(3, 8, 8)]), "batch"),  # 3 rows for 4
                  (RegionGate(["a", "zz"], [[0, 0, 1, 1]] * 2), "unknown adapter")]
    x, emb = torch.cat([latents, latents]), torch.cat([uncond, cond])
    for gate, message in gate_cases:
        with adapted_calls(unet) as calls, pytest.raises(RoutingError, match=message):
            with gate.route(unet):
                unet(x, 10, encoder_hidden_states=emb)
        assert calls == []
    short = torch.cat([uncond, cond])[:, :4]
    refused = {RoutingError: [LoRAComposer([Region("zz", [0, 0, 1, 1])]), CLoRA(["a", "zz"]),
                              LoRAComposer([Region("a", [0, 0, 1, 1], torch.ones(3, 16, 32))]),
                              CLoRA(NAMES, prompts={"a": torch.ones(3, 16, 32, dtype=torch.float64)})],
               ConfigError: [LoRAComposer([Region("a", [0, 0, 1, 1], short, [5])]),
                             LoRAComposer([Region("a", [0, 0, 1, 1], tokens=[16])]),
                             LoRAComposer([Region("a", [0.1, 0.1, 0.2, 0.2], tokens=[1])], reinit=True),
                             CLoRA(NAMES, mask_tokens={"b": [16]}),
                             CLoRA(NAMES, contrast=[{"a": [2], PLAIN: [40]}])]}
    for error, schedules in refused.items():
        for schedule in schedules:
            with forwards(unet) as calls, pytest.raises(error):
                run(unet, prompts, 3, schedule)
            assert calls == [] and schedule.passes == 0, schedule

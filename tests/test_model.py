"""ProbeX and the baselines: the factor path is the dense path, linear ProbeX is a Tucker-factorised dense expert,
persistence round-trips, and a ProbeX learns a planted rule."""
import numpy as np
import pytest
import torch

from probex.errors import InputError, ProbexError
from probex.experts import (DenseExpert, ProbeX, StatMLP, StatNNClassifier, dense_from_factors, load_expert,
                          weight_statistics)


def random_factors(n, d_w, d_h, ranks, seed=0):
    """LoRA factors of mixed ranks, zero-padded to the largest (as the layer cache stores them)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    up, down = torch.zeros(n, d_w, r_max), torch.zeros(n, r_max, d_h)
    for i in range(n):
        r = ranks[i % len(ranks)]
        up[i, :, :r] = torch.randn(d_w, r, generator=g)
        down[i, :r] = torch.randn(r, d_h, generator=g)
    return up, down, torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("relu", [True, False])
def test_factor_path_equals_dense_path_with_mixed_ranks(relu):
    torch.manual_seed(0)
    model = ProbeX(20, 12, r_u=8, r_v=6, r_t=5, relu=relu, n_out=3)
    x = random_factors(9, 20, 12, ranks=(1, 3, 7))
    dense = torch.stack([s * u @ d for u, d, s in zip(*x)])
    with torch.no_grad():
        assert torch.allclose(model.encode(x), model.encode(dense), atol=1e-5)
        assert torch.allclose(model(x), model(dense), atol=1e-5)
    # padding really is exact: a rank-1 model gives the same encoding unpadded
    up, down, scale = x
    single = (up[:1, :, :1], down[:1, :1], scale[:1])
    assert torch.allclose(model.encode(single), model.encode(x)[:1], atol=1e-5)


def test_factor_path_trains_like_the_dense_path():
    """Same loss gradients for U, V and M whether a batch is read as factors or as scale·B·A (what training sees)."""
    torch.manual_seed(3)
    model = ProbeX(20, 12, r_u=8, r_v=6, r_t=5, n_out=3)
    x = random_factors(9, 20, 12, ranks=(2, 5))
    dense = torch.stack([s * u @ d for u, d, s in zip(*x)])
    assert torch.allclose(dense_from_factors(x), dense, atol=1e-5)
    y = torch.arange(9) % 3
    grads = []
    for inputs in (x, dense):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), y).backward()
        grads.append([p.grad.clone() for p in (model.U, model.V, model.M.weight)])
    for factor_grad, dense_grad in zip(*grads):
        assert torch.allclose(factor_grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_responses_match_the_equation():
    torch.manual_seed(1)
    model = ProbeX(7, 5, r_u=4, r_v=3, r_t=2, n_out=2)
    X = torch.randn(1, 7, 5)
    z = model.responses(X)[0]
    for l in range(4):  # z_l = Vᵀ X u_l
        assert torch.allclose(z[:, l], model.V.T @ X[0] @ model.U[:, l], atol=1e-6)


def test_linear_probex_is_a_tucker_factorised_dense_expert():
    torch.manual_seed(2)
    probex = ProbeX(9, 6, r_u=4, r_v=3, r_t=5, relu=False, head="multilabel", n_out=4)
    dense = DenseExpert.from_linear_probex(probex)
    x = random_factors(6, 9, 6, ranks=(2, 3))
    with torch.no_grad():
        assert torch.allclose(probex.encode(x), dense.encode(x), atol=1e-5)
        assert torch.allclose(probex(x), dense(x), atol=1e-5)
    with pytest.raises(ValueError):
        DenseExpert.from_linear_probex(ProbeX(9, 6, r_u=4, r_v=3, r_t=5, relu=True, n_out=4))


def test_centred_input_is_read_the_same_from_factors_and_from_dense_weights():
    """A centred expert reads (X − X̄) / s; for ProbeX the factor path subtracts VᵀX̄U and never forms B·A."""
    torch.manual_seed(7)
    mean, scale = torch.randn(20, 12), 2.5
    x = random_factors(9, 20, 12, ranks=(1, 3, 7))
    dense = dense_from_factors(x)
    centred = ProbeX(20, 12, r_u=8, r_v=6, r_t=5, n_out=3, centred=True)
    centred.set_input_stats(mean, scale)
    plain = ProbeX(20, 12, r_u=8, r_v=6, r_t=5, n_out=3)
    plain.load_state_dict({k: v for k, v in centred.state_dict().items() if not k.startswith("input_")})
    with torch.no_grad():
        expected = plain.encode((dense - mean) / scale)
        assert torch.allclose(centred.encode(x), expected, atol=1e-5)
        assert torch.allclose(centred.encode(dense), expected, atol=1e-5)
    # Prop. 2 still holds: the centred linear ProbeX is the centred dense expert
    linear = ProbeX(20, 12, r_u=8, r_v=6, r_t=5, relu=False, head="multilabel", n_out=4, centred=True)
    linear.set_input_stats(mean, scale)
    with torch.no_grad():
        assert torch.allclose(DenseExpert.from_linear_probex(linear).encode(x), linear.encode(x), atol=1e-4)


def test_input_stats_are_checked():
    with pytest.raises(ValueError, match="raw inputs"):
        ProbeX(8, 6, r_u=4, r_v=3, r_t=5, n_out=3).set_input_stats(torch.zeros(8, 6), 1.0)
    centred = DenseExpert(8, 6, r_t=5, n_out=3, centred=True)
    with pytest.raises(ValueError, match="8×6"):
        centred.set_input_stats(torch.zeros(6, 8), 1.0)
    with pytest.raises(ValueError, match="positive"):
        centred.set_input_stats(torch.zeros(8, 6), 0.0)


def test_dense_expert_refuses_past_its_ram_budget():
    with pytest.raises(ProbexError, match="GB"):
        DenseExpert(1280, 1280, r_t=512, n_out=10)  # SD's largest attention layer, release r_T: ~13 GB to train
    with pytest.raises(ProbexError, match="0.1 GB budget"):
        DenseExpert(320, 768, r_t=128, n_out=10, ram_budget_gb=0.1)


def test_align_head_gives_cosines():
    torch.manual_seed(3)
    model = ProbeX(8, 8, r_u=4, r_v=4, r_t=6, head="align", text_dim=10)
    logits = model(torch.randn(5, 8, 8), torch.randn(7, 10))
    assert logits.shape == (5, 7) and logits.abs().max() <= 1 + 1e-6
    hot = ProbeX(8, 8, r_u=4, r_v=4, r_t=6, head="align", text_dim=10, temperature=0.1)
    hot.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 8, 8), torch.randn(3, 10)
    assert torch.allclose(hot(x, t), model(x, t) * 10, atol=1e-5)


def test_wrong_layer_shape_is_a_one_line_input_error():
    model = ProbeX(8, 6, r_u=4, r_v=4, r_t=4, n_out=2)
    with pytest.raises(InputError, match="8×6"):
        model(torch.randn(2, 6, 8))


def centred(expert):
    expert.set_input_stats(torch.randn(expert.d_w, expert.d_h), 0.3)
    return expert


@pytest.mark.parametrize("make", [
    lambda: ProbeX(8, 6, r_u=4, r_v=3, r_t=5, relu=False, head="align", text_dim=7, temperature=0.5),
    lambda: ProbeX(8, 6, r_u=4, r_v=3, r_t=5, head="multiclass", n_out=3),
    lambda: DenseExpert(8, 6, r_t=5, head="multilabel", n_out=3),
    lambda: centred(ProbeX(8, 6, r_u=4, r_v=3, r_t=5, head="multiclass", n_out=3, centred=True)),
    lambda: centred(DenseExpert(8, 6, r_t=5, head="multilabel", n_out=3, centred=True)),
])
def test_save_and_load_round_trip(tmp_path, make):
    torch.manual_seed(4)
    model = make()
    model.save_pretrained(tmp_path)
    loaded = load_expert(tmp_path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    x, t = random_factors(3, 8, 6, ranks=(2,)), torch.randn(4, 7)
    with torch.no_grad():
        args = (x, t) if model.head_kind == "align" else (x,)
        assert torch.equal(loaded(*args), model(*args))
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))


def test_loading_a_broken_expert_names_the_folder(tmp_path):
    ProbeX(4, 4, r_u=2, r_v=2, r_t=2, n_out=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ProbexError, match=str(tmp_path.name)):
        load_expert(tmp_path)


def test_probex_learns_a_planted_rule():
    """Class = which of 3 output directions the LoRA writes to; ranks 2–4 mixed, plus noise."""
    g = torch.Generator().manual_seed(5)
    d_w, d_h, n = 24, 16, 240
    dirs = torch.randn(3, d_w, generator=g)
    y = torch.arange(n) % 3
    up, down, scale = random_factors(n, d_w, d_h, ranks=(2, 3, 4), seed=6)
    up = up * 0.3
    up[:, :, 0] += dirs[y]
    torch.manual_seed(0)
    model = ProbeX(d_w, d_h, r_u=16, r_v=16, r_t=16, n_out=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train, test = slice(0, 180), slice(180, n)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model((up[train], down[train], scale[train])), y[train])
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model((up[test], down[test], scale[test])).argmax(1) == y[test]).float().mean()
    assert acc > 0.9


def test_weight_statistics_of_a_lora_are_those_of_its_product():
    x = random_factors(4, 10, 7, ranks=(1, 3))
    stats = weight_statistics(x, chunk=3)
    dense = dense_from_factors(x).flatten(1)
    assert stats.shape == (4, 7)
    assert torch.allclose(stats[:, 0], dense.mean(1), atol=1e-5)
    assert torch.allclose(stats[:, 1], dense.var(1), rtol=1e-4)
    assert torch.allclose(stats[:, 2], dense.min(1).values) and torch.allclose(stats[:, 6], dense.max(1).values)
    quartiles = np.quantile(dense.numpy(), [0.25, 0.5, 0.75], axis=1).T
    assert np.allclose(stats[:, 3:6].numpy(), quartiles, atol=1e-5)
    with_bias = weight_statistics(x, bias=torch.randn(4, 10))
    assert with_bias.shape == (4, 14)


def test_statnn_separates_models_by_weight_scale():
    g = torch.Generator().manual_seed(7)
    y = torch.arange(90) % 3
    weights = torch.randn(90, 6, 5, generator=g) * (1 + y).reshape(-1, 1, 1)  # the variance carries the class
    feats = weight_statistics(weights)
    clf = StatNNClassifier(max_iter=50).fit(feats[:60], y[:60])
    assert (clf.predict(feats[60:]) == y[60:].numpy()).mean() > 0.8
    multi = StatNNClassifier("multilabel", max_iter=30).fit(feats[:60], torch.stack([y == 0, y == 2], 1)[:60].int())
    assert multi.predict_scores(feats[60:]).shape == (30, 2)


def test_stat_mlp_aligns_statistics_with_text():
    torch.manual_seed(8)
    model = StatMLP(n_features=7, hidden=16, r_t=8, text_dim=5)
    feats = torch.randn(20, 7) * 100 + 3
    model.fit_normaliser(feats)
    assert torch.allclose(((feats - model.mean) / model.std).mean(0), torch.zeros(7), atol=1e-4)
    assert model(feats, torch.randn(4, 5)).shape == (20, 4)


def test_stacked_probex_sums_its_layers_probex_encodings(tmp_path):
    """Several layers read at once: the encoding is the sum of one ProbeX per layer, the head shared; it saves and
    loads like every expert."""
    from probex.experts import StackedProbeX

    torch.manual_seed(2)
    model = StackedProbeX([[8, 6], [5, 7]], r_u=3, r_v=4, r_t=5, head="align", text_dim=9, centred=False)
    layers = [random_factors(4, 8, 6, ranks=(2, 3), seed=1), random_factors(4, 5, 7, ranks=(1,), seed=2)]
    with torch.no_grad():
        each = [probe.encode(x) for probe, x in zip(model.layers, layers)]
        assert torch.allclose(model.encode(layers), each[0] + each[1])
        assert all(e.abs().sum() > 0 for e in each)  # both layers contribute
        model.save_pretrained(tmp_path)
        loaded = load_expert(tmp_path)
        text = torch.randn(3, 9)
        assert type(loaded) is StackedProbeX and torch.equal(loaded(layers, text), model(layers, text))
    with pytest.raises(InputError, match="8×6"):
        model.encode([layers[1], layers[0]])

"""Each LRP rule against a plain loop written directly from its equation, in float64, on random
layers (Bach et al. 2015, eq. (2)-(3) of the journal paper; Arras et al. 2017 for the LSTM)."""
import itertools

import pytest
import torch
from torch import nn

from captionlens.explain.rules import (_AlphaBetaConv, _EpsilonChannelAffine, _EpsilonLayerNorm, _EpsilonLinear,
                                       _EpsilonPool, _EpsilonReduce, _EpsilonSum, _EpsilonWeightedSum, _GateProduct,
                                       _EpsilonMatmul, _SoftmaxTaylor, _UniformElementwise, _UniformProduct, _ZBoxConv,
                                       epsilon_mean, pooling_matrix, winner_takes_all)
from captionlens.explain.lrp import rule_hooks
from captionlens.explain.rules import LRPParameters
from captionlens.models.layers import GridMean, LSTMCell, LSTMState



def relevance_in(function, output, settings, tensors, relevance, index=0):
    """Run a rule's backward: the relevance arriving at ``tensors[index]``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    out = function.apply(output.detach(), settings, *leaves)
    (grad,) = torch.autograd.grad(out, [leaves[index]], relevance, allow_unused=True)
    return grad


def sign(z):
    return 1.0 if z >= 0 else -1.0


@pytest.fixture(autouse=True)
def float64_and_seed():
    """Rules are checked in float64; the default dtype is restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def test_epsilon_rule_linear_layer():
    layer = nn.Linear(5, 4)
    x, eps = torch.randn(3, 5), 0.1
    z = layer(x)
    r_out = torch.randn(3, 4)
    got = relevance_in(_EpsilonLinear, z, eps, (x, layer.weight, z), r_out)
    expected = torch.zeros(3, 5)
    for b, i, j in itertools.product(range(3), range(5), range(4)):
        expected[b, i] += x[b, i] * layer.weight[j, i] / (z[b, j] + eps * sign(z[b, j])) * r_out[b, j]
    assert torch.allclose(got, expected.detach(), atol=1e-12)


def test_epsilon_rule_sum():
    terms = [torch.randn(2, 6) for _ in range(3)]
    z, eps, r_out = sum(terms), 0.05, torch.randn(2, 6)
    for k in range(3):
        got = relevance_in(_EpsilonSum, z, eps, (z, *terms), r_out, index=k + 1)
        expected = torch.tensor([[terms[k][b, d] / (z[b, d] + eps * sign(z[b, d])) * r_out[b, d]
                                  for d in range(6)] for b in range(2)])
        assert torch.allclose(got, expected, atol=1e-12)


def test_epsilon_rule_mean_over_cells():
    cells, eps = torch.randn(2, 7, 3), 0.01
    z, r_out = cells.mean(1), torch.randn(2, 3)
    leaf = cells.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(epsilon_mean(GridMean(), (leaf,), z, LRPParameters(epsilon=eps)), [leaf], r_out)
    expected = torch.zeros_like(cells)
    for b, i, c in itertools.product(range(2), range(7), range(3)):
        expected[b, i, c] = (cells[b, i, c] / 7) / (z[b, c] + eps * sign(z[b, c])) * r_out[b, c]
    assert torch.allclose(got, expected, atol=1e-12)


def test_epsilon_rule_attention_combination_weights_are_constants():
    weights = torch.softmax(torch.randn(2, 5), 1)
    values, eps = torch.randn(2, 5, 4), 0.01
    z = torch.einsum("bn,bnd->bd", weights, values)
    r_out = torch.randn(2, 4)
    got = relevance_in(_EpsilonWeightedSum, z, eps, (weights, values, z), r_out, index=1)
    expected = torch.zeros_like(values)
    for b, n, d in itertools.product(range(2), range(5), range(4)):
        expected[b, n, d] = weights[b, n] * values[b, n, d] / (z[b, d] + eps * sign(z[b, d])) * r_out[b, d]
    assert torch.allclose(got, expected, atol=1e-12)
    assert relevance_in(_EpsilonWeightedSum, z, eps, (weights, values, z), r_out, index=0) is None  # α, β get none


def test_gate_gets_no_relevance_signal_gets_all():
    gate, signal, r_out = torch.rand(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert relevance_in(_GateProduct, gate * signal, None, (gate, signal), r_out, index=0) is None
    assert torch.equal(relevance_in(_GateProduct, gate * signal, None, (gate, signal), r_out, index=1), r_out)


def _conv_loop(x, conv, r_out, contribution):
    """R_i = Σ_j contribution(x_i, w_ij) normalised per output j — written as loops over positions."""
    batch, c_in, height, width = x.shape
    c_out, per_group, kh, kw = conv.weight.shape  # per_group = c_in / groups
    stride, pad = conv.stride[0], conv.padding[0]
    out_h, out_w = r_out.shape[2:]
    result = torch.zeros_like(x)
    for b, o, oy, ox in itertools.product(range(batch), range(c_out), range(out_h), range(out_w)):
        taps = []
        group = o // (c_out // conv.groups)
        for k, dy, dx in itertools.product(range(per_group), range(kh), range(kw)):
            c = group * per_group + k
            y, xx = oy * stride - pad + dy, ox * stride - pad + dx
            if 0 <= y < height and 0 <= xx < width:
                taps.append(((c, y, xx), conv.weight[o, k, dy, dx]))
        result_j = contribution(x[b], taps, r_out[b, o, oy, ox])
        for (c, y, xx), value in result_j.items():
            result[b, c, y, xx] += value
    return result


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("signed", [True, False])
def test_alpha_beta_rule_convolution(alpha, beta, stride, groups, kernel, signed):
    """Plain and grouped (groups = channels: depthwise) convolutions; 1×1 ones run as matrix products
    (strided: zeros between the pixels read, cropped to the input's odd size), which the loop checks
    as well, as one word and as several under both vmaps; inputs of both signs and, as after a ReLU,
    none negative."""
    conv = nn.Conv2d(2, 2 * groups if groups > 1 else 3, kernel, stride=stride, padding=kernel // 2, groups=groups)
    x = torch.randn(2, 2, 5, 5)  # signed inputs: both (x w)^+ parts count
    x = x if signed else x.clamp(min=0)
    out = conv(x)
    r_out = torch.randn_like(out)
    got = relevance_in(_AlphaBetaConv, out, (conv, alpha, beta), (x,), r_out)

    def contribution(xb, taps, r_j):
        products = {pos: xb[pos] * w for pos, w in taps}
        z_pos = sum(p.clamp(min=0) for p in products.values())
        z_neg = sum(p.clamp(max=0) for p in products.values())
        return {pos: (alpha * p.clamp(min=0) / (z_pos + 1e-12) - beta * p.clamp(max=0) / (z_neg - 1e-12)) * r_j
                for pos, p in products.items()}

    expected = _conv_loop(x, conv, r_out, contribution)
    assert torch.allclose(got, expected.detach(), atol=1e-9)
    leaf = x.clone().requires_grad_(True)  # three words' seeds at once, both ways the engine batches them
    words = _AlphaBetaConv.apply(out.detach(), (conv, alpha, beta), leaf)
    seeds = torch.stack([r_out, 2 * r_out, -r_out])
    (legacy,) = torch.autograd.grad(words, [leaf], seeds, is_grads_batched=True, retain_graph=True)
    (batch,) = torch.func.vmap(lambda seed: torch.autograd.grad(words, [leaf], seed, retain_graph=True))(seeds)
    for several in (legacy, batch):
        assert torch.allclose(several, torch.stack([expected, 2 * expected, -expected]).detach(), atol=1e-9)


def test_zb_rule_first_layer():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    low, high = -torch.ones(1, 3, 1, 1) * 2, torch.ones(1, 3, 1, 1) * 2
    x = torch.rand(1, 3, 4, 4) * 4 - 2
    out = conv(x)
    r_out = torch.randn_like(out)
    got = relevance_in(_ZBoxConv, out, conv, (x, low, high), r_out)

    def contribution(xb, taps, r_j):
        terms = {pos: xb[pos] * w - low[0, pos[0], 0, 0] * w.clamp(min=0) - high[0, pos[0], 0, 0] * w.clamp(max=0)
                 for pos, w in taps}
        z = sum(terms.values())
        return {pos: t / (z + 1e-12 * sign(z)) * r_j for pos, t in terms.items()}

    expected = _conv_loop(x, conv, r_out, contribution)
    assert torch.allclose(got, expected.detach(), atol=1e-9)


def test_lstm_cell_with_sentinel_against_lrp_lstm_written_out():
    """LRP-LSTM (Arras et al. 2017) for one cell with sentinel: relevance of h_t and s_t goes to
    tanh(m_t), then m_t; m_t = f ⊙ m_{t-1} + i ⊙ g splits in proportion (ε-rule); g's relevance
    passes tanh and reaches [x; h_{t-1}] by the ε-rule; gates get nothing."""
    d, n_in, eps = 3, 4, 0.01
    cell = LSTMCell(n_in, d, sentinel=True)
    x, h0, m0 = torch.randn(2, n_in), torch.randn(2, d), torch.randn(2, d)
    r_h, r_s = torch.randn(2, d), torch.randn(2, d)

    class Wrapper(nn.Module):  # rule_hooks walks a model with .encoder (none here)
        def __init__(self):
            super().__init__()
            self.encoder = nn.Identity()
            self.encoder.mean, self.encoder.std = (0, 0, 0), (1, 1, 1)
            self.cell = cell

    hooks = rule_hooks(Wrapper(), LRPParameters(epsilon=eps))
    from captionlens.explain.engine import forward_hooks
    xs, hs, ms = (t.clone().requires_grad_(True) for t in (x, h0, m0))
    with forward_hooks(hooks):
        state, sentinel = cell(xs, LSTMState(hs, ms))
    got_x, got_h, got_m = torch.autograd.grad([state.hidden, sentinel], [xs, hs, ms], [r_h, r_s])

    # the same by hand, unit by unit
    inputs = torch.cat([x, h0], 1)
    pre = cell.gates(inputs).detach()
    i, f = torch.sigmoid(pre[:, :d]), torch.sigmoid(pre[:, d:2 * d])
    g = torch.tanh(pre[:, 3 * d:4 * d])
    m = f * m0 + i * g
    r_m = r_h + r_s  # both h_t = o ⊙ tanh(m_t) and s_t = gate ⊙ tanh(m_t) pass everything to m_t
    expected_m = torch.zeros(2, d)
    r_pre_g = torch.zeros(2, d)
    for b, k in itertools.product(range(2), range(d)):
        denominator = m[b, k] + eps * sign(m[b, k])
        expected_m[b, k] = f[b, k] * m0[b, k] / denominator * r_m[b, k]
        r_pre_g[b, k] = i[b, k] * g[b, k] / denominator * r_m[b, k]
    z = pre[:, 3 * d:4 * d]
    expected_inputs = torch.zeros(2, n_in + d)
    w = cell.gates.weight[3 * d:4 * d]
    for b, q, k in itertools.product(range(2), range(n_in + d), range(d)):
        expected_inputs[b, q] += inputs[b, q] * w[k, q] / (z[b, k] + eps * sign(z[b, k])) * r_pre_g[b, k]
    assert torch.allclose(got_m, expected_m, atol=1e-10)
    assert torch.allclose(got_x, expected_inputs[:, :n_in].detach(), atol=1e-10)
    assert torch.allclose(got_h, expected_inputs[:, n_in:].detach(), atol=1e-10)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="α − β = 1"):
        LRPParameters(alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="first_layer"):
        LRPParameters(first_layer="flat")


# ----------------------------------------------------------------- encoder and canonised layers
@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d(8), nn.AvgPool2d(2)])
def test_epsilon_rule_average_pooling(pool):
    """R_i = Σ_j x_i P_ji / stab(z_j) R_j, with P_ji = 1/|window j| for the cells i of window j; the
    windows of adaptive pooling are [floor(j·n/o), ceil((j+1)·n/o)) (also when o > n: upsampling)."""
    import math

    x, eps = torch.randn(2, 3, 5, 5) if not isinstance(pool, nn.AvgPool2d) else torch.randn(2, 3, 4, 4), 0.05
    z = pool(x)
    r_out = torch.randn_like(z)
    got = relevance_in(_EpsilonPool, z, eps, (x, pooling_matrix(pool, *x.shape[-2:], x), z), r_out)
    n, o = x.shape[-1], z.shape[-1]

    def window(j):
        if isinstance(pool, nn.AvgPool2d):
            return range(2 * j, 2 * j + 2)
        return range(math.floor(j * n / o), math.ceil((j + 1) * n / o))

    expected = torch.zeros_like(x)
    for b, c, p, q in itertools.product(range(2), range(3), range(o), range(o)):
        cells = [(y, w) for y in window(p) for w in window(q)]
        for y, w in cells:
            expected[b, c, y, w] += x[b, c, y, w] / len(cells) / (z[b, c, p, q] + eps * sign(z[b, c, p, q])) \
                * r_out[b, c, p, q]
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(z, torch.einsum("bcn,mn->bcm", x.flatten(2), pooling_matrix(pool, n, n, x)).view_as(z))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel", [2, (2, 3)])
def test_max_pooling_passes_each_window_relevance_to_its_first_maximum(layout, kernel):
    """Winner-take-all, R_i = R_j for the first maximum i of window j (in reading order, as the
    pooling's own backward picks it), 0 for the others: against that loop, on inputs with ties, in
    both layouts, as one word and as several under both vmaps."""
    pool = nn.MaxPool2d(kernel)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randint(0, 3, (2, 4, 6, 6)).double().contiguous(memory_format=layout)  # many ties
    leaf = x.clone().requires_grad_(True)
    out = pool(leaf)
    r_out = torch.randn_like(out)
    words = winner_takes_all(pool, (leaf,), out)
    expected = torch.zeros_like(x)
    for b, c, p, q in itertools.product(range(2), range(4), range(6 // kh), range(6 // kw)):
        window = [(y, w) for y in range(p * kh, p * kh + kh) for w in range(q * kw, q * kw + kw)]
        first = max(window, key=lambda cell: (x[b, c, cell[0], cell[1]], -window.index(cell)))
        expected[b, c, first[0], first[1]] = r_out[b, c, p, q]
    (got,) = torch.autograd.grad(words, [leaf], r_out, retain_graph=True)
    (ordinary,) = torch.autograd.grad(out, [leaf], r_out, retain_graph=True)
    assert torch.equal(got, expected) and torch.equal(ordinary, expected)
    seeds = torch.stack([r_out, 2 * r_out, -r_out])
    (legacy,) = torch.autograd.grad(words, [leaf], seeds, is_grads_batched=True, retain_graph=True)
    (batch,) = torch.func.vmap(lambda seed: torch.autograd.grad(words, [leaf], seed, retain_graph=True))(seeds)
    for several in (legacy, batch):
        assert torch.equal(several, torch.stack([expected, 2 * expected, -expected]))
    assert got.is_contiguous(memory_format=layout)  # the layout kept: no copy for the next rule


@pytest.mark.parametrize("pool,size", [(nn.MaxPool2d(3, stride=2, padding=1), 6), (nn.MaxPool2d(3, stride=2), 7),
                                       (nn.MaxPool2d(2), 5)])
def test_max_pooling_that_does_not_tile_its_input_keeps_its_ordinary_backward(pool, size):
    """Overlapping windows (ResNet's 3×3/2) or rows no window covers: no rule output (None), so the
    pooling's own backward passes relevance to the winners."""
    x = torch.randn(1, 2, size, size, requires_grad=True)
    assert winner_takes_all(pool, (x,), pool(x)) is None


def test_epsilon_rule_channel_affine_and_reduce():
    x, scale, shift, eps = torch.randn(2, 4, 3), torch.randn(4), torch.randn(4), 0.05
    z = x * scale.view(1, 4, 1) + shift.view(1, 4, 1)
    r_out = torch.randn_like(z)
    got = relevance_in(_EpsilonChannelAffine, z, eps, (x, scale.view(1, 4, 1), z), r_out)
    expected = torch.tensor([[[x[b, c, k] * scale[c] / (z[b, c, k] + eps * sign(z[b, c, k])) * r_out[b, c, k]
                               for k in range(3)] for c in range(4)] for b in range(2)])
    assert torch.allclose(got, expected, atol=1e-12)
    for mean, count in ((False, 1), (True, 4)):  # Σ (or mean) over dim 1
        z = x.mean(dim=1) if mean else x.sum(dim=1)
        r_out = torch.randn_like(z)
        got = relevance_in(_EpsilonReduce, z, (eps, (1,), False, count), (x, z), r_out)
        expected = torch.tensor([[[x[b, c, k] / count / (z[b, k] + eps * sign(z[b, k])) * r_out[b, k] for k in range(3)]
                                  for c in range(4)] for b in range(2)])
        assert torch.allclose(got, expected, atol=1e-12)


def test_batch_norm_folding_against_its_equation():
    """w'_o = w_o γ_o / √(σ²_o + eps), b'_o = (b_o − μ_o) γ_o / √(σ²_o + eps) + β_o: the folded
    convolution computes conv + batch-norm in place of both (the norm an identity), and is undone afterwards."""
    from captionlens.explain.canonize import batch_norms_folded

    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    model = nn.Module()
    model.encoder = nn.Sequential(conv, bn, nn.ReLU())
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 3, 5, 5)
    reference = bn(conv(x))
    weight, bias = conv.weight.clone(), conv.bias.clone()
    with batch_norms_folded(model):
        assert isinstance(model.encoder[1], nn.Identity)
        for o in range(4):
            factor = bn.weight[o] / torch.sqrt(bn.running_var[o] + bn.eps)
            assert torch.allclose(conv.weight[o], weight[o] * factor)
            assert torch.allclose(conv.bias[o], (bias[o] - bn.running_mean[o]) * factor + bn.bias[o])
        assert torch.allclose(conv(x), reference, atol=1e-6)
        assert torch.allclose(model.encoder(x), reference.relu(), atol=1e-6)
    assert model.encoder[1] is bn
    assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)


# ------------------------------------------------------------------- transformer rules (AttnLRP, CP-LRP)
def test_layer_norm_rule_holds_the_scale_constant():
    """y_j = w_j (x_j − μ)/σ + b_j with σ constant: R_i = Σ_j x_i ∂y_j/∂x_i / stab(y_j) R_j, with
    ∂y_j/∂x_i = w_j/σ (δ_ij − 1/N) (AttnLRP Prop. 3.4; lxt's layer_norm)."""
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x, eps, r_out = torch.randn(2, 6), 0.01, torch.randn(2, 6)
    y = norm(x)
    got = relevance_in(_EpsilonLayerNorm, y, (eps, norm), (x, y), r_out)
    expected = torch.zeros(2, 6)
    for b in range(2):
        sigma = float(torch.sqrt(x[b].var(unbiased=False) + norm.eps))
        for i, j in itertools.product(range(6), range(6)):
            derivative = norm.weight[j] / sigma * ((i == j) - 1 / 6)
            expected[b, i] += x[b, i] * derivative / (y[b, j] + eps * sign(y[b, j])) * r_out[b, j]
    assert torch.allclose(got, expected.detach(), atol=1e-12)
    with torch.no_grad():  # without bias and ε, relevance is conserved
        norm.bias.zero_()
    y = norm(x)
    assert torch.allclose(relevance_in(_EpsilonLayerNorm, y, (0.0, norm), (x, y), r_out).sum(1), r_out.sum(1))


def test_softmax_rule_is_the_taylor_expansion_at_the_scores():
    """AttnLRP Prop. 3.1: R_i = x_i (R_i − s_i Σ_j R_j); masked (−∞) scores get nothing."""
    x = torch.randn(3, 5)
    x[0, 4] = float("-inf")
    s, r_out = torch.softmax(x, -1), torch.randn(3, 5)
    got = relevance_in(_SoftmaxTaylor, s, None, (x, s), r_out)
    expected = torch.zeros(3, 5)
    for b, i in itertools.product(range(3), range(5)):
        if torch.isfinite(x[b, i]):
            expected[b, i] = x[b, i] * (r_out[b, i] - s[b, i] * sum(r_out[b, j] for j in range(5)))
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_uniform_rule_splits_a_bilinear_product_evenly(scale):
    """AttnLRP Prop. 3.3: z_qd = c Σ_n a_qn b_nd; each factor gets half of every term's share,
    R_a[q,n] = Σ_d c a_qn b_nd / stab(2 z_qd) R_qd and R_b alike."""
    a, b, eps = torch.randn(2, 3, 4), torch.randn(2, 4, 5), 1e-3
    z, r_out = scale * (a @ b), torch.randn(2, 3, 5)
    got_a = relevance_in(_UniformProduct, z, (eps, scale), (a, b), r_out, index=0)
    got_b = relevance_in(_UniformProduct, z, (eps, scale), (a, b), r_out, index=1)
    expected_a, expected_b = torch.zeros(2, 3, 4), torch.zeros(2, 4, 5)
    for h, q, n, d in itertools.product(range(2), range(3), range(4), range(5)):
        term = scale * a[h, q, n] * b[h, n, d] / (2 * z[h, q, d] + eps * sign(z[h, q, d])) * r_out[h, q, d]
        expected_a[h, q, n] += term
        expected_b[h, n, d] += term
    assert torch.allclose(got_a, expected_a, atol=1e-12) and torch.allclose(got_b, expected_b, atol=1e-12)
    # ε → 0: the two factors share exactly what arrived
    assert torch.allclose((relevance_in(_UniformProduct, z, (0.0, scale), (a, b), r_out, 0).sum()
                           + relevance_in(_UniformProduct, z, (0.0, scale), (a, b), r_out, 1).sum()), r_out.sum())


@pytest.mark.parametrize("flowing", [0, 1])
def test_epsilon_rule_of_a_product_with_a_constant_matrix(flowing):
    """``x @ W`` or ``W @ x`` between modules (the operation-by-operation LRP of Hugging Face models):
    z_qd = Σ_n a_qn b_nd with one factor a weight; the flowing one gets R[q,n] = Σ_d a_qn b_nd / stab(z_qd) R_qd."""
    a, b, eps = torch.randn(2, 3, 4), torch.randn(2, 4, 5), 1e-3
    z, r_out = a @ b, torch.randn(2, 3, 5)
    got = relevance_in(_EpsilonMatmul, z, (eps, flowing == 0), (a, b, z), r_out, index=flowing)
    expected = torch.zeros_like(a if flowing == 0 else b)
    for h, q, n, d in itertools.product(range(2), range(3), range(4), range(5)):
        term = a[h, q, n] * b[h, n, d] / (z[h, q, d] + eps * sign(z[h, q, d])) * r_out[h, q, d]
        expected[(h, q, n) if flowing == 0 else (h, n, d)] += term
    assert torch.allclose(got, expected, atol=1e-12)


def test_uniform_rule_of_an_elementwise_product_with_broadcasting():
    """``a ⊙ b`` of two flowing tensors (a gated MLP, AttnLRP Prop. 3.2): each gets half, R = z/stab(2z) R_out;
    a broadcast factor sums over the elements it was copied to."""
    a, b, eps = torch.randn(2, 3, 4), torch.randn(1, 3, 1), 1e-3
    z, r_out = a * b, torch.randn(2, 3, 4)
    got_a = relevance_in(_UniformElementwise, z, eps, (a, b), r_out, index=0)
    got_b = relevance_in(_UniformElementwise, z, eps, (a, b), r_out, index=1)
    expected_a, expected_b = torch.zeros_like(a), torch.zeros_like(b)
    for i, j, k in itertools.product(range(2), range(3), range(4)):
        term = z[i, j, k] / (2 * z[i, j, k] + eps * sign(z[i, j, k])) * r_out[i, j, k]
        expected_a[i, j, k] += term
        expected_b[0, j, 0] += term
    assert torch.allclose(got_a, expected_a, atol=1e-12) and torch.allclose(got_b, expected_b, atol=1e-12)


def test_cp_rule_for_many_queries_holds_the_weights_constant():
    """Multi-head attention's Σ_n α_qn v_nd (eq. 8 per query): R_v[n,d] = Σ_q α_qn v_nd / stab(z_qd) R_qd."""
    weights = torch.softmax(torch.randn(2, 3, 4), -1)
    values, eps = torch.randn(2, 4, 5), 0.01
    z, r_out = weights @ values, torch.randn(2, 3, 5)
    got = relevance_in(_EpsilonWeightedSum, z, eps, (weights, values, z), r_out, index=1)
    expected = torch.zeros(2, 4, 5)
    for h, q, n, d in itertools.product(range(2), range(3), range(4), range(5)):
        expected[h, n, d] += weights[h, q, n] * values[h, n, d] / (z[h, q, d] + eps * sign(z[h, q, d])) * r_out[h, q, d]
    assert torch.allclose(got, expected, atol=1e-12)
    assert relevance_in(_EpsilonWeightedSum, z, eps, (weights, values, z), r_out, index=0) is None  # weights: nothing

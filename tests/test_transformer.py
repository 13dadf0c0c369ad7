"""The transformer captioner: its decoding contract (the key/value cache changes nothing), its LRP
against the ``lxt`` package (AttnLRP, Achtibat et al. 2024) on the same weights, conservation with the
positional share, attention rollout against its equations, and the CLI."""
import json

import pytest
import torch
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app
from captionlens.explain import explain, methods_for
from captionlens.models.beam import beam_search

WORDS = "a red blue circle square left of two".split()
CAPTION = "a red circle left of a blue square".split()


def captioner(zero_biases=False, embed_size=12, encoder_layers=1, seed=0):
    cap = cl.build_captioner("transformer", encoder="shapes", vocab=WORDS, hidden_size=16, embed_size=embed_size,
                             seed=seed, encoder_options={"image_size": 32},
                             architecture_options={"layers": 2, "heads": 2, "encoder_layers": encoder_layers})
    with torch.no_grad():
        for name, parameter in cap.model.named_parameters():
            if zero_biases and name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name:  # trained LayerNorms are not the identity: make them differ per channel
                parameter.uniform_(0.5, 1.5) if name.endswith("weight") else parameter.normal_(0, 0.1)
    cap.model.double()
    return cap


def image(seed=0):
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ decoding
def test_beam_search_with_the_key_value_cache_equals_beam_search_without_it():
    cap = captioner()
    decoder = cap.model.decoder
    with torch.no_grad():
        decoder.fc.bias[cap.vocab.end_id] -= 3.0  # captions of several words
        grids = cap.model.encoder(cap.preprocess([image(s) for s in range(4)]).double())
        memory = decoder.prepare(grids)
        state, steps = decoder.initial_state(memory), []
        ids = torch.tensor([cap.vocab.encode(CAPTION)[:-1]] * 4)
        for t in range(ids.shape[1]):  # step by step with the cache = teacher forcing, at every step
            out = decoder.step(memory, ids[:, t], state)
            state = out.state
            steps.append(out.logits)
        assert torch.allclose(torch.stack(steps, 1), decoder(grids, ids).logits, atol=1e-10)
        cached = beam_search(decoder, grids, cap.vocab.start_id, cap.vocab.end_id, beam_size=3, max_length=8)
        decoder.use_cache = False
        uncached = beam_search(decoder, grids, cap.vocab.start_id, cap.vocab.end_id, beam_size=3, max_length=8)
    assert [h.token_ids for h in cached] == [h.token_ids for h in uncached]
    assert [h.score for h in cached] == pytest.approx([h.score for h in uncached], abs=1e-9)
    assert any(len(h.token_ids) > 2 for h in cached)


def test_options_are_checked():
    with pytest.raises(ValueError, match="not divisible"):
        cl.build_captioner("transformer", encoder="shapes", vocab=WORDS, hidden_size=10, embed_size=10,
                           architecture_options={"heads": 4})
    for sizes, options, message in (((0, 0), {}, "sizes must be ≥ 1"), ((16, 16), {"layers": 10**9}, "layers ≤ 256"),
                                    ((16, 16), {"dropout": 1.5}, "dropout in")):
        dropout = options.pop("dropout", None)
        with pytest.raises(ValueError, match=message):
            cl.build_captioner("transformer", encoder="shapes", vocab=WORDS, hidden_size=sizes[0], embed_size=sizes[1],
                               dropout=dropout, architecture_options=options)
    with pytest.raises(ValueError, match="takes no option layers"):
        cl.build_captioner("gridtd", encoder="shapes", vocab=WORDS, architecture_options={"layers": 2})
    cap = captioner()
    with pytest.raises(ValueError, match="attention_rule"):
        explain(cap, image(), CAPTION, method="lrp", attention_rule="softmax")
    lstm = cl.build_captioner("gridtd", encoder="shapes", vocab=WORDS, hidden_size=8, embed_size=8,
                              encoder_options={"image_size": 32})
    with pytest.raises(ValueError, match="additive"):
        explain(lstm, image(), CAPTION, method="lrp", attention_rule="attnlrp")
    with pytest.raises(ValueError, match="rollout needs"):
        explain(lstm, image(), CAPTION, method="rollout")
    assert "rollout" in methods_for(cap.model) and "rollout" not in methods_for(lstm.model)


# ------------------------------------------------------------------------------------ LRP
def test_cp_lrp_conserves_the_logit_with_the_positions_share():
    """Biases zeroed, ε → 0: pixels + preceding words + positions = the logit, for every word.
    (AttnLRP's softmax rule is a Taylor expansion with a bias term and does not conserve; it is checked
    against lxt below.)"""
    cap = captioner(zero_biases=True)
    exp = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-10, attention_rule="cp", include_end=True)
    total = exp.image.sum(dim=(1, 2)) + exp.preceding.sum(dim=1) + exp.extra["positions"]
    assert exp.score.abs().min() > 1e-6
    assert torch.allclose(total, exp.score, rtol=1e-6, atol=0)
    assert (exp.extra["positions"].abs() > 1e-8).all()  # not silently dropped: it is not zero
    assert (exp.image.abs().sum(dim=(1, 2)) > 0).all() and (exp.preceding[:, 1:].abs().sum(dim=1) > 0).any()


def test_the_audit_finds_no_leak_in_the_transformer():
    """Every module and every operation between modules conserves (positions counted as a sink)."""
    report = cl.audit_lrp(captioner())  # a float64 captioner too (its caption pass takes the model's dtype)
    assert report.passed and report.flagged == [] and abs(report.conservation - 1) < 1e-6
    assert report.positions != 0 and {"LayerNorm", "AttentionScores", "AttentionWeights", "WeightedSum",
                                      "GELU"} <= {row.kind for row in report.rows}


def _lxt_reference(cap, pixels, token_ids, step, token, epsilon):
    """The same decoder written with lxt's explicit AttnLRP functions; relevance of the grid, each fed
    token's embedding and all positions for one logit (seeded with the logit, as LRP starts)."""
    import lxt.explicit.functional as lf
    from lxt.explicit.rules import identity

    d = cap.model.decoder

    def linear(x, layer):
        return lf.linear_epsilon(x, layer.weight, layer.bias, epsilon)

    def norm(x, layer):
        return lf.layer_norm_grad_fn.apply(x, layer.weight, layer.bias, layer.eps, epsilon)

    def attention(mha, x, source, causal):
        split = lambda t: t.unflatten(-1, (mha.heads, -1)).transpose(1, 2)  # noqa: E731
        q = lf.mul2(split(linear(x, mha.query)), torch.tensor(mha.scores.scale, dtype=x.dtype))  # constant: identity
        scores = lf.matmul(q, split(linear(source, mha.key)).transpose(-1, -2), epsilon=epsilon)
        if causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        context = lf.matmul(lf.softmax(scores, -1), split(linear(source, mha.value)), epsilon=epsilon)
        return linear(context.transpose(1, 2).flatten(2), mha.output)

    def feedforward(block, x):
        hidden = identity(block.activation, linear(norm(x, block.norm), block.expand))
        return residual(x, linear(hidden, block.contract))

    def residual(x, y):
        return lf.add2(x, y, epsilon=epsilon)

    with torch.no_grad():
        grid = cap.model.encoder(pixels)
    grid.requires_grad_(True)
    cells = linear(grid.flatten(2).transpose(1, 2), d.cell_projection)
    cell_positions = d.cell_positions(cells, *grid.shape[2:]).detach().requires_grad_(True)
    x = residual(cells, cell_positions)
    for layer in d.encoder_layers:
        u = norm(x, layer.attention_norm)
        x = residual(x, attention(layer.attention, u, u, False))
        x = feedforward(layer.feedforward, x)
    memory = norm(x, d.memory_norm)
    embeddings = d.embedding(token_ids).detach().requires_grad_(True)
    words = lf.linear_epsilon(embeddings, d.embed_projection.weight, None, epsilon)
    word_positions = d.word_positions(words).detach().requires_grad_(True)
    y = residual(words, word_positions)
    for layer in d.layers:
        u = norm(y, layer.self_norm)
        y = residual(y, attention(layer.self_attention, u, u, True))
        y = residual(y, attention(layer.cross_attention, norm(y, layer.cross_norm), memory, False))
        y = feedforward(layer.feedforward, y)
    logit = linear(norm(y, d.output_norm), d.fc)[0, step, token]
    inputs = [grid, embeddings, cell_positions, word_positions]
    relevance = torch.autograd.grad(logit, inputs, logit.detach())
    return logit.detach(), relevance


def test_attnlrp_equals_the_lxt_package_on_the_same_transformer():
    """lxt 2.1 (AttnLRP's authors' package, explicit mode: every operation its LRP function) and
    captionlens's attention_rule="attnlrp" on the same weights (biases kept, LayerNorms not the
    identity): relevance of the grid cells, of each preceding word's embedding and of the positions."""
    cap, epsilon = captioner(), 1e-10
    pixels = cap.preprocess([image(7)]).double()
    token_ids = torch.tensor([cap.vocab.encode(CAPTION)[:-1]])
    exp = explain(cap, image(7), CAPTION, method="lrp", epsilon=epsilon, attention_rule="attnlrp")
    cp = explain(cap, image(7), CAPTION, method="lrp", epsilon=epsilon, attention_rule="cp")
    for k in range(len(CAPTION)):
        token = cap.vocab.index(CAPTION[k])
        logit, (grid, embeddings, cells, words) = _lxt_reference(cap, pixels, token_ids, k, token, epsilon)
        scale = float(grid.abs().sum() + embeddings.abs().sum())
        assert float(exp.score[k]) == pytest.approx(float(logit), abs=1e-10)
        assert (exp.grid[k] - grid[0].sum(0)).abs().max() <= 1e-4 * scale
        assert (exp.preceding[k, : k + 1] - embeddings[0, : k + 1].sum(-1)).abs().max() <= 1e-4 * scale
        assert float(exp.extra["positions"][k]) == pytest.approx(float(cells.sum() + words.sum()), abs=1e-4 * scale)
        assert embeddings[0, k + 1:].abs().max() == 0  # causal: later tokens get nothing
    # the two rules really differ (relevance through queries and keys), so the match says something
    assert (exp.preceding - cp.preceding).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ rollout
def test_rollout_follows_its_equations():
    """One decoder layer, no encoder layers: W = ½ Ã_self, C = ½ A_cross — so the image part is half
    the (head-averaged) cross-attention that the 'attention' method reports, rows sum to 1."""
    cap = cl.build_captioner("transformer", encoder="shapes", vocab=WORDS, hidden_size=16, embed_size=16,
                             encoder_options={"image_size": 32}, architecture_options={"layers": 1, "heads": 4})
    cap.model.double()
    roll = explain(cap, image(), CAPTION, method="rollout")
    attention = explain(cap, image(), CAPTION, method="attention")
    assert torch.allclose(roll.grid, attention.grid / 2, atol=1e-12)
    assert torch.allclose(roll.grid.sum(dim=(1, 2)) + roll.preceding.sum(1), torch.ones(len(CAPTION), dtype=torch.float64), atol=1e-12)
    captured = []
    layer = cap.model.decoder.layers[0].self_attention
    handle = layer.weights.register_forward_hook(lambda m, i, out: captured.append(out.mean(1)[0]))
    cap.model.run(cap.preprocess([image()]).double(), torch.tensor([cap.vocab.encode(CAPTION)[:-1]]))
    handle.remove()
    mixing = (captured[0] + torch.eye(len(CAPTION) + 1, dtype=torch.float64)) / 2
    assert torch.allclose(roll.preceding, mixing[: len(CAPTION)] / 2, atol=1e-12)
    # with encoder layers the cells are mixed too, and every row still sums to 1
    deep = explain(captioner(encoder_layers=2), image(), CAPTION, method="rollout")
    assert torch.allclose(deep.grid.sum(dim=(1, 2)) + deep.preceding.sum(1), torch.ones(len(CAPTION), dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_trains_and_explains_a_transformer(tiny_shapes, tmp_path):
    runner = CliRunner()
    weights = tmp_path / "encoder.safetensors"
    result = runner.invoke(app, ["pretrain-encoder", "--out", str(weights), "--images", "24", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tiny_shapes), "--arch", "transformer", "--out", str(run),
                                 "--layers", "2", "--heads", "4", "--d-model", "32", "--encoder-layers", "1",
                                 "--epochs", "1", "--batch-size", "20", "--encoder-weights", str(weights)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())["captioner"]
    assert config["architecture_options"] == {"layers": 2, "heads": 4, "encoder_layers": 1}
    assert config["hidden_size"] == config["embed_size"] == 32 and config["dropout"] == 0.1
    picture = sorted((tiny_shapes / "images").glob("*.png"))[0]
    result = runner.invoke(app, ["explain", "--model", str(run), str(picture), "--methods", "lrp,rollout,attention",
                                 "--attention-rule", "attnlrp", "--caption", "a red circle", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "x" / picture.stem / "explanation.json").read_text())["methods"]
    assert saved["lrp"]["parameters"]["attention_rule"] == "attnlrp"
    assert len(saved["lrp"]["extra"]["positions"]) == 3 and len(saved["rollout"]["preceding"]) == 3
    bad = runner.invoke(app, ["train", "--data", str(tiny_shapes), "--arch", "gridtd", "--out", str(tmp_path / "g"),
                              "--layers", "2", "--epochs", "1", "--encoder-weights", str(weights)])
    assert bad.exit_code != 0 and "takes no option layers" in bad.output

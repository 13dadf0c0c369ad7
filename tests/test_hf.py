"""Hugging Face captioners (issue 24): VisionEncoderDecoder (ViT + GPT-2), BLIP, GIT and LLaVA, each
built here from a tiny config with random weights, saved with ``save_pretrained`` and loaded through
the user's path (``cl.from_hf(folder)``, ``captionlens import hf``). What is checked: every method on
every family, conservation (the audit), the explained forward equal to the model's own, all tokens in
one backward equal to each alone, SDPA equal to eager, gradients equal to autograd, a planted patch
that must get the relevance, AttnLRP against lxt's on GPT-2's weights, and clear errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import captionlens as cl

transformers = pytest.importorskip("transformers")  # the hf extra: in the test extra, so CI runs all of this

FAMILIES = ("vision-encoder-decoder", "blip", "git", "llava")
WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "small", "big", "and", "left", "of", "the",
         "image", "describe", "user", "assistant", ":"]
SIZE, PATCH, WIDTH = 32, 8, 32


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


VOCAB = 5 + len(WORDS)
VISION = dict(image_size=SIZE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(family: str, attn: str = "eager", vision_layers: int = 2):
    """A tiny model of ``family`` with random weights (std 0.3, so the image matters at this size)."""
    T = transformers
    torch.manual_seed(0)
    vision = dict(VISION, num_hidden_layers=vision_layers)
    if family == "vision-encoder-decoder":
        config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            T.ViTConfig(**vision), T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=2, n_head=4,
                                                add_cross_attention=True, is_decoder=True, **IDS))
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
        model = T.VisionEncoderDecoderModel(config)
    elif family == "blip":
        model = T.BlipForConditionalGeneration(T.BlipConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, sep_token_id=2, **IDS),
            vision_config=vision, projection_dim=16))
    elif family == "git":
        model = T.GitForCausalLM(T.GitConfig(vision_config=vision, vocab_size=VOCAB, hidden_size=WIDTH,
                                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=64, **IDS))
    else:
        model = T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**vision).to_dict(),
            text_config=T.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      **IDS).to_dict(),
            image_token_index=4, projector_hidden_act="gelu", vision_feature_layer=-2))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    model.set_attn_implementation(attn)
    return model.eval()


PROMPT = "user : <image> describe the image assistant :"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family saved as a user would have it: save_pretrained model, tokenizer and image processor."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for family in FAMILIES:
        folder = root / family
        build(family).save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5, 0.4, 0.3],
                                       image_std=[0.25, 0.25, 0.25]).save_pretrained(folder)
        made[family] = folder
    return made


def captioner(folders, family: str):
    return cl.from_hf(folders[family], prompt=PROMPT if family == "llava" else None, max_length=5)


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 52, 3), dtype=np.uint8)


CAPTION = ["a", "red", "circle", "and", "a", "star"]


# ------------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_captions_and_explains_with_every_method(folders, family):
    cap = captioner(folders, family)
    assert cap.settings.image_size == SIZE and cap.settings.mean == [0.5, 0.4, 0.3]
    caption = cap.caption([picture()], beam_size=2)[0]
    assert caption.token_ids[0] == cap.settings.start_id and caption.token_ids[-1] == cap.settings.end_id
    assert len(caption.words) == len(caption.token_ids) - 2 and np.isfinite(caption.score)
    methods = cl.methods_for(cap.model)
    assert set(methods) == {"attention", "gradcam", "gradient_x_input", "lrp", "rollout"}  # no ReLUs: no guided ones
    side = SIZE // PATCH
    for method in methods:
        exp = cl.explain(cap, picture(), CAPTION, method=method)
        assert exp.words == CAPTION and exp.image.shape == (6, SIZE, SIZE) and exp.grid.shape == (6, side, side)
        assert exp.preceding.shape == (6, 7) and torch.isfinite(exp.image).all()
        assert exp.preceding[:, :].triu(2).abs().max() == 0  # no relevance from words after the explained one
    exp = cl.explain(cap, picture(), caption, method="lrp")  # the model's own caption, by its token ids
    assert exp.words == caption.words


@pytest.mark.parametrize("family", FAMILIES)
def test_the_audit_passes_on_every_family(folders, family):
    """Biases zeroed, ε → 0: what reaches the pixels, the words, the prompt and the learned constants
    (positions, CLS) is the logit, module by module and operation by operation."""
    report = cl.audit_lrp(captioner(folders, family), picture(1), CAPTION)
    assert report.passed, [(r.name, r.created) for r in report.flagged]
    assert abs(report.conservation - 1) < 1e-6 and report.pixels != 0 and report.embeddings != 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_explained_forward_is_the_model_s_own(folders, family):
    """The logits captionlens explains are the Hugging Face model's, and stay so while LRP's rules run."""
    from captionlens.explain.canonize import canonized
    from captionlens.explain.rules import LRPParameters

    cap = captioner(folders, family)
    pixels = cap.preprocess([picture()])
    _, ids = cap.caption_ids(CAPTION)
    fed = torch.tensor([ids[:-1]])
    model = cap.model
    with torch.no_grad():
        direct = model.hf(**model._inputs(pixels, fed)).logits[:, -fed.shape[1]:]
        assert torch.allclose(model(pixels, fed), direct, atol=1e-5)
    with canonized(model, parameters=LRPParameters()), torch.enable_grad():
        explained = model(pixels, fed)
    assert torch.allclose(explained, direct, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


@pytest.mark.parametrize("family", ["vision-encoder-decoder", "llava"])
@pytest.mark.parametrize("method", ["lrp", "gradient_x_input"])
def test_all_tokens_at_once_equal_each_token_alone(folders, family, method):
    cap = captioner(folders, family)
    together = cl.explain(cap, picture(), CAPTION, method=method, attention_rule="attnlrp") if method == "lrp" else \
        cl.explain(cap, picture(), CAPTION, method=method)
    for k in (0, 3, 5):
        kwargs = {"attention_rule": "attnlrp"} if method == "lrp" else {}
        alone = cl.explain(cap, picture(), CAPTION, method=method, words=[k], **kwargs)
        scale = float(together.image[k].abs().max()) + 1e-12
        assert (alone.image[0] - together.image[k]).abs().max() <= 1e-4 * scale
        assert torch.allclose(alone.preceding[0], together.preceding[k], atol=1e-5)


def test_sdpa_and_eager_give_the_same_explanation(folders, tmp_path):
    """The model as loaded (SDPA) and as its eager twin: one explanation (captionlens explains every
    attention through its eager path, the same function)."""
    for family in ("vision-encoder-decoder", "llava"):
        explanations = []
        for attn in ("sdpa", "eager"):
            model = build(family, attn)
            cap = cl.from_hf(model, word_tokenizer(), prompt=PROMPT if family == "llava" else None)
            assert cap.model.hf.config._attn_implementation == attn
            explanations.append(cl.explain(cap, picture(), CAPTION, method="lrp"))
        assert torch.allclose(explanations[0].image, explanations[1].image, atol=1e-6)
        assert torch.allclose(explanations[0].preceding, explanations[1].preceding, atol=1e-6)


def test_gradient_methods_equal_autograd_on_the_model_itself(folders):
    cap = captioner(folders, "vision-encoder-decoder")
    exp = cl.explain(cap, picture(), CAPTION, method="gradient_x_input")
    _, ids = cap.caption_ids(CAPTION)
    for k in (0, 4):
        pixels = cap.preprocess([picture()]).requires_grad_(True)
        logits = cap.model.hf(pixel_values=pixels, decoder_input_ids=torch.tensor([ids[:-1]])).logits
        logits[0, k, ids[k + 1]].backward()
        expected = (pixels.grad * pixels.detach())[0].sum(0)
        assert torch.allclose(exp.image[k], expected, atol=1e-5 * float(expected.abs().max()))


def test_a_decoder_that_can_only_see_one_patch_gets_its_relevance_there():
    """A planted VisionEncoderDecoder: the ViT adds nothing (its blocks write zeros into the residual),
    positions, CLS and biases are 0 and the image is black but for patch (1, 2): the decoder can only
    copy that patch's token. LRP must put ≥ 90% of the image relevance on its pixels — and in the grid
    cell at row 1, column 2 (the tap's layout is right)."""
    model = build("vision-encoder-decoder", vision_layers=1)
    with torch.no_grad():
        vit = model.encoder
        for layer in vit.layers:  # each block writes zeros into the residual stream
            layer.attention.o_proj.weight.zero_()
            layer.mlp.fc2.weight.zero_()
        vit.embeddings.position_embeddings.zero_()
        vit.embeddings.cls_token.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    cap = cl.from_hf(model, word_tokenizer())
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    row, col = 1, 2
    image[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = picture(3)[:PATCH, :PATCH]
    cap.settings.mean[:] = [0.0, 0.0, 0.0]  # black is 0 after normalisation: the other patches are all zero
    cap.model.encoder.mean = (0.0, 0.0, 0.0)
    exp = cl.explain(cap, image, CAPTION, method="lrp")
    inside = exp.image[:, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].abs().sum(dim=(1, 2))
    assert (inside / exp.image.abs().sum(dim=(1, 2))).min() >= 0.9
    grid = exp.grid.abs()
    assert (grid[:, row, col] / grid.sum(dim=(1, 2))).min() >= 0.9


# ------------------------------------------------------------------------------------ against lxt
def test_attnlrp_equals_lxt_on_the_gpt2_decoder(folders):
    """lxt 2.1's explicit AttnLRP functions, written over the same GPT-2 decoder's weights (its
    self-attention, cross-attention to the image tokens, GELU MLP, LayerNorms): the relevance of each
    image token and of each word's embedding, for each word's logit, equals captionlens's."""
    import lxt.explicit.functional as lf
    from lxt.explicit.rules import identity

    cap, epsilon = captioner(folders, "vision-encoder-decoder"), 1e-10
    cap.model.hf.double()
    hf = cap.model.hf
    pixels = cap.preprocess([picture(2)]).double()
    _, ids = cap.caption_ids(CAPTION)
    fed = torch.tensor([ids[:-1]])
    exp = cl.explain(cap, picture(2), CAPTION, method="lrp", epsilon=epsilon, attention_rule="attnlrp")
    with torch.no_grad():
        tokens = hf.encoder(pixel_values=pixels).last_hidden_state  # [1, 1 + 16, C]
    gpt = hf.decoder.transformer

    def conv1d(x, layer):  # GPT-2's Conv1D: x W + b with W [in, out]
        return lf.linear_epsilon(x, layer.weight.T, layer.bias, epsilon)

    def norm(x, layer):
        return lf.layer_norm_grad_fn.apply(x, layer.weight, layer.bias, layer.eps, epsilon)

    def heads(t, n=4):
        return t.unflatten(-1, (n, -1)).transpose(1, 2)

    def attention(module, x, source, causal):
        if source is None:
            q, k, v = conv1d(x, module.c_attn).split(WIDTH, dim=2)
        else:
            q = conv1d(x, module.q_attn)
            k, v = conv1d(source, module.c_attn).split(WIDTH, dim=2)
        q = lf.mul2(heads(q), torch.tensor(module.scaling, dtype=x.dtype))
        scores = lf.matmul(q, heads(k).transpose(-1, -2), epsilon=epsilon)
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        context = lf.matmul(lf.softmax(scores, -1), heads(v), epsilon=epsilon)
        return conv1d(context.transpose(1, 2).flatten(2), module.c_proj)

    image = tokens.clone().requires_grad_(True)
    embeddings = gpt.wte(fed).detach().requires_grad_(True)
    positions = gpt.wpe(torch.arange(fed.shape[1])).unsqueeze(0).detach().requires_grad_(True)
    for k in range(len(CAPTION)):
        x = lf.add2(embeddings, positions, epsilon=epsilon)
        for block in gpt.h:
            x = lf.add2(x, attention(block.attn, norm(x, block.ln_1), None, True), epsilon=epsilon)
            x = lf.add2(x, attention(block.crossattention, norm(x, block.ln_cross_attn), image, False), epsilon=epsilon)
            mlp = block.mlp
            hidden = identity(mlp.act, conv1d(norm(x, block.ln_2), mlp.c_fc))
            x = lf.add2(x, conv1d(hidden, mlp.c_proj), epsilon=epsilon)
        logit = lf.linear_epsilon(norm(x, gpt.ln_f), hf.decoder.lm_head.weight, None, epsilon)[0, k, ids[k + 1]]
        image_r, words_r, positions_r = torch.autograd.grad(logit, [image, embeddings, positions], logit.detach())
        scale = float(image_r.abs().sum() + words_r.abs().sum())
        assert float(exp.score[k]) == pytest.approx(float(logit), rel=1e-6)
        patches = image_r[0, 1:].sum(-1).reshape(SIZE // PATCH, SIZE // PATCH)
        assert (exp.grid[k].double() - patches).abs().max() <= 1e-4 * scale
        assert (exp.preceding[k, : k + 1].double() - words_r[0, : k + 1].sum(-1)).abs().max() <= 1e-4 * scale


# ------------------------------------------------------------------------------------ run folders and the CLI
def test_import_hf_makes_a_run_folder_every_verb_takes(folders, tiny_shapes, tmp_path):
    from fastapi.testclient import TestClient

    from captionlens.cli import app
    from captionlens.viewer.app import create_app

    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["import", "hf", "--model", str(folders["git"]), "--out", str(run)])
    assert result.exit_code == 0, result.output
    loaded = cl.load(run)
    assert loaded.fingerprint() == cl.from_hf(folders["git"]).fingerprint()  # the same model and settings
    image = sorted((tiny_shapes / "images").glob("*.png"))[-1]
    result = runner.invoke(app, ["caption", "--model", str(run), str(image), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["words"], result.output
    result = runner.invoke(app, ["explain", "--model", str(run), str(image), "--out", str(tmp_path / "x"),
                                 "--methods", "lrp,gradcam,attention,rollout"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["audit", "--model", str(run), str(image)])
    assert result.exit_code == 0 and "passed" in result.output, result.output
    result = runner.invoke(app, ["explain-split", "--model", str(run), "--data", str(tiny_shapes), "--store",
                                 str(tmp_path / "s.zarr"), "--limit", "3", "--methods", "lrp,attention",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["hallucination", "--model", str(run), "--data", str(tiny_shapes), "--out",
                                 str(tmp_path / "h"), "--limit", "4", "--min-count", "0", "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", "--run", str(run), "--images", str(image), "--out",
                                 str(tmp_path / "r.html"), "--methods", "lrp,attention"])
    assert result.exit_code == 0, result.output
    client = TestClient(create_app(loaded, tiny_shapes))
    first = client.get("/api/images").json()[0]["id"]
    words = client.post("/api/caption", data={"image_id": first}).json()["words"]
    if words:
        answer = client.post("/api/explain", json={"image_id": first, "word_index": 0, "method": "lrp"})
        assert answer.status_code == 200, answer.text


# ------------------------------------------------------------------------------------ refused clearly
def test_what_cannot_be_loaded_is_named(folders, tmp_path):
    from captionlens.models.hf import HFLoadError

    with pytest.raises(HFLoadError, match="no Hugging Face model folder"):
        cl.from_hf(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFLoadError, match="config.json"):
        cl.from_hf(empty)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(folders["blip"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(HFLoadError, match="no weights"):
        cl.from_hf(broken)
    shutil.copytree(folders["blip"], tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFLoadError, match="cannot be loaded"):
        cl.from_hf(tmp_path / "cut")
    shutil.copytree(folders["blip"], tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "no-tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(HFLoadError, match="tokenizer"):
        cl.from_hf(tmp_path / "no-tokenizer")
    text_only = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    text_only.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(HFLoadError, match="GPT2LMHeadModel"):
        cl.from_hf(tmp_path / "gpt2")
    result = CliRunner().invoke(__import__("captionlens.cli", fromlist=["app"]).app,
                                ["import", "hf", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "GPT2LMHeadModel" in result.output and "Traceback" not in result.output


def test_compiled_and_quantised_models_are_refused():
    from captionlens.errors import UnsupportedModel

    model = build("vision-encoder-decoder")
    with pytest.raises(UnsupportedModel, match="torch.compile"):
        cl.from_hf(torch.compile(model), word_tokenizer())
    quantised = copy.deepcopy(model)
    quantised.config.quantization_config = {"load_in_8bit": True}
    with pytest.raises(UnsupportedModel, match="quantised"):
        cl.from_hf(quantised, word_tokenizer())


# ------------------------------------------------------------------------------------ what each part gets
@pytest.mark.parametrize("family", FAMILIES)
def test_relevance_is_split_into_image_words_prompt_and_the_rest(folders, family):
    """With biases zeroed and ε → 0, each token's logit is the sum of what reaches the pixels, the fed
    tokens, the prompt (LLaVA), the learned positions and the learned special tokens (CLS), each
    reported on its own."""
    from captionlens.explain.audit import zero_biases

    cap = captioner(folders, family)
    cap.model = zero_biases(cap.model).double()
    exp = cl.explain(cap, picture(4), CAPTION, method="lrp", epsilon=1e-12)
    parts = {"positions", "special"} | ({"prompt"} if family == "llava" else set())
    assert parts <= set(exp.extra)
    total = exp.image.sum(dim=(1, 2)) + exp.preceding.sum(dim=1) + sum(exp.extra[p] for p in parts)
    assert torch.allclose(total, exp.score, rtol=1e-6, atol=1e-9)
    assert all(exp.extra[p].abs().sum() > 0 for p in parts)


def test_tokens_of_a_word_merge_by_summing(folders):
    """A WordPiece tokenizer cuts "circle" into "circ" + "##le": merged, the word's row is the sum of its
    tokens' rows and its column the sum of their columns, so nothing is lost."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "a", "red", "circ", "##le", "and", "star"]
    wordpiece = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    cap = cl.from_hf(build("vision-encoder-decoder"), tokenizer)
    exp = cl.explain(cap, picture(), "a red circle and a star", method="lrp")
    assert exp.words == ["a", "red", "circ", "##le", "and", "a", "star"]
    merged = cap.merge_words(exp)
    assert merged.words == ["a", "red", "circle", "and", "a", "star"] and merged.tokens[3] == "circle"
    assert torch.allclose(merged.image[2], exp.image[2] + exp.image[3])
    assert torch.allclose(merged.score[2], exp.score[2] + exp.score[3])
    assert torch.allclose(merged.preceding.sum(dim=1), torch.stack(
        [exp.preceding[0].sum(), exp.preceding[1].sum(), exp.preceding[2:4].sum(), *exp.preceding[4:].sum(dim=1)]))
    assert torch.allclose(merged.preceding[5, 3], exp.preceding[6, 3] + exp.preceding[6, 4])

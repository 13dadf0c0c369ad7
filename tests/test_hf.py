"""Hugging Face captioners (issue 24): VisionEncoderDecoder (ViT + GPT-2), BLIP, GIT and LLaVA, each
built here from a tiny config with random weights, saved with ``save_pretrained`` and loaded through
the user's path (``cl.from_hf(folder)``, ``captionlens import hf``). What is checked: every method on
every family, conservation (the audit), the explained forward equal to the model's own, all tokens in
one backward equal to each alone, SDPA equal to eager, gradients equal to autograd, a planted patch
that must get the relevance, AttnLRP against lxt's end to end (ViT + GPT-2, CLIP + LLaMA), and clear
errors."""
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
def test_every_family_explains_with_its_vision_model_in_bfloat16(folders, family, monkeypatch):
    """precision="bf16-vision": the vision model computes in bfloat16, its outputs (a Hugging Face
    output of several tensors) reach the float32 language model in float32, the relevance goes back.
    precision="auto" on bfloat16 hardware runs all of a Hugging Face captioner in bf16 (its language
    model holds much of the work)."""
    from captionlens.explain import explainer

    cap = captioner(folders, family)
    monkeypatch.setattr(explainer, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert cl.explain(cap, picture(), CAPTION[:2], method="lrp", precision="auto").parameters["precision"] == "bf16"
    monkeypatch.setattr(explainer, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cl.explain(cap, picture(), CAPTION[:2], method="lrp", precision="auto").parameters["precision"] == "fp32"
    full = cl.explain(cap, picture(), CAPTION, method="lrp")
    fast = cl.explain(cap, picture(), CAPTION, method="lrp", precision="bf16-vision")
    converted = cap._reduced_precision["bf16-vision"][1]
    assert {p.dtype for p in converted.vision_module().parameters()} == {torch.bfloat16}
    assert {p.dtype for p in converted.language_model().parameters()} == {torch.float32}
    assert fast.parameters["precision"] == "bf16-vision" and fast.image.dtype == torch.float32
    for row in range(len(CAPTION)):
        assert torch.corrcoef(torch.stack([full.image[row].flatten(), fast.image[row].flatten()]).double())[0, 1] > 0.95


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
# lxt 2.1's explicit AttnLRP functions (each a torch.autograd.Function whose backward is the rule, the
# gradient being the relevance), written here over the same weights, end to end from the patch
# embedding to the word's logit. lxt has no convolution rule: the patch embedding (the pixel layer,
# α = 1, β = 0) is written below from its equation.
EPSILON = 1e-10


def alpha_one_beta_zero_patches(pixels: torch.Tensor, conv: torch.nn.Conv2d, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = Σ_j (x_i w_ij)⁺ / Σ_i' (x_i' w_i'j)⁺ · R_j for a patch embedding (kernel = stride), biases
    left out: pixels [1, 3, H, W], relevance [1, C, h, w] at the convolution's output -> [H, W]."""
    p = conv.kernel_size[0]
    patches = torch.nn.functional.unfold(pixels, p, stride=p)[0].T  # [h·w, 3·p·p]
    products = (patches[:, None, :] * conv.weight.flatten(1)[None]).clamp(min=0)  # [h·w, C, 3·p·p]
    shares = products / (products.sum(-1, keepdim=True) + 1e-12) * relevance[0].flatten(1).T[:, :, None]
    per_pixel = torch.nn.functional.fold(shares.sum(1).T[None], pixels.shape[-2:], p, stride=p)
    return per_pixel[0].sum(0)


def lxt_linear(x, layer):
    return lf().linear_epsilon(x, layer.weight, layer.bias, EPSILON)


def lxt_layer_norm(x, layer):
    return lf().layer_norm_grad_fn.apply(x, layer.weight, layer.bias, layer.eps, EPSILON)


def lxt_heads(t, width):
    return t.unflatten(-1, (-1, width)).transpose(1, 2)  # [B, S, H·d] -> [B, H, S, d]


def lxt_attention(q, k, v, scaling, causal):
    """softmax(q kᵀ · scaling) v with AttnLRP's rules: q, k, v [B, H, S, d] -> [B, S, H·d]."""
    f = lf()
    scores = f.mul2(f.matmul(q, k.transpose(-1, -2), epsilon=EPSILON), torch.tensor(scaling, dtype=q.dtype))
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1 + scores.shape[-1] - scores.shape[-2])
        scores = scores.masked_fill(future, float("-inf"))
    return f.matmul(f.softmax(scores, -1), v, epsilon=EPSILON).transpose(1, 2).flatten(2)


def lf():
    import lxt.explicit.functional

    return lxt.explicit.functional


def lxt_identity(function, x):
    from lxt.explicit.rules import identity

    return identity(function, x)


def assert_equal_relevance(ours: torch.Tensor, reference: torch.Tensor, scale: float) -> None:
    assert (ours.double() - reference).abs().max() <= 1e-4 * scale, (ours, reference)


def test_attnlrp_equals_lxt_on_vit_gpt2_end_to_end(folders):
    """ViT blocks (CLS, learned positions, LayerNorms, attention, GELU MLP) and GPT-2 blocks (Conv1D,
    causal self-attention, cross-attention to the image tokens): for each word's logit, the relevance
    of every pixel, every patch token, the CLS token, the positions and each earlier word equals lxt's."""
    cap = captioner(folders, "vision-encoder-decoder")
    cap.model.hf.double()
    hf, f = cap.model.hf, lf()
    pixels = cap.preprocess([picture(2)]).double()
    _, ids = cap.caption_ids(CAPTION)
    fed = torch.tensor([ids[:-1]])
    exp = cl.explain(cap, picture(2), CAPTION, method="lrp", epsilon=EPSILON, attention_rule="attnlrp")
    vit, gpt = hf.encoder, hf.decoder.transformer
    d = WIDTH // 4

    with torch.no_grad():
        conv = vit.embeddings.patch_embeddings.projection
        patch_out = conv(pixels)  # [1, C, h, w]

    def reference(word: int):
        """The graph anew for each word (lxt's backward functions free what they saved)."""
        patch_leaf = patch_out.clone().requires_grad_(True)
        cls = vit.embeddings.cls_token.detach().clone().requires_grad_(True)
        vit_positions = vit.embeddings.position_embeddings.detach().clone().requires_grad_(True)
        x = f.add2(torch.cat([cls, patch_leaf.flatten(2).transpose(1, 2)], 1), vit_positions, epsilon=EPSILON)
        for layer in vit.layers:
            a, h = layer.attention, lxt_layer_norm(x, layer.layernorm_before)
            context = lxt_attention(*(lxt_heads(lxt_linear(h, m), d) for m in (a.q_proj, a.k_proj, a.v_proj)), a.scaling, False)
            x = f.add2(x, lxt_linear(context, a.o_proj), epsilon=EPSILON)
            hidden = lxt_identity(layer.mlp.activation_fn, lxt_linear(lxt_layer_norm(x, layer.layernorm_after), layer.mlp.fc1))
            x = f.add2(x, lxt_linear(hidden, layer.mlp.fc2), epsilon=EPSILON)
        image = lxt_layer_norm(x, vit.layernorm)  # [1, 1 + h·w, C]: the tokens at the tap

        def conv1d(x, layer):  # GPT-2's Conv1D: x W + b with W [in, out]
            return f.linear_epsilon(x, layer.weight.T, layer.bias, EPSILON)

        def gpt_attention(module, x, source):
            if source is None:
                q, k, v = conv1d(x, module.c_attn).split(WIDTH, dim=2)
            else:
                q, (k, v) = conv1d(x, module.q_attn), conv1d(source, module.c_attn).split(WIDTH, dim=2)
            return conv1d(lxt_attention(lxt_heads(q, d), lxt_heads(k, d), lxt_heads(v, d), module.scaling, source is None),
                          module.c_proj)

        embeddings = gpt.wte(fed).detach().requires_grad_(True)
        positions = gpt.wpe(torch.arange(fed.shape[1])).unsqueeze(0).detach().requires_grad_(True)
        x = f.add2(embeddings, positions, epsilon=EPSILON)
        for block in gpt.h:
            x = f.add2(x, gpt_attention(block.attn, lxt_layer_norm(x, block.ln_1), None), epsilon=EPSILON)
            x = f.add2(x, gpt_attention(block.crossattention, lxt_layer_norm(x, block.ln_cross_attn), image), epsilon=EPSILON)
            hidden = lxt_identity(block.mlp.act, conv1d(lxt_layer_norm(x, block.ln_2), block.mlp.c_fc))
            x = f.add2(x, conv1d(hidden, block.mlp.c_proj), epsilon=EPSILON)
        logits = f.linear_epsilon(lxt_layer_norm(x, gpt.ln_f), hf.decoder.lm_head.weight, None, EPSILON)
        logit = logits[0, word, ids[word + 1]]
        return (logit, *torch.autograd.grad(logit, [patch_leaf, cls, vit_positions, image, embeddings, positions], logit.detach()))

    for k in range(len(CAPTION)):
        logit, r_patch, r_cls, r_vit_positions, r_image, r_words, r_positions = reference(k)
        scale = float(r_patch.abs().sum() + r_cls.abs().sum() + r_vit_positions.abs().sum() + r_words.abs().sum())
        assert float(exp.score[k]) == pytest.approx(float(logit.detach()), rel=1e-6)
        assert_equal_relevance(exp.image[k], alpha_one_beta_zero_patches(pixels, conv, r_patch), scale)
        assert_equal_relevance(exp.grid[k], r_image[0, 1:].sum(-1).reshape(SIZE // PATCH, SIZE // PATCH), scale)
        assert_equal_relevance(exp.preceding[k, : k + 1], r_words[0, : k + 1].sum(-1), scale)
        assert_equal_relevance(exp.extra["special"][k], r_cls.sum(), scale)
        assert_equal_relevance(exp.extra["positions"][k], r_vit_positions.sum() + r_positions.sum(), scale)


def test_attnlrp_equals_lxt_on_llava_end_to_end(folders):
    """CLIP blocks (pre-LayerNorm, QuickGELU, the second-to-last layer's patch tokens), the projector
    and LLaMA decoder layers (RMSNorm, rotary positions, grouped-query attention, the gated SiLU MLP) in
    LLaVA's conversation: for each word's logit, the relevance of every pixel, every image token, CLS,
    the positions, the prompt and each earlier word equals lxt's."""
    cap = captioner(folders, "llava")
    cap.model.hf.double()
    hf, f = cap.model.hf, lf()
    pixels = cap.preprocess([picture(3)]).double()
    _, ids = cap.caption_ids(CAPTION)
    full = cap.model._full_ids(torch.tensor([ids[:-1]]))
    exp = cl.explain(cap, picture(3), CAPTION, method="lrp", epsilon=EPSILON, attention_rule="attnlrp")
    clip, llama = hf.model.vision_tower, hf.model.language_model
    d = WIDTH // 4

    with torch.no_grad():
        conv = clip.embeddings.patch_embedding
        patch_out = conv(pixels)
    start = full.shape[1] - (len(ids) - 1)  # the fed tokens: the prompt's last token, then the caption's
    prompt = [i for i in range(start) if int(full[0, i]) != hf.config.image_token_id]
    def reference(word: int):
        """The graph anew for each word (lxt's backward functions free what they saved)."""
        patch_leaf = patch_out.clone().requires_grad_(True)
        cls = clip.embeddings.class_embedding.detach().expand(1, 1, -1).clone().requires_grad_(True)
        clip_positions = clip.embeddings.position_embedding.weight.detach()[None].clone().requires_grad_(True)
        x = f.add2(torch.cat([cls, patch_leaf.flatten(2).transpose(1, 2)], 1), clip_positions, epsilon=EPSILON)
        x = lxt_layer_norm(x, clip.pre_layrnorm)
        for layer in clip.encoder.layers[:-1]:  # vision_feature_layer = -2: the output of all but the last
            a, h = layer.self_attn, lxt_layer_norm(x, layer.layer_norm1)
            context = lxt_attention(*(lxt_heads(lxt_linear(h, m), d) for m in (a.q_proj, a.k_proj, a.v_proj)), a.scale, False)
            x = f.add2(x, lxt_linear(context, a.out_proj), epsilon=EPSILON)
            hidden = lxt_identity(layer.mlp.activation_fn, lxt_linear(lxt_layer_norm(x, layer.layer_norm2), layer.mlp.fc1))
            x = f.add2(x, lxt_linear(hidden, layer.mlp.fc2), epsilon=EPSILON)
        image = x[:, 1:]  # [1, h·w, C]: the tokens at the tap (the projector's input)
        projector = hf.model.multi_modal_projector
        projected = lxt_linear(lxt_identity(projector.act, lxt_linear(image, projector.linear_1)), projector.linear_2)

        embeddings = llama.embed_tokens(full).detach().requires_grad_(True)
        x = embeddings.masked_scatter((full == hf.config.image_token_id)[..., None], projected)
        cos, sin = llama.rotary_emb(x, torch.arange(full.shape[1])[None])
        half = d // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).double()

        def rotary(t):  # t·cos + rotate_half(t)·sin, rotate_half's sign folded into the constant
            swapped = torch.cat([t[..., half:], t[..., :half]], -1)
            return f.add2(f.mul2(t, cos[:, None]), f.mul2(swapped, sign * sin[:, None]), epsilon=EPSILON)

        def rms(t, norm):
            return f.rms_norm_identity(t, norm.weight, norm.variance_epsilon)

        for layer in llama.layers:
            a, h = layer.self_attn, rms(x, layer.input_layernorm)
            q, k, v = (lxt_heads(lxt_linear(h, m), d) for m in (a.q_proj, a.k_proj, a.v_proj))
            groups = q.shape[1] // k.shape[1]
            k, v = rotary(k).repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            x = f.add2(x, lxt_linear(lxt_attention(rotary(q), k, v, a.scaling, True), a.o_proj), epsilon=EPSILON)
            m, h = layer.mlp, rms(x, layer.post_attention_layernorm)
            gated = f.mul2(lxt_identity(m.act_fn, lxt_linear(h, m.gate_proj)), lxt_linear(h, m.up_proj))
            x = f.add2(x, lxt_linear(gated, m.down_proj), epsilon=EPSILON)
        logits = lxt_linear(rms(x, llama.norm), hf.lm_head)
        logit = logits[0, start + word, ids[word + 1]]
        return (logit, *torch.autograd.grad(logit, [patch_leaf, cls, clip_positions, image, embeddings], logit.detach()))

    for k in range(len(CAPTION)):
        logit, r_patch, r_cls, r_clip_positions, r_image, r_words = reference(k)
        scale = float(r_patch.abs().sum() + r_cls.abs().sum() + r_clip_positions.abs().sum() + r_words.abs().sum())
        # LLaMA's RMSNorm and softmax compute in float32 even in a float64 model
        assert float(exp.score[k]) == pytest.approx(float(logit.detach()), rel=1e-4, abs=1e-5)
        assert_equal_relevance(exp.image[k], alpha_one_beta_zero_patches(pixels, conv, r_patch), scale)
        assert_equal_relevance(exp.grid[k], r_image[0].sum(-1).reshape(SIZE // PATCH, SIZE // PATCH), scale)
        assert_equal_relevance(exp.preceding[k, : k + 1], r_words[0, start: start + k + 1].sum(-1), scale)
        assert_equal_relevance(exp.extra["prompt"][k], r_words[0, prompt].sum(), scale)
        assert_equal_relevance(exp.extra["special"][k], r_cls.sum(), scale)
        assert_equal_relevance(exp.extra["positions"][k], r_clip_positions.sum(), scale)


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

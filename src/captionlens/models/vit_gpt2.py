"""A ViT-GPT2 captioner built from a small config, to be trained from scratch in the shapes world: the
Hugging Face architecture of ``nlpconnect/vit-gpt2-image-captioning`` at the size of the papers' demo.

    patches  x_p = E · patch(I) + e_pos           a 64 px image, 8 px patches: an 8×8 grid (+ CLS)
    ViT      z   = Transformer_enc(x_p)           ``encoder_layers`` pre-LN self-attention blocks [B, 65, D]
    GPT-2    h_t = Transformer_dec(w_<t ; z)      ``layers`` causal blocks, each with cross-attention to z
    scores_t     = W_e^T h_t                      the word embedding, tied, reads the logits out [B, T, V]

The model is ``transformers.VisionEncoderDecoderModel`` itself (nothing here runs a forward): this file
only chooses its sizes, builds a word-level tokenizer over captionlens's vocabulary (one token per word,
ids equal to the vocabulary's, ``<start>``/``<end>``/``<pad>`` as bos/eos/pad) and wraps both in an
``HFCaptioner``. Every verb then loads the trained run folder as it loads an imported Hugging Face
model, and ``cl.from_hf(run / "hf")`` loads its ``save_pretrained`` folder.

Training (``pipeline.train_pixel_captioner``) is end to end from pixels: the ViT has no pretrained
weights to start from here (no download), and it learns the shapes with the caption loss alone.
"""
from __future__ import annotations

from dataclasses import replace

from ..data.vocab import END, PAD, START, UNK, Vocabulary
from ..extras import require
from .decoder import DecoderOption
from .registry import register_architecture
from .transformer import MAX_LAYERS


@register_architecture("vit-gpt2")
class VitGpt2:
    """The registry entry: its options (the CLI's ``--layers``, ``--heads``, ``--encoder-layers``), its
    default dropout, and ``build``. ``trained_from_pixels``: the pipeline trains the whole model on
    images, not a decoder on cached grid features."""

    trained_from_pixels = True
    default_dropout = 0.1  # GPT-2's residual, embedding and attention dropout
    options = {
        "layers": DecoderOption(int, 2, "decoder layers", 1, MAX_LAYERS),
        "heads": DecoderOption(int, 4, "attention heads, dividing the model width (hidden size)", 1, 4096),
        "encoder_layers": DecoderOption(int, 3, "self-attention layers over the grid cells", 0, MAX_LAYERS),
    }
    patch_size = 8  # an 8×8 grid at 64 px, as the shapes CNN's

    @staticmethod
    def check_installed() -> None:
        """Raise ``MissingExtra`` (naming the hf extra) unless transformers is installed."""
        require("transformers", "hf")

    @classmethod
    def build(cls, vocab: Vocabulary, image_size: int = 64, hidden_size: int = 128, dropout: float = 0.1,
              max_length: int = 20, layers: int = 2, heads: int = 4, encoder_layers: int = 3, device=None):
        """A ViT-GPT2 ``HFCaptioner`` with random weights (seeded by the caller's torch generator): width
        ``hidden_size`` on both sides, ``image_size`` px images in ``patch_size`` px patches, the
        vocabulary's words as tokens."""
        cls.check_installed()
        import transformers

        from .hf import HFCaptioner, settings_for

        layers, heads, encoder_layers = (cls.options[name].check(name, value) for name, value in
                                         (("layers", layers), ("heads", heads), ("encoder_layers", encoder_layers)))
        if hidden_size % heads:
            raise ValueError(f"vit-gpt2: the width {hidden_size} (hidden size) must be a multiple of --heads {heads}")
        if image_size % cls.patch_size:
            raise ValueError(f"vit-gpt2 cuts images into {cls.patch_size} px patches: the image size {image_size} "
                             "must be a multiple of it")
        vision = transformers.ViTConfig(image_size=image_size, patch_size=cls.patch_size, hidden_size=hidden_size,
                                        num_hidden_layers=encoder_layers, num_attention_heads=heads,
                                        intermediate_size=2 * hidden_size)
        text = transformers.GPT2Config(vocab_size=len(vocab), n_positions=max_length + 2, n_embd=hidden_size,
                                       n_layer=layers, n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout,
                                       attn_pdrop=dropout, add_cross_attention=True, is_decoder=True,
                                       bos_token_id=vocab.start_id, eos_token_id=vocab.end_id,
                                       pad_token_id=vocab.pad_id)
        config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vision, text)
        config.decoder_start_token_id, config.pad_token_id = vocab.start_id, vocab.pad_id
        config.eos_token_id, config.bos_token_id = vocab.end_id, vocab.start_id
        model = transformers.VisionEncoderDecoderModel(config)
        tokenizer = word_tokenizer(vocab)  # images: the ViT config's size, normalised to [-1, 1] (mean = std = 0.5)
        settings = replace(settings_for(model, tokenizer, max_length=max_length), architecture="vit-gpt2", encoder="vit")
        return HFCaptioner(model, tokenizer, settings, device)


def word_tokenizer(vocab: Vocabulary):
    """A Hugging Face tokenizer with one token per vocabulary word, at the vocabulary's ids (lower case,
    split on whitespace; an unknown word is ``<unk>``)."""
    tokenizers = require("tokenizers", "hf")
    transformers = require("transformers", "hf")

    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({word: i for i, word in enumerate(vocab.words)},
                                                                 unk_token=UNK))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=START,
                                                eos_token=END, unk_token=UNK)

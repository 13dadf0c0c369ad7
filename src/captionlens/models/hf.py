"""Hugging Face captioners as captionlens captioners: VisionEncoderDecoder (a ViT and a GPT-2), BLIP,
GIT and LLaVA, loaded offline from a ``save_pretrained`` folder (never ``trust_remote_code``).

The model runs as Hugging Face wrote it — no forward is written again here. captionlens only *taps*
it: a hook on the module where the image becomes tokens for the language model (the vision tower's
output; LLaVA's projector input) lays the patch tokens out as a grid ``[B, C, h, w]`` — the grid
Grad-CAM and the attention maps live on, and where the explanation engine keeps (or cuts) the graph.
Leading tokens that are not patches (CLS) stay in the sequence, untouched.

A family is a small declaration (``HFFamily``): which module to tap, how many leading tokens are not
patches, how the fed tokens go in and where their logits come out, which attention looks at the
image. ``HFCaptionModel`` answers the explanation engine's questions (``run_with_grid``, the word
embeddings, the positions) for any of them; ``HFCaptioner`` captions with the model's own
``generate`` and explains every generated token.

Tokens, not words: a captioner with a subword tokenizer explains each token; ``merge_words`` sums the
tokens of a word (their relevance adds up, as relevance does).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.vocab import Vocabulary
from ..errors import CaptionlensError, UnsupportedModel
from ..extras import require
from .captioner import Caption, Captioner, resolve_device
from .decoder import DecoderOutput
from .encoders import Encoder

HF_FORMAT = "captionlens-hf"


class HFLoadError(CaptionlensError, ValueError):
    """A Hugging Face folder that cannot be loaded as a captioner (missing or corrupt files, an
    unsupported model class)."""


# ----------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class HFFamily:
    """How one kind of Hugging Face captioner is tapped and fed (see the module docstring)."""

    name: str
    classes: tuple[str, ...]  # the transformers model classes of the family
    tap: Callable[[nn.Module], nn.Module]  # the module whose output (or first input) holds the image tokens
    tap_input: bool  # True: the tokens are the tapped module's first input (LLaVA's projector)
    extra_tokens: Callable[[nn.Module], int]  # leading tokens at the tap that are not patches (CLS)
    vision: Callable[[nn.Module], nn.Module]  # the vision tower (its first Conv2d sees the pixels)
    text: Callable[[nn.Module], nn.Module]  # the language model (its attention is the image attention)
    inputs: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict]  # HF forward's keyword arguments
    image_in_sequence: bool  # True: image tokens precede the text in one self-attended sequence (GIT, LLaVA)
    config_of: Callable[[nn.Module], object] = lambda hf: hf.config  # where start/end/pad ids live


HF_FAMILIES: dict[str, HFFamily] = {}


def register_hf_family(family: HFFamily) -> HFFamily:
    if family.name in HF_FAMILIES:
        raise ValueError(f"Hugging Face family {family.name!r} is registered twice")
    HF_FAMILIES[family.name] = family
    return family


def _output_tokens(output):
    """The token states a vision tower returns: ``last_hidden_state`` (or the first element)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


register_hf_family(HFFamily(
    name="vision-encoder-decoder", classes=("VisionEncoderDecoderModel",),
    tap=lambda hf: hf.encoder, tap_input=False,
    extra_tokens=lambda hf: 1 if getattr(hf.encoder.embeddings, "cls_token", None) is not None else 0,
    vision=lambda hf: hf.encoder, text=lambda hf: hf.decoder,
    inputs=lambda hf, pixels, ids: {"pixel_values": pixels, "decoder_input_ids": ids},
    image_in_sequence=False))
register_hf_family(HFFamily(
    name="blip", classes=("BlipForConditionalGeneration",),
    tap=lambda hf: hf.vision_model, tap_input=False, extra_tokens=lambda hf: 1,
    vision=lambda hf: hf.vision_model, text=lambda hf: hf.text_decoder,
    inputs=lambda hf, pixels, ids: {"pixel_values": pixels, "input_ids": ids},
    image_in_sequence=False, config_of=lambda hf: hf.config.text_config))
register_hf_family(HFFamily(
    name="git", classes=("GitForCausalLM",),
    tap=lambda hf: hf.git.image_encoder, tap_input=False, extra_tokens=lambda hf: 1,
    vision=lambda hf: hf.git.image_encoder, text=lambda hf: hf.git.encoder,
    inputs=lambda hf, pixels, ids: {"pixel_values": pixels, "input_ids": ids},
    image_in_sequence=True))
register_hf_family(HFFamily(
    name="llava", classes=("LlavaForConditionalGeneration",),
    tap=lambda hf: hf.model.multi_modal_projector, tap_input=True,
    extra_tokens=lambda hf: 0 if hf.config.vision_feature_select_strategy == "default" else 1,
    vision=lambda hf: hf.model.vision_tower, text=lambda hf: hf.model.language_model,
    inputs=lambda hf, pixels, ids: {"pixel_values": pixels, "input_ids": ids},
    image_in_sequence=True, config_of=lambda hf: hf.config.text_config))


def family_of(hf: nn.Module) -> HFFamily:
    name = type(hf).__name__
    for family in HF_FAMILIES.values():
        if name in family.classes:
            return family
    supported = ", ".join(c for f in HF_FAMILIES.values() for c in f.classes)
    raise UnsupportedModel(f"captionlens explains these Hugging Face captioners: {supported}; not {name}")


# ------------------------------------------------------------------------------------ the model
class HFVisionEncoder(Encoder):
    """The vision side as captionlens's ``Encoder``: image size, normalisation, and the patch grid
    ``[B, C, h, w]`` at the tap. ``tower`` is the Hugging Face vision tower itself (shared with the
    model), so its first convolution is the encoder's."""

    def __init__(self, captioner_model: "HFCaptionModel", image_size: int, mean, std, patch: int,
                 channels: int) -> None:
        self.downsampling = patch
        super().__init__(image_size, mean, std)
        self.out_channels = channels
        self.tower = captioner_model.family.vision(captioner_model.hf)
        self._owner = [captioner_model]  # a list: not registered as a submodule (no cycle)

    def options(self) -> dict:
        return {"image_size": self.image_size}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels [B, 3, H, W] -> grid [B, C, h, w]
        """The grid alone (the language model runs on a one-token text: the tap needs its forward)."""
        owner = self._owner[0]
        grids = []
        start = torch.full((pixels.shape[0], 1), owner.start_id, dtype=torch.long, device=pixels.device)
        owner.run_with_grid(pixels, start, lambda grid: grids.append(grid) or grid)
        return grids[0]


class HFCaptionModel(nn.Module):
    """``model(pixels, token_ids) -> logits [B, S, V]`` for a Hugging Face captioner: ``token_ids``
    [B, S] are the fed tokens (the prompt's last token first), ``logits[:, t]`` scores token t+1.

    ``prompt_ids`` are tokens before the fed ones (LLaVA's conversation with its image placeholders);
    their relevance is reported apart (``Explanation.extra["prompt"]``)."""

    relevance_by_operation = True  # LRP's rules attach to its operations (explain/operations.py)
    # what precision="auto" runs where bfloat16 is native: all of it in bf16, since the language model holds
    # much of the work (ViT-GPT2: 0.43x fp32's time, the vision model alone in bf16 only 0.65x)
    auto_precision = "bf16"

    def __init__(self, hf: nn.Module, image_size: int, mean, std, start_id: int, end_id: int, pad_id: int,
                 prompt_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.hf = explainable(hf)
        self.family = family_of(hf)
        self.start_id, self.end_id, self.pad_id = start_id, end_id, pad_id
        self.prompt_ids = list(prompt_ids)
        patch, channels = self._patch_geometry(image_size)
        self.encoder = HFVisionEncoder(self, image_size, mean, std, patch, channels)
        self._records: list | None = None  # attention weights while recording (see attention_records)

    def _patch_geometry(self, image_size: int) -> tuple[int, int]:
        """(patch side, channels at the tap) from the vision tower's first convolution and one blank
        forward (cheap: the sizes, not the values, are read)."""
        conv = next((m for m in self.family.vision(self.hf).modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise UnsupportedModel(f"{type(self.hf).__name__}'s vision tower has no patch convolution")
        patch = conv.stride[0]
        if image_size % patch:
            raise UnsupportedModel(f"the image size {image_size} is not a multiple of the patch size {patch}")
        tokens = []
        tap = self.family.tap(self.hf)
        hook = (tap.register_forward_pre_hook(lambda m, args: tokens.append(args[0]))
                if self.family.tap_input else tap.register_forward_hook(lambda m, i, o: tokens.append(_output_tokens(o))))
        try:
            parameter = next(self.hf.parameters())
            pixels = torch.zeros(1, 3, image_size, image_size, dtype=parameter.dtype, device=parameter.device)
            with torch.no_grad():
                self.hf(**self._inputs(pixels, torch.tensor([[self._start_or_zero()]], device=parameter.device)))
        finally:
            hook.remove()
        return patch, tokens[0].shape[-1]

    def _start_or_zero(self) -> int:
        return getattr(self, "start_id", 0) or 0

    # ------------------------------------------------------------------------- feeding the model
    def image_tokens(self) -> int:
        """How many tokens the image becomes at the tap (extra tokens and patches)."""
        side = self.encoder.image_size // self.encoder.downsampling
        return self.family.extra_tokens(self.hf) + side * side

    def _full_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The prompt (if any) and the fed tokens, as the Hugging Face model takes them."""
        if not self.prompt_ids:
            return token_ids
        prompt = torch.tensor(self.prompt_ids[:-1], dtype=token_ids.dtype, device=token_ids.device)
        return torch.cat([prompt.expand(token_ids.shape[0], -1), token_ids], dim=1)

    def _inputs(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> dict:
        return self.family.inputs(self.hf, pixels, self._full_ids(token_ids))

    @contextlib.contextmanager
    def _tapped(self, on_grid: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the image tokens at the tap pass through ``on_grid`` as a grid."""
        extra = self.family.extra_tokens(self.hf)
        side = self.encoder.image_size // self.encoder.downsampling

        def regrid(tokens: torch.Tensor) -> torch.Tensor:  # [B, extra + h·w, C] -> the same, patches via on_grid
            head, patches = tokens[:, :extra], tokens[:, extra:]
            if patches.shape[1] != side * side:
                raise UnsupportedModel(f"the image became {patches.shape[1]} patch tokens, not {side}×{side}")
            grid = patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)  # [B, C, h, w]
            grid = on_grid(grid)
            return torch.cat([head, grid.flatten(2).transpose(1, 2)], dim=1)

        tap = self.family.tap(self.hf)
        if self.family.tap_input:
            hook = tap.register_forward_pre_hook(lambda m, args: (regrid(args[0]), *args[1:]))
        else:
            def replace(module, inputs, output):
                tokens = regrid(_output_tokens(output))
                if hasattr(output, "last_hidden_state"):
                    output.last_hidden_state = tokens
                    return output
                return (tokens, *output[1:])
            hook = tap.register_forward_hook(replace)
        try:
            yield
        finally:
            hook.remove()

    def run_with_grid(self, pixels: torch.Tensor, token_ids: torch.Tensor, on_grid) -> DecoderOutput:
        return self._run(pixels, token_ids, on_grid)[0]

    def run_with_records(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> tuple[DecoderOutput, list]:
        """``run``, and every attention's weights as it ran: (module name, [B, H, Q, K]) in order."""
        return self._run(pixels, token_ids, lambda grid: grid)

    def _run(self, pixels: torch.Tensor, token_ids: torch.Tensor, on_grid) -> tuple[DecoderOutput, list]:
        records: list[tuple[str, torch.Tensor]] = []
        with self._tapped(on_grid), record_attention(self, records), eager_attention(self.hf):
            output = self.hf(**self._inputs(pixels, token_ids), use_cache=False)
        steps = token_ids.shape[1]
        logits = output.logits[:, -steps:]  # the fed tokens' positions (the image and prompt precede in GIT, LLaVA)
        return DecoderOutput(logits, self._image_attention(records, steps), None), records

    def run(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> DecoderOutput:
        return self.run_with_grid(pixels, token_ids, lambda grid: grid)

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.run(pixels, token_ids).logits

    # --------------------------------------------------------------------------- attention
    def text_attention_modules(self) -> list[tuple[str, nn.Module]]:
        """The language model's attention modules, in order (name, module)."""
        text = self.family.text(self.hf)
        return [(name, module) for name, module in text.named_modules()
                if type(module).__name__.endswith(("Attention", "SelfAttention")) and
                not any(type(child).__name__.endswith(("Attention", "SelfAttention")) for child in module.children())]

    def _image_attention(self, records: list[tuple[str, torch.Tensor]], steps: int) -> torch.Tensor:
        """α [B, S, h·w]: the last text layer's attention from each fed token to the image patches,
        averaged over heads (its cross-attention for VisionEncoderDecoder and BLIP)."""
        extra = self.family.extra_tokens(self.hf)
        patches = self.image_tokens() - extra
        kind = "self" if self.family.image_in_sequence else "cross"
        chosen = [weights for name, weights in records if _attention_kind(name) == kind and "text" in name]
        if not chosen:
            raise UnsupportedModel(f"no {kind}-attention of the language model to the image was seen in "
                                   f"{type(self.hf).__name__}'s forward")
        weights = chosen[-1].mean(dim=1)[:, -steps:]  # [B, S, keys]
        if self.family.image_in_sequence:  # GIT: image tokens first; LLaVA: the placeholders in the prompt
            start = self._image_position()
            weights = weights[:, :, start: start + self.image_tokens()]
        return weights[:, :, extra: extra + patches]

    def _image_position(self) -> int:
        """Where the image's tokens start in the self-attended sequence."""
        if self.family.name == "llava":
            return self.prompt_ids.index(self.hf.config.image_token_id)
        return 0

    # ------------------------------------------------------------- what the explanation engine asks
    @property
    def embedding_module(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def position_modules(self) -> list[nn.Module]:
        """Every embedding table but the words': learned positions (and token types) of the text and
        of the image."""
        words = self.embedding_module
        return [m for m in self.hf.modules() if isinstance(m, nn.Embedding) and m is not words]

    def vision_module(self) -> nn.Module:
        return self.family.vision(self.hf)

    def language_model(self) -> nn.Module:
        """The language model (GPT-2 of a ViT-GPT2, with its cross-attention): what fine-tuning tunes."""
        return self.family.text(self.hf)

    def explained_parts(self) -> list[nn.Module]:
        return [self.hf]


def _attention_kind(name: str) -> str:
    return "cross" if "cross" in name.lower() else "self"


@contextlib.contextmanager
def eager_attention(hf: nn.Module) -> Iterator[None]:
    """Within the block every attention runs its eager path (the same function as SDPA or flash, as
    plain matmul and softmax, which the rules and the attention records see)."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in hf.modules()) if c is not None}
    for config in list(configs.values()):
        for name in ("text_config", "vision_config", "encoder", "decoder"):
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                configs[id(sub)] = sub
    saved = {key: getattr(c, "_attn_implementation", None) for key, c in configs.items()}
    try:
        for config in configs.values():
            if getattr(config, "_attn_implementation", None) not in (None, "eager"):
                config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            if saved[key] is not None:
                config._attn_implementation = saved[key]


@contextlib.contextmanager
def record_attention(model: HFCaptionModel, records: list) -> Iterator[None]:
    """Append (module name, softmax weights [B, H, Q, K]) of every attention module of the model, in
    the order they run, while the block runs."""
    from torch.overrides import TorchFunctionMode

    names = {module: f"{part}.{name}" for part, root in (("text", model.family.text(model.hf)),
                                                          ("vision", model.family.vision(model.hf)))
             for name, module in root.named_modules()}
    running: list[nn.Module] = []
    handles = []
    for module, name in names.items():
        if type(module).__name__.endswith("Attention"):
            handles.append(module.register_forward_pre_hook(lambda m, a: running.append(m) and None))
            handles.append(module.register_forward_hook(lambda m, a, o: running.pop() and None, always_call=True))

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax) and running:
                records.append((names[running[-1]], out.detach()))
            return out

    try:
        with Recorder():
            yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------- tokens
class TokenVocabulary(Vocabulary):
    """A Hugging Face tokenizer's tokens as captionlens's vocabulary: ``words`` are the token strings
    (``"Ġred"``, ``"##s"``: one per id, so a caption's tokens map back to their ids exactly), and
    ``<start>``/``<end>``/``<pad>`` are the model's own ids."""

    def __init__(self, tokenizer, size: int, start_id: int, end_id: int, pad_id: int) -> None:
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        self.words = [t if isinstance(t, str) else f"<id {i}>" for i, t in enumerate(tokens)]
        self._index = {}
        for i, word in enumerate(self.words):
            self._index.setdefault(word, i)
        self.tokenizer = tokenizer
        self.start_id, self.end_id, self.pad_id = start_id, end_id, pad_id
        unk = getattr(tokenizer, "unk_token_id", None)
        self.unk_id = unk if isinstance(unk, int) and 0 <= unk < size else pad_id

    def text(self, tokens: Sequence[str]) -> str:
        """The tokens as the tokenizer writes them out ("a red circle", not "Ġa Ġred Ġcircle")."""
        text = self.tokenizer.convert_tokens_to_string(list(tokens)).strip()
        return text.replace(" ##", "")  # a WordPiece tokenizer without a decoder joins its pieces with spaces

    def word_starts(self, tokens: Sequence[str]) -> list[bool]:
        """Which tokens begin a word: a space marker (GPT-2's "Ġ", SentencePiece's "▁"), or no
        continuation marker (WordPiece's "##"); a word-level tokenizer's every token."""
        starts = []
        for k, token in enumerate(tokens):
            if token.startswith("##"):
                starts.append(False)
            elif any(t.startswith(("Ġ", "▁")) for t in tokens):
                starts.append(k == 0 or token.startswith(("Ġ", "▁")))
            else:
                starts.append(True)
        return starts


# ------------------------------------------------------------------------------- the captioner
@dataclass
class HFSettings:
    """What captionlens keeps about a Hugging Face captioner beside its own files (``config.json``
    of a run folder, under "hf")."""

    family: str
    model_class: str
    vocab_size: int
    image_size: int
    mean: list[float]
    std: list[float]
    start_id: int
    end_id: int
    pad_id: int
    prompt_ids: list[int] = field(default_factory=list)
    max_length: int = 20  # longest caption generated, in tokens
    architecture: str = "hf"  # what tables print as the architecture
    encoder: str = "hf"

    @property
    def name(self) -> str:
        return f"hf:{self.family}"


class HFCaptioner(Captioner):
    """A Hugging Face captioner with captionlens's interface: ``caption`` (the model's own
    ``generate``), ``preprocess``, ``model(pixels, token_ids)``, ``vocab`` (its tokens), ``save``."""

    caches_features = False  # it captions from pixels

    def __init__(self, hf: nn.Module, tokenizer, settings: HFSettings, device=None) -> None:
        self.device = resolve_device(device)
        self.settings = self.config = settings
        model = HFCaptionModel(hf.to(self.device).eval(), settings.image_size, settings.mean, settings.std,
                               settings.start_id, settings.end_id, settings.pad_id, settings.prompt_ids)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab = TokenVocabulary(tokenizer, settings.vocab_size, settings.start_id, settings.end_id,
                                     settings.pad_id)

    # --------------------------------------------------------------------------- captions
    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text`` as this model's tokenizer cuts it (no special tokens)."""
        return self.tokenizer.tokenize(text)

    @torch.no_grad()
    def caption_pixels(self, pixels: torch.Tensor, beam_size: int = 3, max_length: int | None = None) -> list:
        """Captions of normalised pixels [B, 3, H, W] by the model's own ``generate``."""
        self._check_search(beam_size, max_length)
        s, hf, family = self.settings, self.model.hf, self.model.family
        steps = max_length or s.max_length
        pixels = pixels.to(self.device, next(hf.parameters()).dtype)
        start = torch.full((pixels.shape[0], 1), s.start_id, dtype=torch.long, device=self.device)
        kwargs = dict(num_beams=beam_size, max_new_tokens=steps, do_sample=False, eos_token_id=s.end_id,
                      pad_token_id=s.pad_id)
        with eager_attention(hf):
            if family.name == "vision-encoder-decoder":
                sequences = hf.generate(pixel_values=pixels, decoder_start_token_id=s.start_id, **kwargs)
            elif family.name == "blip":  # BLIP's generate starts from its bos and names its own end
                sequences = hf.generate(pixel_values=pixels, num_beams=beam_size, max_new_tokens=steps,
                                        do_sample=False)
            else:
                ids = self.model._full_ids(start)
                if family.name == "llava":  # an image placeholder generated would ask for another image
                    kwargs["suppress_tokens"] = [hf.config.image_token_id]
                sequences = hf.generate(pixel_values=pixels, input_ids=ids, **kwargs)
                sequences = sequences[:, ids.shape[1] - 1:]  # from the start token on
        captions = []
        for row in sequences.tolist():
            tokens = []
            for token in row[1:]:
                if token == s.end_id:
                    break
                if token != s.pad_id:
                    tokens.append(token)
            ids = [s.start_id, *tokens, s.end_id]
            captions.append(Caption([self.vocab.words[t] for t in tokens], ids, float("nan")))
        scores = self.sequence_scores(pixels, captions)
        for caption, score in zip(captions, scores):
            caption.score = score
        return captions

    @torch.no_grad()
    def sequence_scores(self, pixels: torch.Tensor, captions: Sequence) -> list[float]:
        """Log-probability of each caption's tokens and its end (teacher forcing)."""
        longest = max(len(c.token_ids) for c in captions)
        ids = torch.full((len(captions), longest), self.settings.pad_id, dtype=torch.long, device=self.device)
        for row, caption in enumerate(captions):
            ids[row, : len(caption.token_ids)] = torch.tensor(caption.token_ids)
        log_probs = self.model(pixels, ids[:, :-1]).float().log_softmax(dim=-1)
        picked = log_probs.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
        return [float(picked[row, : len(c.token_ids) - 1].sum()) for row, c in enumerate(captions)]

    def caption(self, images, beam_size: int = 3, max_length: int | None = None, batch_size: int = 16) -> list:
        if not isinstance(images, (list, tuple)):
            images = [images]
        self._check_search(beam_size, max_length)
        captions = []
        for start in range(0, len(images), batch_size):
            captions += self.caption_pixels(self.preprocess(images[start: start + batch_size]), beam_size, max_length)
        return captions

    def caption_features(self, grids, beam_size: int = 3, max_length: int | None = None, batch_size: int = 256):
        raise UnsupportedModel("a Hugging Face captioner captions from pixels (caption or caption_pixels), "
                               "not from cached grid features")

    def caption_ids(self, caption) -> tuple[list[str], list[int]]:
        """(tokens, fed ids [start, t_1 .. t_n, end]) of a Caption, a text or a list of tokens."""
        if hasattr(caption, "token_ids"):
            return list(caption.words), list(caption.token_ids)
        if isinstance(caption, str):
            tokens = self.tokenize(caption)
        else:
            tokens = [str(t) for t in caption]
            if not all(t in self.vocab for t in tokens):  # words rather than tokens: cut them as the tokenizer does
                tokens = self.tokenize(" ".join(tokens))
        ids = [self.settings.start_id, *self.tokenizer.convert_tokens_to_ids(tokens), self.settings.end_id]
        return tokens, ids

    def merge_words(self, explanation):
        """``explanation`` with each word's tokens merged (``Explanation.merged``): a word is a token
        that starts one (a space marker, or no WordPiece "##") and the tokens after it."""
        tokens = explanation.tokens[1:]
        groups: list[list[int]] = []
        for position, starts in enumerate(self.vocab.word_starts(tokens)):
            if starts or not groups:
                groups.append([])
            groups[-1].append(position)
        names = [self.vocab.text([tokens[p] for p in group]) for group in groups]
        return explanation.merged(groups, names)

    def fingerprint(self) -> str:
        from dataclasses import asdict

        from ..io import weights_digest

        return weights_digest(self.model.hf.state_dict(), json.dumps(asdict(self.settings), sort_keys=True))

    # --------------------------------------------------------------------------- run folders
    def save(self, run_dir: str | Path, weights_name: str = "model.safetensors") -> None:
        """A run folder every verb takes: ``hf/`` (the model's and tokenizer's ``save_pretrained``),
        ``config.json`` (format and these settings) and ``manifest.json`` (the SHA-256 of every file)."""
        from dataclasses import asdict

        from ..io import claim_output_folder, remove_leftovers, sha256, write_json

        run_dir = claim_output_folder(run_dir, "run")
        folder = run_dir / "hf"
        # written whole beside the run's files, then swapped in: a save cut short (killed while a
        # trainer keeps its best weights) never leaves a half-written model where the old one was
        remove_leftovers(run_dir, ".hf.*.partial")
        staging = run_dir / f".hf.{os.getpid()}.partial"
        with quiet_transformers():
            self.model.hf.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        if folder.exists():
            old = run_dir / f".hf.{os.getpid()}.old.partial"
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        else:
            staging.rename(folder)
        write_json(run_dir / "config.json", {"format": HF_FORMAT, "format_version": 1, "hf": asdict(self.settings)})
        files = sorted(str(p.relative_to(run_dir)) for p in folder.rglob("*") if p.is_file()) + ["config.json"]
        write_json(run_dir / "manifest.json", {"format_version": 1, "files": {n: sha256(run_dir / n) for n in files}})

    @classmethod
    def load(cls, run_dir: str | Path, device=None, weights_name: str = "model.safetensors") -> "HFCaptioner":
        from ..io import read_json
        from .captioner import verify_manifest

        run_dir = Path(run_dir)
        verify_manifest(run_dir, weights_name, required=("config.json",))
        stored = read_json(run_dir / "config.json")
        try:
            settings = HFSettings(**stored["hf"])
        except (TypeError, KeyError) as error:
            raise HFLoadError(f"{run_dir / 'config.json'}: not a captionlens Hugging Face run ({error})") from None
        hf, tokenizer, _ = load_pretrained(run_dir / "hf")
        return cls(hf, tokenizer, settings, device)


# ------------------------------------------------------------------------------- loading
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block transformers draws no progress bars of its own (loading and writing weights):
    captionlens's verbs show their own progress."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def explainable(hf: nn.Module) -> nn.Module:
    """``hf`` if captionlens can explain it: a compiled wrapper or a quantised model is refused."""
    if hasattr(hf, "_orig_mod") or type(hf).__name__ == "OptimizedModule":
        raise UnsupportedModel("a torch.compile'd model cannot be explained: pass the model itself "
                               "(model._orig_mod), not its compiled wrapper")
    if getattr(hf.config, "quantization_config", None) is not None or getattr(hf, "is_quantized", False):
        raise UnsupportedModel("a quantised model cannot be explained (its layers are not plain Linear "
                               "layers with weights): load it without quantisation")
    family_of(hf)
    return hf


def load_pretrained(folder: str | Path):
    """(model, tokenizer, image processor or None) from a local ``save_pretrained`` folder: offline
    only, never ``trust_remote_code``; anything missing or unreadable is an ``HFLoadError`` naming it."""
    require("transformers", "hf")
    import transformers

    folder = Path(folder)
    if not folder.is_dir():
        raise HFLoadError(f"no Hugging Face model folder at {folder}")
    if not (folder / "config.json").is_file():
        raise HFLoadError(f"{folder} has no config.json: save the model with save_pretrained(folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001  transformers raises many kinds for a bad config
        raise HFLoadError(f"{folder / 'config.json'} cannot be read: {error}") from None
    classes = {c: f for f in HF_FAMILIES.values() for c in f.classes}
    name = next((a for a in (getattr(config, "architectures", None) or []) if a in classes), None)
    if name is None:
        raise HFLoadError(f"{folder} holds a {getattr(config, 'architectures', None) or type(config).__name__} "
                          f"model; captionlens explains {', '.join(classes)}")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        raise HFLoadError(f"{folder} has no weights (model.safetensors): save the model with save_pretrained")
    try:
        with quiet_transformers():
            hf = getattr(transformers, name).from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        raise HFLoadError(f"the weights in {folder} cannot be loaded as {name}: {error}") from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise HFLoadError(f"{folder} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}): save it with "
                          "tokenizer.save_pretrained(folder)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        raise HFLoadError(f"{folder} has no readable tokenizer (tokenizer.json or its vocabulary files): "
                          f"save it with tokenizer.save_pretrained(folder) ({type(error).__name__})") from None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True,
                                                                    trust_remote_code=False)
    except Exception:  # noqa: BLE001  no preprocessor_config.json: the model's own settings decide
        processor = None
    return hf.eval(), tokenizer, processor


def settings_for(hf: nn.Module, tokenizer, processor=None, prompt: str | None = None,
                 max_length: int = 20) -> HFSettings:
    """captionlens's settings of a Hugging Face captioner: image size and normalisation from its image
    processor (else its vision config and ImageNet's statistics), the start/end/pad ids from its
    config, and the prompt's tokens (LLaVA: the conversation around the image placeholders)."""
    family = family_of(hf)
    config = family.config_of(hf)
    vision = getattr(hf.config, "vision_config", None) or getattr(hf.config, "encoder", None)
    image_size = getattr(vision, "image_size", None)
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if processor is not None:
        size = getattr(processor, "size", None) or {}
        image_size = size.get("height") or size.get("shortest_edge") or image_size
        mean = list(getattr(processor, "image_mean", None) or mean)
        std = list(getattr(processor, "image_std", None) or std)
    if not isinstance(image_size, int):
        raise HFLoadError(f"cannot tell {type(hf).__name__}'s image size (no image processor, no vision_config)")
    start = _first_int(getattr(hf.config, "decoder_start_token_id", None), getattr(config, "bos_token_id", None),
                       getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None))
    end = _first_int(getattr(config, "eos_token_id", None), getattr(config, "sep_token_id", None),
                     getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None))
    pad = _first_int(getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None), end)
    if start is None or end is None:
        raise HFLoadError(f"{type(hf).__name__}'s config names no start (bos / decoder_start) or end (eos) token")
    prompt_ids: list[int] = []
    if family.name == "llava":
        side = image_size // next(m for m in hf.model.vision_tower.modules() if isinstance(m, nn.Conv2d)).stride[0]
        image_token = hf.config.image_token_id
        before, after = (prompt or "USER: <image>\nDescribe the image. ASSISTANT:").split("<image>", 1)
        prompt_ids = ([start] + tokenizer.encode(before, add_special_tokens=False) + [image_token] * (side * side)
                      + tokenizer.encode(after, add_special_tokens=False))
        start = prompt_ids[-1]
    output_layer = hf.get_output_embeddings()
    vocab_size = output_layer.weight.shape[0] if output_layer is not None else \
        getattr(config, "vocab_size", None) or hf.config.vocab_size
    return HFSettings(family.name, type(hf).__name__, vocab_size, image_size, mean, std, start, end, pad, prompt_ids,
                      max_length)


def _first_int(*values) -> int | None:
    for value in values:
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def from_hf(model, processor=None, prompt: str | None = None, max_length: int = 20, device=None) -> HFCaptioner:
    """A captionlens captioner of a Hugging Face captioner: ``from_hf(folder)`` for a local
    ``save_pretrained`` folder (model, tokenizer and image processor files), or ``from_hf(model,
    processor)`` for objects in memory (``processor``: a processor with ``tokenizer`` and
    ``image_processor``, or a tokenizer)."""
    if isinstance(model, (str, Path)):
        hf, tokenizer, image_processor = load_pretrained(model)
    else:
        require("transformers", "hf")
        if processor is None:
            raise HFLoadError("from_hf(model, processor): a model in memory needs its processor or tokenizer")
        hf = explainable(model).eval()
        tokenizer = getattr(processor, "tokenizer", processor)
        image_processor = getattr(processor, "image_processor", None)
    return HFCaptioner(hf, tokenizer, settings_for(hf, tokenizer, image_processor, prompt, max_length), device)

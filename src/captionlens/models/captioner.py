"""A captioning model as users hold it: the network (encoder + decoder), its vocabulary, its
preprocessing and beam search, built from a JSON-able config through the registries."""
from __future__ import annotations

import copy

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.images import ImageInput, load_image, to_tensor
from ..data.vocab import UNK, Vocabulary, tokenize
from ..errors import InvalidValue, integer
from ..io import atomic_write, claim_output_folder, read_json, sha256, weights_digest, write_json
from .beam import beam_search
from .decoder import Decoder, DecoderOutput
from .encoders import Encoder
from .registry import ARCHITECTURES, ENCODERS, lookup

FORMAT_VERSION = 1


@dataclass
class CaptionerConfig:
    architecture: str  # a registered architecture: "adaptive", "gridtd"
    encoder: str  # a registered encoder: "vgg16", "shapes"
    vocab_size: int
    hidden_size: int = 512
    embed_size: int = 512
    attention_size: int | None = None  # defaults to hidden_size
    dropout: float = 0.5
    max_length: int = 20  # longest caption beam search produces, in words
    encoder_options: dict = field(default_factory=dict)
    architecture_options: dict = field(default_factory=dict)  # e.g. transformer: layers, heads, encoder_layers


class CaptionModel(nn.Module):
    """``model(pixels, token_ids) -> logits``: pixels [B, 3, H, W], token_ids [B, T] starting with
    <start>; logits [B, T, V] where ``logits[:, t]`` (the pre-softmax fc output) scores token t+1."""

    # what precision="auto" runs where bfloat16 is native: the CNN in bf16, where nearly all the work is
    # (VGG16 at 224 px: ~15 GFLOP a forward against the decoder's few hundred MFLOP), the decoder in fp32
    auto_precision = "bf16-vision"

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def run(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> DecoderOutput:
        """Logits together with the attention α [B, T, L] and sentinel weights β [B, T]."""
        return self.decoder(self.encoder(pixels), token_ids)

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.run(pixels, token_ids).logits

    def language_model(self) -> nn.Module:
        """The part that reads the image and writes the words (what fine-tuning tunes): the decoder."""
        return self.decoder

    # What the explanation engine asks of a model (``explain/engine.py``); a model that is not an
    # encoder and a decoder side by side (a Hugging Face captioner, ``models/hf.py``) answers in its own way.
    def run_with_grid(self, pixels: torch.Tensor, token_ids: torch.Tensor, on_grid) -> DecoderOutput:
        """``run``, with ``on_grid(grid)`` put in place of the encoder's grid [B, C, h, w] before the
        decoder reads it (the engine keeps it there, or cuts the graph at it)."""
        return self.decoder(on_grid(self.encoder(pixels)), token_ids)

    @property
    def embedding_module(self) -> nn.Module:
        """The module whose output is the embedding of each fed token (the linguistic explanation's input)."""
        return self.decoder.embedding

    def position_modules(self) -> list[nn.Module]:
        """Modules whose outputs are learned positions (their relevance is reported apart)."""
        from .layers import LearnedPositions

        return [m for m in self.decoder.modules() if isinstance(m, LearnedPositions)]

    def vision_module(self) -> nn.Module:
        """The module that turns pixels into the grid (Grad-CAM runs it without a graph)."""
        return self.encoder

    def explained_parts(self) -> list[nn.Module]:
        """The modules whose forwards run when the model runs (canonizers watch the operations in them)."""
        return [self.encoder, self.decoder]


def architecture_settings(architecture: str, dropout: float | None = None, options: dict | None = None
                          ) -> tuple[float, dict]:
    """The decoder's dropout (its architecture's ``default_dropout`` when None) and its options,
    checked against those the architecture takes (``Decoder.options``)."""
    decoder_class = lookup(ARCHITECTURES, "architecture", architecture)
    options = dict(options or {})
    unknown = sorted(set(options) - set(decoder_class.options))
    if unknown:
        raise ValueError(f"architecture {architecture!r} takes no option {', '.join(unknown)}"
                         + (f" (its options: {', '.join(decoder_class.options)})" if decoder_class.options else ""))
    return decoder_class.default_dropout if dropout is None else dropout, options


def build_model(config: CaptionerConfig) -> CaptionModel:
    encoder = lookup(ENCODERS, "encoder", config.encoder)(**config.encoder_options)
    decoder = lookup(ARCHITECTURES, "architecture", config.architecture)(
        config.vocab_size,
        encoder.out_channels,
        hidden_size=config.hidden_size,
        embed_size=config.embed_size,
        attention_size=config.attention_size,
        dropout=config.dropout,
        **config.architecture_options,
    )
    return CaptionModel(encoder, decoder)


@dataclass
class Caption:
    words: list[str]
    token_ids: list[int]  # [<start>, w_1 .. w_n, <end>]: what ``model(pixels, token_ids)`` takes
    score: float  # log-probability of the words and <end> under the model

    @property
    def text(self) -> str:
        return " ".join(self.words)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The CPU unless a device is asked for ("cpu", "cuda", "cuda:1", "mps"); a name torch does not
    know, a device this machine lacks, or one that holds no data ("meta") is an error."""
    try:
        resolved = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise InvalidValue(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if resolved.type not in DEVICE_TYPES:
        raise InvalidValue(f"device {device!r} cannot run a captioner: use cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValue(f"device {str(device)!r} was asked for but no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InvalidValue(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidValue("device 'mps' was asked for but this machine has no MPS device")
    return resolved


MAX_CAPTION_WORDS = 1000  # the longest caption beam search may be asked for (a bound, not a recipe)


class Captioner:
    """A trained (or fresh) captioner: ``cap.caption(images)``, ``cap.preprocess(images)``,
    ``cap.model(pixels, token_ids)``, ``cap.vocab``, ``cap.tokenize(text)``."""

    def __init__(self, model: CaptionModel, vocab: Vocabulary, config: CaptionerConfig,
                 device: str | torch.device | None = None) -> None:
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} words, config says {config.vocab_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.config = config

    def with_model(self, model: CaptionModel) -> "Captioner":
        """This captioner (its vocabulary, settings and, for a subclass, what else it holds) around
        another ``model`` — a modified copy of its own, say; ``self`` is left unchanged."""
        other = copy.copy(self)
        other.model = model.to(self.device)
        return other

    @property
    def image_size(self) -> int:
        return self.model.encoder.image_size

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Paths, PIL images or arrays -> the normalised ``[B, 3, H, W]`` tensor the model takes."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        encoder = self.model.encoder
        return torch.stack(
            [to_tensor(load_image(image), encoder.image_size, encoder.mean, encoder.std) for image in images]
        ).to(self.device)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """The words of ``text`` as the vocabulary spells them (lower case, no punctuation)."""
        return tokenize(text)

    def encode(self, words: Sequence[str]) -> torch.Tensor:
        """``[<start>, w_1 .. w_n, <end>]`` as a [1, n+2] tensor for teacher forcing."""
        return torch.tensor([self.vocab.encode(list(words))], device=self.device)

    @torch.no_grad()
    def caption(self, images: ImageInput | Sequence[ImageInput], beam_size: int = 3,
                max_length: int | None = None, batch_size: int = 64) -> list[Caption]:
        """One caption per image, by beam search batched across images (beam_size=1: greedy)."""
        self._check_search(beam_size, max_length)
        if not isinstance(images, (list, tuple)):
            images = [images]
        grids = [self.model.encoder(self.preprocess(images[i: i + batch_size]))
                 for i in range(0, len(images), batch_size)]
        return self.caption_features(torch.cat(grids), beam_size, max_length, batch_size)

    @torch.no_grad()
    def caption_features(self, grids: torch.Tensor, beam_size: int = 3, max_length: int | None = None,
                         batch_size: int = 256) -> list[Caption]:
        """Captions from encoder grids [N, C, h, w] (e.g. a feature cache)."""
        self._check_search(beam_size, max_length)
        self.model.eval()
        captions = []
        for i in range(0, grids.shape[0], batch_size):
            batch = grids[i: i + batch_size].to(self.device, next(self.model.parameters()).dtype)
            for hypothesis in beam_search(self.model.decoder, batch, self.vocab.start_id, self.vocab.end_id,
                                          beam_size, max_length or self.config.max_length,
                                          banned=(self.vocab.pad_id, self.vocab.start_id)):
                ids = [self.vocab.start_id, *hypothesis.token_ids]
                captions.append(Caption(self.vocab.decode(ids), ids, hypothesis.score))
        return captions

    def _check_search(self, beam_size: int, max_length: int | None) -> None:
        integer("beam_size", beam_size, 1, len(self.vocab))
        if max_length is not None:
            integer("max_length", max_length, 1, MAX_CAPTION_WORDS)

    caches_features = True  # captions come from encoder grids, which a feature cache can hold

    def caption_pixels(self, pixels: torch.Tensor, beam_size: int = 3, max_length: int | None = None) -> list[Caption]:
        """Captions of images already preprocessed for the model (normalised [B, 3, H, W])."""
        with torch.no_grad():
            grids = self.model.encoder(pixels.to(self.device, next(self.model.parameters()).dtype))
        return self.caption_features(grids, beam_size, max_length)

    def caption_ids(self, caption) -> tuple[list[str], list[int]]:
        """(words as the model reads them — unknown ones as <unk> —, fed ids [<start>, w_1 .. w_n, <end>])
        of a Caption, a text or a list of words."""
        if isinstance(caption, Caption):
            words = list(caption.words)
        elif isinstance(caption, str):
            words = self.tokenize(caption)
        else:
            words = [str(w) for w in caption]
        words = [w if w in self.vocab else UNK for w in words]
        return words, self.vocab.encode(words)

    def fingerprint(self) -> str:
        """A hash of the configuration, the vocabulary and every weight: two captioners with the same
        fingerprint compute the same explanations (used to keep an explanation store to one model)."""
        return weights_digest(self.model.state_dict(), json.dumps(asdict(self.config), sort_keys=True),
                              "\n".join(self.vocab.words))

    # ------------------------------------------------------------------ checkpoints (data, no pickles)
    def save(self, run_dir: str | Path, weights_name: str = "model.safetensors") -> None:
        """Write ``config.json``, ``vocab.json`` and the weights (safetensors), each atomically, then
        ``manifest.json`` with their SHA-256: the files of one save, bound together."""
        from safetensors.torch import save_file

        run_dir = claim_output_folder(run_dir, "run")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(run_dir / weights_name, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        self.vocab.to_json(run_dir / "vocab.json")
        write_json(run_dir / "config.json", {"format_version": FORMAT_VERSION, "captioner": asdict(self.config)})
        files = (weights_name, "vocab.json", "config.json")
        write_json(run_dir / MANIFEST, {"format_version": FORMAT_VERSION,
                                        "files": {name: sha256(run_dir / name) for name in files}})

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None,
             weights_name: str = "model.safetensors") -> "Captioner":
        """A captioner from a run folder, every file checked: the manifest's checksums, the config's
        fields, the weights' shapes against the config and their values (finite)."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a captionlens run folder (no config.json)")
        if (run_dir / "hf" / "config.json").is_file():  # a Hugging Face captioner (captionlens import hf)
            from .hf import HFCaptioner

            return HFCaptioner.load(run_dir, device, weights_name)
        verify_manifest(run_dir, weights_name)
        config = read_config(config_path)
        vocab = Vocabulary.from_json(run_dir / "vocab.json")
        if len(vocab) != config.vocab_size:
            raise ValueError(f"{run_dir / 'vocab.json'} has {len(vocab)} words but {config_path} says vocab_size "
                             f"{config.vocab_size}")
        try:
            model = build_model(config)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{config_path} describes no model this captionlens can build: {error}") from None
        load_weights(model, run_dir / weights_name, config_path)
        return cls(model, vocab, config, device)


MANIFEST = "manifest.json"


def verify_manifest(run_dir: Path, weights_name: str, required: Sequence[str] | None = None) -> None:
    """Every file the manifest lists must have its recorded SHA-256, and it must list the ``required``
    ones (by default config.json, vocab.json and the weights; a run folder saved before manifests
    existed loads with a warning)."""
    import warnings

    path = run_dir / MANIFEST
    if not path.is_file():
        warnings.warn(f"{run_dir} has no {MANIFEST}: its files cannot be checked for corruption "
                      "(saving the captioner again writes one)", stacklevel=3)
        return
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} is not a run-folder manifest (needs 'files': {{name: sha256}})")
    required = ("config.json", "vocab.json", weights_name) if required is None else tuple(required)
    for name in dict.fromkeys([*required, *manifest["files"]]):
        if name not in manifest["files"]:
            raise ValueError(f"{path} does not list {name}")
        file = run_dir / name
        if not file.is_file():
            raise FileNotFoundError(f"{run_dir} is missing {name}")
        if sha256(file) != manifest["files"][name]:
            raise ValueError(f"{file} is not the file saved with this run (its SHA-256 differs from {path}): "
                             "it was changed, corrupted or only partly written")


def read_config(path: Path) -> CaptionerConfig:
    """``config.json``, validated field by field."""
    stored = read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("captioner"), dict):
        raise ValueError(f"{path} is not a captionlens config (needs 'format_version' and a 'captioner' object)")
    if stored.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {stored.get('format_version')} is not {FORMAT_VERSION}, which "
                         "this captionlens reads")
    fields = {f.name: f for f in dataclasses.fields(CaptionerConfig)}
    values = stored["captioner"]
    unknown = sorted(set(values) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        raise ValueError(f"{path}: {'unknown field(s) ' + ', '.join(unknown) if unknown else ''}"
                         f"{'; ' if unknown and missing else ''}{'missing field(s) ' + ', '.join(missing) if missing else ''}")
    kinds = {"architecture": str, "encoder": str, "vocab_size": int, "hidden_size": int, "embed_size": int,
             "max_length": int, "dropout": (int, float), "encoder_options": dict, "architecture_options": dict}
    for name, kind in kinds.items():
        if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
            raise ValueError(f"{path}: field {name!r} must be {getattr(kind, '__name__', 'a number')}, "
                             f"not {values[name]!r}")
    bounds = {"vocab_size": 10_000_000, "hidden_size": 65_536, "embed_size": 65_536, "max_length": MAX_CAPTION_WORDS}
    for name, high in bounds.items():  # bounded: a max_length of 10^9 once allocated gigabytes
        if name in values and not 1 <= values[name] <= high:
            raise ValueError(f"{path}: field {name!r} must be in [1, {high}], not {values[name]}")
    if "dropout" in values and not 0 <= values["dropout"] < 1:
        raise ValueError(f"{path}: field 'dropout' must be in [0, 1), not {values['dropout']}")
    config = CaptionerConfig(**values)
    for registry, kind, name in ((ARCHITECTURES, "architecture", config.architecture),
                                 (ENCODERS, "encoder", config.encoder)):
        if name not in registry:
            raise ValueError(f"{path}: unknown {kind} {name!r}; this captionlens has {', '.join(sorted(registry))}")
    return config


def load_weights(model: nn.Module, path: Path, config_path: Path) -> None:
    """Load a safetensors state dict into ``model``: an unreadable file, weights of another shape and
    NaN or infinite values are each a clear error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: it is truncated or not a safetensors file ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or extra or wrong:
        details = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra
                   else "", ", ".join(f"{k} is {tuple(state[k].shape)} not {tuple(expected[k].shape)}" for k in wrong[:3])]
        raise ValueError(f"{path} does not fit the model that {config_path} describes (another architecture, "
                         f"encoder or vocabulary size?): {'; '.join(d for d in details if d)}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: weight {name!r} holds NaN or infinite values")
    model.load_state_dict(state)

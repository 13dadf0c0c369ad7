"""A captioning model as users hold it: the network (encoder + decoder), its vocabulary, its
preprocessing and beam search, built from a JSON-able config through the registries."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.images import ImageInput, load_image, to_tensor
from ..data.vocab import Vocabulary, tokenize
from ..io import atomic_write, read_json, write_json
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


class CaptionModel(nn.Module):
    """``model(pixels, token_ids) -> logits``: pixels [B, 3, H, W], token_ids [B, T] starting with
    <start>; logits [B, T, V] where ``logits[:, t]`` (the pre-softmax fc output) scores token t+1."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def run(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> DecoderOutput:
        """Logits together with the attention α [B, T, L] and sentinel weights β [B, T]."""
        return self.decoder(self.encoder(pixels), token_ids)

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.run(pixels, token_ids).logits


def build_model(config: CaptionerConfig) -> CaptionModel:
    encoder = lookup(ENCODERS, "encoder", config.encoder)(**config.encoder_options)
    decoder = lookup(ARCHITECTURES, "architecture", config.architecture)(
        config.vocab_size,
        encoder.out_channels,
        hidden_size=config.hidden_size,
        embed_size=config.embed_size,
        attention_size=config.attention_size,
        dropout=config.dropout,
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The CPU unless a device is asked for; asking for CUDA without one is an error."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return device


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
        if not isinstance(images, (list, tuple)):
            images = [images]
        grids = [self.model.encoder(self.preprocess(images[i: i + batch_size]))
                 for i in range(0, len(images), batch_size)]
        return self.caption_features(torch.cat(grids), beam_size, max_length, batch_size)

    @torch.no_grad()
    def caption_features(self, grids: torch.Tensor, beam_size: int = 3, max_length: int | None = None,
                         batch_size: int = 256) -> list[Caption]:
        """Captions from encoder grids [N, C, h, w] (e.g. a feature cache)."""
        self.model.eval()
        captions = []
        for i in range(0, grids.shape[0], batch_size):
            batch = grids[i: i + batch_size].to(self.device, torch.float32)
            for hypothesis in beam_search(self.model.decoder, batch, self.vocab.start_id, self.vocab.end_id,
                                          beam_size, max_length or self.config.max_length,
                                          banned=(self.vocab.pad_id, self.vocab.start_id)):
                ids = [self.vocab.start_id, *hypothesis.token_ids]
                captions.append(Caption(self.vocab.decode(ids), ids, hypothesis.score))
        return captions

    def fingerprint(self) -> str:
        """A hash of the configuration, the vocabulary and every weight: two captioners with the same
        fingerprint compute the same explanations (used to keep an explanation store to one model)."""
        digest = hashlib.sha1(json.dumps(asdict(self.config), sort_keys=True).encode())
        digest.update("\n".join(self.vocab.words).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ checkpoints (data, no pickles)
    def save(self, run_dir: str | Path, weights_name: str = "model.safetensors") -> None:
        """Write ``config.json``, ``vocab.json`` and the weights (safetensors), each atomically."""
        from safetensors.torch import save_file

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(run_dir / weights_name, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        self.vocab.to_json(run_dir / "vocab.json")
        write_json(run_dir / "config.json", {"format_version": FORMAT_VERSION, "captioner": asdict(self.config)})

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None,
             weights_name: str = "model.safetensors") -> "Captioner":
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a captionlens run folder (no config.json)")
        stored = read_json(config_path)
        if stored.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {stored.get('format_version')} is not "
                             f"{FORMAT_VERSION}, which this captionlens reads")
        config = CaptionerConfig(**stored["captioner"])
        model = build_model(config)
        model.load_state_dict(load_file(str(run_dir / weights_name)))
        return cls(model, Vocabulary.from_json(run_dir / "vocab.json"), config, device)

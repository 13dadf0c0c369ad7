"""Import checkpoints of the Show-Attend-Tell tutorial (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning)
into an ordinary captionlens run folder (architecture ``sat``, encoder ``resnet101`` or ``resnet50``).

The tutorial saves ``torch.save({"epoch", "epochs_since_improvement", "bleu-4", "encoder", "decoder",
"encoder_optimizer", "decoder_optimizer"})`` with whole module objects inside: unpickling it the usual
way would import the tutorial's ``models.py`` and run whatever the pickle names. This reader never
does: a restricted unpickler maps exactly the tutorial's classes (``models.Encoder``,
``models.DecoderWithAttention``, ``models.Attention``), torchvision's ResNet blocks and torch's own
modules and optimizers to inert stand-ins that only keep their state, rebuilds tensors with torch's
own functions, and refuses every other global with a clear error. A plain state dict
(``{"encoder": ..., "decoder": ...}`` or one flat dict with ``encoder.``/``decoder.`` prefixes) is
accepted too.

Word maps differ: the tutorial's is ``{word: index}`` with ``<pad>`` = 0 and ``<unk>``, ``<start>``,
``<end>`` last; the embedding rows and output rows are permuted to captionlens's vocabulary order.
Images: 256×256, ImageNet mean/std, ResNet grid pooled to ``enc_image_size`` (14).
"""
from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path

import torch

from ..data.vocab import SPECIAL_TOKENS, Vocabulary
from ..io import read_json
from .captioner import Captioner, CaptionerConfig, build_model

TUTORIAL_CLASSES = {("models", "Encoder"), ("models", "DecoderWithAttention"), ("models", "Attention")}
TORCHVISION_CLASSES = {("torchvision.models.resnet", "Bottleneck"), ("torchvision.models.resnet", "BasicBlock"),
                       ("torchvision.models.resnet", "ResNet")}
# torch's own functions and plain containers a checkpoint of tensors needs (nothing that runs code)
SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "str"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("_codecs", "encode"),
}
TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class StandIn:
    """An object of a pickled class that is never imported or run: it only keeps its state
    (``__dict__`` of a module: ``_parameters``, ``_buffers``, ``_modules`` and attributes)."""

    pickled_class = "?"

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_class}>"


_STAND_INS: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    if qualified not in _STAND_INS:
        _STAND_INS[qualified] = type(name, (StandIn,), {"pickled_class": qualified})
    return _STAND_INS[qualified]


def _is_torch_class(module: str, name: str) -> bool:
    """torch's own nn modules and optimizers, e.g. torch.nn.modules.conv.Conv2d, torch.optim.adam.Adam."""
    if not (module.startswith("torch.nn.modules.") or module.startswith("torch.optim.")):
        return False
    namespace = torch.nn if module.startswith("torch.nn.") else torch.optim
    return isinstance(getattr(namespace, name, None), type)


class RestrictedUnpickler(pickle.Unpickler):
    """Maps the tutorial's, torchvision's and torch's classes to stand-ins; refuses any other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol 2 pickles): __builtin__.set
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in TUTORIAL_CLASSES or (module, name) in TORCHVISION_CLASSES or _is_torch_class(module, name):
            return _stand_in(module, name)
        if (module, name) in SAFE_GLOBALS or (module == "torch" and name in TORCH_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the checkpoint refers to {module}.{name}, which is neither the tutorial's models, torchvision's ResNet "
            "nor torch's own: captionlens never runs pickled code it does not know, so it stops here")


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs of a pickle module."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict, read with the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: {error}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not the tutorial's checkpoint dict or a state dict")
    return checkpoint


def module_state(module: StandIn | dict, where: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a stand-in module (its ``_parameters``, ``_buffers`` and ``_modules``,
    recursively) or from a state dict."""
    if isinstance(module, dict):
        if not all(isinstance(v, torch.Tensor) for v in module.values()):
            raise ValueError(f"the checkpoint's {where} is a dict but not a state dict of tensors")
        return dict(module)
    if not isinstance(module, StandIn):
        raise ValueError(f"the checkpoint's {where} is a {type(module).__name__}, not a module or a state dict")
    state = {}
    for key in ("_parameters", "_buffers"):
        for name, tensor in (getattr(module, key, None) or {}).items():
            if tensor is not None:
                state[name] = tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
    for child_name, child in (getattr(module, "_modules", None) or {}).items():
        if child is not None:
            state.update({f"{child_name}.{k}": v for k, v in module_state(child, where).items()})
    return state


def split_checkpoint(checkpoint: dict) -> tuple[dict, dict, dict]:
    """(encoder state, decoder state, decoder attributes) from any accepted checkpoint layout."""
    if "encoder" in checkpoint and "decoder" in checkpoint:
        decoder = checkpoint["decoder"]
        attributes = {k: v for k, v in vars(decoder).items() if isinstance(v, (int, float))} \
            if isinstance(decoder, StandIn) else {}
        encoder = checkpoint["encoder"]
        if isinstance(encoder, StandIn):
            pool = (getattr(encoder, "_modules", {}) or {}).get("adaptive_pool")
            size = getattr(encoder, "enc_image_size", None) or getattr(pool, "output_size", None)
            if size is not None:
                attributes["enc_image_size"] = size[0] if isinstance(size, (tuple, list)) else size
        return module_state(encoder, "encoder"), module_state(decoder, "decoder"), attributes
    if all(isinstance(k, str) and k.startswith(("encoder.", "decoder.")) for k in checkpoint) and checkpoint:
        encoder = {k.removeprefix("encoder."): v for k, v in checkpoint.items() if k.startswith("encoder.")}
        decoder = {k.removeprefix("decoder."): v for k, v in checkpoint.items() if k.startswith("decoder.")}
        return module_state(encoder, "encoder"), module_state(decoder, "decoder"), {}
    raise ValueError("the checkpoint has neither 'encoder' and 'decoder' entries nor encoder./decoder. keys "
                     f"(it has: {', '.join(sorted(map(str, checkpoint))[:8])})")


RESNET_STAGES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def encoder_weights(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The tutorial encoder's ``resnet.<i>.`` keys (``nn.Sequential`` of torchvision's children) as
    torchvision names, and which ResNet it is (from the number of blocks in the third stage)."""
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] != "resnet" or len(parts) < 3 or parts[1] not in RESNET_STAGES:
            continue  # the pooling has no weights; anything else is not the tutorial's encoder
        renamed[".".join([RESNET_STAGES[parts[1]], *parts[2:]])] = tensor
    if "conv1.weight" not in renamed:
        raise ValueError("the encoder is not the tutorial's ResNet (no resnet.0.weight)")
    blocks = {int(k.split(".")[1]) for k in renamed if k.startswith("layer3.")}
    depth = {6: "resnet50", 23: "resnet101"}.get(len(blocks))
    if depth is None:
        raise ValueError(f"the encoder's third stage has {len(blocks)} blocks: neither ResNet-50 (6) nor ResNet-101 (23)")
    return depth, renamed


def vocabulary_order(word_map: dict[str, int]) -> tuple[Vocabulary, torch.Tensor]:
    """captionlens's vocabulary of the word map and, for each of its words, the tutorial's index."""
    missing = [token for token in SPECIAL_TOKENS if token not in word_map]
    if missing:
        raise ValueError(f"the word map lacks {', '.join(missing)}: not the tutorial's word map")
    indices = sorted(word_map.values())
    if indices != list(range(len(word_map))):
        raise ValueError("the word map's indices are not 0 .. N-1 without gaps")
    words = [w for w, _ in sorted(word_map.items(), key=lambda item: item[1]) if w not in SPECIAL_TOKENS]
    vocab = Vocabulary([*SPECIAL_TOKENS, *words])
    return vocab, torch.tensor([word_map[w] for w in vocab.words])


def decoder_weights(state: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tutorial decoder's weights under the ``sat`` decoder's names; vocabulary rows reordered."""
    from .layers import LSTMCell

    need = ["embedding.weight", "attention.encoder_att.weight", "attention.decoder_att.weight",
            "attention.full_att.weight", "init_h.weight", "init_c.weight", "f_beta.weight", "fc.weight",
            "decode_step.weight_ih", "decode_step.weight_hh"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"the decoder is not the tutorial's DecoderWithAttention: missing {', '.join(missing)}")
    if state["embedding.weight"].shape[0] != len(rows):
        raise ValueError(f"the decoder has {state['embedding.weight'].shape[0]} words, the word map {len(rows)}")
    hidden = state["decode_step.weight_hh"].shape[1]
    cell = LSTMCell(state["decode_step.weight_ih"].shape[1], hidden).load_torch_weights(
        state["decode_step.weight_ih"], state["decode_step.weight_hh"], state.get("decode_step.bias_ih"),
        state.get("decode_step.bias_hh"))
    weights = {"embedding.weight": state["embedding.weight"][rows], "fc.weight": state["fc.weight"][rows],
               "fc.bias": state["fc.bias"][rows], "lstm.gates.weight": cell.gates.weight.detach(),
               "lstm.gates.bias": cell.gates.bias.detach()}
    for name in ("encoder_att", "decoder_att", "full_att"):
        for kind in ("weight", "bias"):
            weights[f"attention.{name}.{kind}"] = state[f"attention.{name}.{kind}"]
    for name, target in (("init_h", "init_h"), ("init_c", "init_c"), ("f_beta", "attention.f_beta")):
        for kind in ("weight", "bias"):
            weights[f"{target}.{kind}"] = state[f"{name}.{kind}"]
    return weights


def import_sat_tutorial(checkpoint: str | Path, word_map: str | Path, out: str | Path | None = None,
                        image_size: int = 256, grid_size: int | None = None, device: str | None = None) -> Captioner:
    """A ``sat`` captioner with the tutorial checkpoint's weights (saved as a run folder in ``out``
    when given). Its teacher-forced logits equal the tutorial model's (tested to 1e-5). ``grid_size``
    (the encoder's pooled grid) is read from a pickled encoder; give it for a plain state dict
    (default: the tutorial's 14)."""
    encoder_state, decoder_state, attributes = split_checkpoint(read_checkpoint(checkpoint))
    mapping = read_json(word_map)
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in mapping.items()):
        raise ValueError(f"{word_map} is not the tutorial's word map ({{word: index}})")
    vocab, rows = vocabulary_order(mapping)
    depth, resnet = encoder_weights(encoder_state)
    decoder = decoder_weights(decoder_state, rows)
    config = CaptionerConfig(
        "sat", depth, len(vocab), hidden_size=decoder["init_h.weight"].shape[0],
        embed_size=decoder["embedding.weight"].shape[1], attention_size=decoder["attention.encoder_att.weight"].shape[0],
        dropout=float(attributes.get("dropout", 0.5)),
        encoder_options={"image_size": image_size,
                         "grid_size": int(grid_size or attributes.get("enc_image_size", 14))})
    model = build_model(config)
    try:
        model.encoder.load_state_dict(resnet)
        model.decoder.load_state_dict(decoder)
    except RuntimeError as error:
        raise ValueError(f"the checkpoint's weights do not fit the tutorial's layout: {error}") from None
    captioner = Captioner(model, vocab, config, device)
    if out is not None:
        captioner.save(out)
    return captioner

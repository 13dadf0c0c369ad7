"""A model-agnostic training loop: Adam, gradient clipping, validation every epoch with early
stopping, a progress bar, a per-epoch JSONL log and resumable state — all written atomically and as
data (safetensors + JSON), never pickles. It knows nothing about captioning: the caller passes a
loss function and batch iterables.

Under ``torchrun`` (pass the process group's ``Ranks``) the model trains as PyTorch's
``DistributedDataParallel``: the caller gives each rank its own shard of the training batches (the
same number on every rank), gradients are averaged across ranks, the validation batches are shared
out and their losses summed, and rank 0 alone writes weights, log and resumable state — which holds
every rank's random state and a checksum of every rank's weights (they must agree)."""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .distributed import Ranks
from .errors import InvalidValue, TrainingDiverged, integer, real
from .io import atomic_write, atomic_write_text, dumps, read_json, write_json


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 5e-4
    grad_clip: float = 5.0  # max global gradient norm
    patience: int = 3  # epochs without a better validation loss before stopping early
    seed: int = 0

    def __post_init__(self) -> None:  # a batch of -4 once trained on nothing and saved a model
        self.epochs = integer("epochs", self.epochs, 1, 100_000)
        self.batch_size = integer("batch_size", self.batch_size, 1, 1_000_000)
        self.learning_rate = real("learning_rate", self.learning_rate, 0, 10, low_open=True)
        self.grad_clip = real("grad_clip", self.grad_clip, 0, low_open=True)
        self.patience = integer("patience", self.patience, 1)
        self.seed = integer("seed", self.seed, 0, 2**63 - 1)


# Settings a resumed run must share with the run it continues (epochs and patience may change: a run
# can be extended); anything else changed is refused unless forced.
RESUMED_SAME = ("batch_size", "learning_rate", "grad_clip", "seed")


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float


STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LOG = "metrics.jsonl"


class Trainer:
    """``Trainer(model, loss_fn, config, out_dir).fit(train_batches, val_batches, on_best)``

    * ``loss_fn(model, batch) -> scalar loss``
    * ``train_batches(epoch) -> iterable of batches`` (epoch-dependent shuffling stays reproducible
      after a resume)
    * ``val_batches() -> iterable of batches``
    * ``on_best()`` is called whenever the validation loss improves (e.g. to save the weights).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                 config: TrainConfig, out_dir: str | Path, progress: bool = True, name: str = "train",
                 ranks: Ranks | None = None, settings: dict | None = None) -> None:
        """``settings``: what else defines the run (the data, the model's config); a resume must match
        them and ``RESUMED_SAME`` of ``config``, unless ``fit(..., force=True)``."""
        self.model = model
        self.settings = settings or {}
        self.loss_fn = loss_fn
        self.config = config
        self.out_dir = Path(out_dir)
        self.ranks = ranks or Ranks()
        self.progress = progress and self.ranks.is_main
        self.name = name
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.learning_rate)
        # the module the training steps call: gradients are averaged across ranks under torchrun
        self.trained = DistributedDataParallel(model) if self.ranks.active else model

    # ------------------------------------------------------------------------------------ loop
    def fit(self, train_batches: Callable[[int], Iterable], val_batches: Callable[[], Iterable],
            on_best: Callable[[], None], resume: bool = False, force: bool = False) -> list[EpochLog]:
        """Train until ``config.epochs`` or early stopping. A NaN or infinite loss stops training with
        :class:`TrainingDiverged`; the weights last saved by ``on_best`` and the last epoch's resumable
        state stay as they were."""
        main = self.ranks.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        history: list[EpochLog] = []
        best, stale, start = math.inf, 0, 0
        if resume:
            history, best, stale, start = self._restore(force)
        else:
            torch.manual_seed(self.config.seed + self.ranks.rank)
            if main:
                (self.out_dir / LOG).unlink(missing_ok=True)
        for epoch in range(start, self.config.epochs):
            if stale >= self.config.patience:
                break
            began = time.perf_counter()
            train_loss = self._train_epoch(epoch, train_batches(epoch))
            val_loss = self.evaluate(val_batches())
            if val_loss < best:
                best, stale = val_loss, 0
                if main:
                    on_best()
            else:
                stale += 1
            entry = EpochLog(epoch + 1, train_loss, val_loss, best, time.perf_counter() - began)
            history.append(entry)
            if main:
                with open(self.out_dir / LOG, "a") as log:
                    log.write(dumps(asdict(entry), indent=None) + "\n")
            self._checkpoint(epoch + 1, history, best, stale)
        return history

    def _train_epoch(self, epoch: int, batches: Iterable) -> float:
        self.model.train()
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"{self.name} epoch {epoch + 1}/{self.config.epochs}", disable=not self.progress,
                   leave=False)
        for batch in bar:
            loss = self.loss_fn(self.trained, batch)
            if not torch.isfinite(loss):
                kept = (f"the best weights so far and the state after epoch {epoch} are kept in {self.out_dir} "
                        "(--resume continues from there)" if epoch else "nothing was saved")
                raise TrainingDiverged(f"the training loss became {loss.item()} in epoch {epoch + 1}: {kept}; try a "
                                       f"lower learning rate (now {self.config.learning_rate:g})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
            self.optimizer.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        total, count = self.ranks.sum([total, count])
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> float:
        """The mean loss of the batches (under torchrun, each rank takes every world-size-th batch)."""
        self.model.eval()
        mine = itertools.islice(batches, self.ranks.rank, None, self.ranks.world_size)
        losses = [self.loss_fn(self.model, batch).item() for batch in mine]
        total, count = self.ranks.sum([sum(losses), len(losses)])
        return total / max(count, 1)

    # ------------------------------------------------------------------------- resumable state
    def weight_checksum(self) -> float:
        """A number that differs between two models whose weights differ (sum of w + w² in float64)."""
        return float(sum((p.detach().double().sum() + p.detach().double().square().sum()).item()
                         for p in self.model.parameters()))

    def _checkpoint(self, epochs_done: int, history: list[EpochLog], best: float, stale: int) -> None:
        from safetensors.torch import save_file

        rng_states = self.ranks.gather(torch.get_rng_state().double().tolist())
        checksums = [values[0] for values in self.ranks.gather([self.weight_checksum()])]
        if not self.ranks.is_main:
            return
        tensors, seen = {}, set()
        for key, value in self.model.state_dict().items():
            value = value.detach().cpu().contiguous()
            if value.data_ptr() in seen:  # a tied weight (GPT-2's output layer is its embedding): a copy,
                value = value.clone()  # as safetensors stores no shared tensors
            seen.add(value.data_ptr())
            tensors[f"model.{key}"] = value
        optimizer = self.optimizer.state_dict()
        for index, slots in optimizer["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
        for rank, state in enumerate(rng_states):
            tensors["rng.torch" if rank == 0 else f"rng.torch.{rank}"] = torch.tensor(state).to(torch.uint8)
        atomic_write(self.out_dir / STATE_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        write_json(self.out_dir / STATE_JSON, {
            "epochs_done": epochs_done, "best_val_loss": best, "stale_epochs": stale,
            "param_groups": optimizer["param_groups"], "history": [asdict(h) for h in history],
            "config": asdict(self.config), "world_size": self.ranks.world_size, "rank_weight_checksums": checksums,
            "settings": self.settings,
        })

    def _restore(self, force: bool = False) -> tuple[list[EpochLog], float, int, int]:
        from safetensors.torch import load_file

        state_path = self.out_dir / STATE_JSON
        if not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {self.out_dir}: no {STATE_JSON}")
        state = read_json(state_path)
        if not force:
            self._check_same_run(state)
        try:
            tensors = load_file(str(self.out_dir / STATE_TENSORS))
            self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, slot = key.split(".", 2)
                    slots.setdefault(int(index), {})[slot] = value
            self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
            rank = self.ranks.rank
            torch.set_rng_state(tensors[f"rng.torch.{rank}" if rank and f"rng.torch.{rank}" in tensors else "rng.torch"])
            history = [EpochLog(**h) for h in state["history"]]
            best, stale, done = state["best_val_loss"], int(state["stale_epochs"]), int(state["epochs_done"])
        except Exception as error:  # noqa: BLE001  any damage to the state is reported, never half-applied silently
            raise ValueError(f"cannot resume from {self.out_dir}: {STATE_JSON} / {STATE_TENSORS} are damaged or "
                             f"from another model ({type(error).__name__}: {error}); train without --resume") from None
        if self.ranks.is_main:
            atomic_write_text(self.out_dir / LOG, "".join(dumps(asdict(h), indent=None) + "\n" for h in history))
        # best is null in the JSON when no epoch had a finite validation loss
        return history, math.inf if best is None else float(best), stale, done

    def _check_same_run(self, state: object) -> None:
        """Refuse to resume with other training settings or data than the run was started with."""
        if not isinstance(state, dict):
            return  # damaged: _restore reports it
        stored_config, stored_settings = state.get("config") or {}, state.get("settings")
        now = asdict(self.config)
        changed = [f"{name}: {stored_config.get(name)!r} then, {now[name]!r} now" for name in RESUMED_SAME
                   if name in stored_config and stored_config[name] != now[name]]
        if stored_settings is not None:
            changed += [f"{name}: {stored_settings.get(name)!r} then, {value!r} now"
                        for name, value in json.loads(dumps(self.settings)).items() if stored_settings.get(name) != value]
        if changed:
            raise InvalidValue(f"cannot resume {self.out_dir} with other settings than it was started with — "
                               f"{'; '.join(changed)}. Resume with the same ones, or force it (--force) if you "
                               "mean to change them mid-run")

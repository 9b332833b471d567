"""One training loop for every adapter: AdamW, schedules, accumulation, clipping, resume.

    for step: for each micro-batch: loss = Σ token CE / tokens in the whole step
              backward → (all-reduce grads across processes) → clip → optimizer → schedule
              every N steps: log (metrics.jsonl, progress bar), evaluate, checkpoint

One step (accumulation, ``--task-sampling per-task`` as in MTLoRA's Algorithm 2, clipping,
the optimizer and schedule) is :mod:`qpeft.core.train.step`; this module holds the loop,
signals, logging, checkpoints and resume.

Plugins act during training through the hooks that ``Plugin`` declares (on_train_begin,
on_step_begin, extra_loss, on_gradients, on_step_end, on_train_end, state_dict), called on
every plugin of the run (quantizer, adapter parts, evaluators) by ``core/train/hooks.py``;
the timeline is in docs/writing-plugins.md.
"""
import contextlib
import dataclasses
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import torch

from qpeft.core.train import checkpoint, distributed, lean, memory
from qpeft.core.settings.config import TrainConfig
from qpeft.core.base.errors import QpeftError
from qpeft.core.train.loss_log import LossLog
from qpeft.core.train.optim import apply_settings, build_optimizer, build_schedule
from qpeft.core.train.hooks import TrainFacts, TrainHooks
from qpeft.core.train.signals import Interrupted
from qpeft.core.train.step import OptimizerStep, TrainingError
from qpeft.core.train.task_sampling import TaskSampler


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (adapter init, dropout, sampling)."""
    torch.manual_seed(seed)
    random.seed(seed)


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    history: list


def enable_checkpointing(model) -> None:
    """Recompute decoder activations in backward (transformers 5 renamed the switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TrainingError("this model does not support --gradient-checkpointing; drop the flag")


class Trainer(OptimizerStep):
    """Trains the parameters of ``model`` that require grad, over ``batches``.

    ``batches`` provides ``num_batches(micro_batch)`` and ``batch(epoch, index, micro_batch,
    shard)`` → dict of tensors; its order for an epoch depends only on (seed, epoch), which
    makes the data position resumable.
    """

    def __init__(self, model, batches, config: TrainConfig, run_dir: Path, device="cpu",
                 hooks=(), evaluate=None, say=print, unverified_checkpoints: bool = False):
        self.model, self.batches, self.cfg, self.say = model, batches, config, say
        self.unverified_checkpoints = unverified_checkpoints   # the run predates checkpoint manifests
        self.damaged: list[Path] = []    # found on resume; moved aside after the next good checkpoint
        self.run_dir, self.device = Path(run_dir), torch.device(device)
        self.hooks = TrainHooks(hooks)   # plugins: the training hooks are declared on Plugin
        self.evaluate = evaluate
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters; attach an adapter first")
        lean.make_lean(model)      # same values and gradients, less held for backward
        self.dist = distributed.current()
        if config.batch_size % (config.grad_accum * self.dist.world) != 0:
            raise TrainingError(f"--batch-size {config.batch_size} must be divisible by --grad-accum "
                                f"× processes = {config.grad_accum * self.dist.world}")
        self.micro = config.batch_size // config.grad_accum
        self.tasks = TaskSampler(batches, config.task_weights) if config.task_sampling == "per-task" else None
        self.task_losses: dict = {}                  # this step's L_t, logged as task_loss/<task>
        self.optimizer = build_optimizer(self.params, config, self.device)
        self.total_steps = self._total_steps()
        self.scheduler = build_schedule(self.optimizer, config, self.total_steps)
        self.step, self.epoch, self.index = 0, 0, 0
        self.extra: dict = {}          # this step's extra loss terms, logged as loss/<name>
        self.losses = LossLog()        # loss_mean over the logging window, loss_ema
        self.eval_seconds = 0.0       # time spent on the periodic validation loss, kept out of throughput
        self.eval_every = config.eval_every if config.eval_every >= 0 else max(1, self.total_steps // 5)
        self.history: list = []
        self.stop_signal: int | None = None

    def _total_steps(self) -> int:
        if self.cfg.steps > 0:
            return self.cfg.steps
        if self.tasks is not None:
            return self.tasks.steps_per_epoch(self.micro, self.cfg.grad_accum, self.cfg.epochs)
        per_epoch = self.batches.num_batches(self.micro) // self.cfg.grad_accum
        return max(1, math.ceil(per_epoch * self.cfg.epochs))

    # -- the loop ------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        from tqdm.auto import tqdm

        seed_everything(self.cfg.seed)
        if self.dist.is_main:
            checkpoint.clean_temporaries(self.run_dir / "checkpoints")
        if resume:
            self._restore()
        self.dist.broadcast(self.params)   # every process starts from rank 0's adapter
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.train()
        facts = TrainFacts(self.total_steps, self.cfg.grad_accum, self.dist.world, self.dist.rank,
                           self.step, str(self.device))
        self.hooks.train_begin(self.model, facts)
        memory.reset_peak(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.cfg.progress or not self.dist.is_main)
        started = time.perf_counter()
        with self._deferred_signals():
            try:
                loss, tokens = self._loop(bar, started)
            finally:
                bar.close()     # an error's line starts on a line of its own
        self.model.eval()
        if self.cfg.save_every:
            self._checkpoint_unless_saved()
        self.hooks.train_end(self.model, facts)
        final = self.losses.last_mean      # the mean over the last logging window
        if math.isnan(final):   # resumed at its last step (a finished run): nothing trained now
            final = next((r.get("loss_mean", r["loss"]) for r in reversed(self.history) if "loss" in r), loss)
        seconds = time.perf_counter() - started - self.eval_seconds    # training only: validation excluded
        return TrainResult(self.step, final, seconds, tokens, self.history)

    def _loop(self, bar, started: float) -> tuple[float, int]:
        tokens, loss = 0, float("nan")
        while self.step < self.total_steps:
            self.hooks.step_begin(self.step, self.model)
            loss, n = self._optimizer_step()
            self.losses.add(loss)
            self.step += 1
            tokens += n
            bar.update(1)
            record = {}      # one metrics.jsonl line per step at most: training, validation or both
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                rate = tokens / max(time.perf_counter() - started - self.eval_seconds, 1e-9)
                record = {"step": self.step, "loss": loss, **self.extra, **self.task_losses, **self.losses.fields(),
                          "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": rate,
                          "memory_mb": memory.current_mb(self.device)}
            if self.eval_every and self.step % self.eval_every == 0 and self.evaluate:
                self.model.eval()
                began = time.perf_counter()
                record = {"step": self.step, **record, **self.evaluate(self.model)}
                self.eval_seconds += time.perf_counter() - began
                self.model.train()
            if record:
                self._log(record, bar)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save_checkpoint()
            if self._stop_requested():
                bar.close()
                self._stop()
        return loss, tokens

    # -- signals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _deferred_signals(self):
        """SIGINT/SIGTERM during training only raise a flag, read after the current step;
        a second signal stops at once (the newest checkpoint is still intact)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        kinds = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in kinds}

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.dist.is_main:
                self.say(f"qpeft: {signal.Signals(signum).name} received; stopping after step "
                         f"{self.step + 1} and saving a checkpoint (again to stop at once)")
        for s in kinds:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in kinds:
                signal.signal(s, previous[s])

    def _stop_requested(self) -> bool:
        """True when any process received a stop signal (all processes stop at one step)."""
        local = 0 if self.stop_signal is None else self.stop_signal
        if self.dist.world == 1:
            return bool(local)
        return self.dist.max_int(local) > 0

    def _stop(self):
        if self.stop_signal is None:   # another process was signalled
            self.stop_signal = signal.SIGTERM
        self._checkpoint_unless_saved()
        name = signal.Signals(self.stop_signal).name
        raise Interrupted(self.stop_signal, f"{name}: stopped at step {self.step}/{self.total_steps} "
                          f"with a checkpoint; continue with: qpeft run --resume {self.run_dir}")


    # -- logging -------------------------------------------------------------------------
    def _log(self, record: dict, bar) -> None:
        self.history.append(record)
        if "loss" in record:
            shown = {"loss": f"{record['loss_ema']:.4f}", "lr": f"{record['lr']:.1e}",
                     "tok_s": f"{record['tokens_per_s']:.0f}", "mem": f"{record['memory_mb']:.0f}MB"}
            bar.set_postfix({**shown, **({"val": f"{record['eval_loss']:.4f}"} if "eval_loss" in record else {})})
        if self.dist.is_main:
            self._write_metrics(json.dumps(record) + "\n", "a")

    def _write_metrics(self, text: str, mode: str) -> None:
        """Append to (``a``) or rewrite (``w``) ``metrics.jsonl``; a full disk is one line
        naming the file and how to continue."""
        path = self.run_dir / "metrics.jsonl"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(path, mode) as f:
                f.write(text)
        except OSError as exc:
            raise self._disk_error(exc, path) from None

    def _disk_error(self, exc: OSError, path: Path) -> QpeftError:
        """``rundir.disk_error`` for ``path``, with how to continue the run: from its newest
        checkpoint, or (none yet) from step 0."""
        from qpeft.core.base.rundir import disk_error

        error = disk_error(exc, str(path))
        newest = checkpoint.latest(self.run_dir / "checkpoints")
        if newest is not None:
            return QpeftError(f"{error}; the run continues from {newest.name} with: qpeft run --resume {self.run_dir}")
        return QpeftError(f"{error}; there is no checkpoint yet: qpeft run --resume {self.run_dir} "
                          "starts it again from step 0")

    # -- checkpoints ---------------------------------------------------------------------
    def trainable_state(self) -> dict:
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        state = {"weights": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "position": {"step": self.step, "epoch": self.epoch, "index": self.index,
                              **({"tasks": self.tasks.state()} if self.tasks is not None else {})},
                 "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                         "python_pos": random.getstate()[2]},
                 "history": self.history, "plugins": self.hooks.state(), "losses": self.losses.state()}
        directory = self._checkpoint_dir()
        keep = checkpoint.aside_name(directory) if directory in self.damaged else None
        checkpoint.save(directory, state, keep_old=keep)
        self._set_damaged_aside(directory, keep)
        return directory

    def _checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints" / f"step-{self.step:06d}"

    def _checkpoint_unless_saved(self) -> None:
        directory = self._checkpoint_dir()
        if directory in self.damaged or not directory.exists():
            self.save_checkpoint()

    def checkpoint_trained(self) -> Path:
        """The checkpoint of the current step, written now unless it is already there
        (``--save-every 0``); raises ``CheckpointError`` when it cannot be written."""
        self._checkpoint_unless_saved()
        return self._checkpoint_dir()

    def _set_damaged_aside(self, written: Path, replaced: Path | None) -> None:
        """The damaged checkpoints the resume fell back past, renamed ``damaged-step-N`` now
        that a good checkpoint is written after them (one line each): a damaged newest
        checkpoint would otherwise be tried, and fall back, on every later resume."""
        for directory in self.damaged:
            try:
                moved = replaced if directory == written else checkpoint.set_aside(directory)
            except OSError as exc:
                self.say(f"qpeft: could not move damaged checkpoint {directory.name} aside "
                         f"({exc.strerror or exc}); it stays, and is skipped on resume")
                continue
            self.say(f"qpeft: damaged checkpoint {directory.name} moved aside to {moved} "
                     f"now that {written.name} is written")
        self.damaged = []

    def _restore(self) -> None:
        found = checkpoint.load_newest(self.run_dir / "checkpoints", say=self.say if self.dist.is_main else _quiet,
                                       unverified=self.unverified_checkpoints, damaged=self.damaged)
        if found is None:
            if self.dist.is_main:
                self.say(f"qpeft: no usable checkpoint under {self.run_dir / 'checkpoints'}; "
                         "restarting this run from step 0 in place")
                self._write_metrics("", "w")
            return
        where, state = found
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_settings(self.optimizer, self.scheduler, self.cfg)
        pos = state["position"]
        self.step, self.epoch, self.index = pos["step"], pos["epoch"], pos["index"]
        if self.tasks is not None:
            self.tasks.load(pos.get("tasks"))
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), state["rng"]["python_pos"]))
        self.history = list(state["history"])
        self.losses.load(state.get("losses"))
        self.hooks.load(state.get("plugins"), where.name, self.say if self.dist.is_main else _quiet)
        if self.dist.is_main:  # drop lines logged after that checkpoint by the killed run
            self._write_metrics("".join(json.dumps(r) + "\n" for r in self.history), "w")


def _quiet(line: str) -> None:
    """A ``say`` for processes other than rank 0."""

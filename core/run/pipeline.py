"""The run pipeline, as named stages (each a function of this module, run by ``_run_locked``;
the evaluations are in :mod:`qpeft.core.run.evaluation`, whose names are re-exported here):

    plan          every name resolved, every input checked, data read — before any load;
                  every plugin's on_data(facts) (the data's tasks: MTLoRA sizes itself to them)
    load          streaming.load_quantized: each layer quantized as it is read
    (record)      run_record.RunRecord written to RUN_DIR/config.json (an overwritten run swapped out now)
    evaluate_before   the evaluators on the quantized model ("before", kept for --resume)
    attach        the adapter attached under the run's seed (and --init-adapter's weights loaded)
    calibrate     a data-driven init (EVA…) sees the run's first training batches (applied again on --resume)
    trainer_for   the Trainer over the encoded data ─▶ train (resumes from RUN_DIR/checkpoints)
    save_adapter  RUN_DIR/adapter in PEFT's format
    evaluate      the evaluators "after" (and each variant an adapter asks for)
    report        report.{json,md} + loss.png

Every name is resolved and every input checked before the model is loaded, so a typo
costs a second, not a conversion.
"""
import dataclasses
import signal
from pathlib import Path

from qpeft.core.dataset import examples as datasets
from qpeft.core.train import distributed, memory
from qpeft.core.model import models, streaming
from qpeft.core.base import rundir
from qpeft.core.plugin import registry
from qpeft.core.run import calibration, evaluation, report, record as run_record
from qpeft.core.run.stages import Stages
from qpeft.core.dataset import templates
from qpeft.core.kinds.adapter import compose
from qpeft.core.dataset.batch_source import EncodedBatches
from qpeft.core.dataset.batching import pack
from qpeft.core.train.loss import mean_loss
from qpeft.core.settings.config import RunConfig
from qpeft.core.base.errors import QpeftError
from qpeft.core.plugin.base import Plugin
from qpeft.core.plugin.build import build_plugin
from qpeft.core.kinds.quantizer import model_bytes
from qpeft.core.run.record import RunRecord
from qpeft.core.base.spec import split_list
from qpeft.core.train.signals import Interrupted, Stopped, StopAtOnce
from qpeft.core.train.hooks import TrainHooks
from qpeft.core.train.trainer import Trainer, seed_everything

_EVALUATION = ("eval_context", "encoder", "task_router", "by_task", "evaluate", "evaluate_variants",
               "evaluate_before", "_template", "_quiet")


def __getattr__(name: str):
    """The evaluation stages' names, still importable from here (``pipeline.evaluate``, …):
    looked up in :mod:`~qpeft.core.run.evaluation` on each use, so that both name one function
    (a test that replaces ``evaluation.evaluate`` replaces it for every caller)."""
    if name in _EVALUATION:
        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class Plan:
    """The plugins and data of a run, resolved and checked."""

    quantizer: Plugin
    adapter: object                # a Composition
    evaluators: list
    train: list
    validation: list
    test: list
    init: object = None            # --init-adapter: the adapter directory read and checked (peft_import)


def plan(cfg: RunConfig, record: RunRecord | None = None) -> Plan:
    """Resolve plugins and load data; fails fast with one-line errors. With the ``record``
    of a finished run, its quantizer and adapter are rebuilt from what it recorded (not
    re-parsed from the specs), so evaluating a run again uses the plugins it trained with."""
    reg = registry.default()
    if record is not None:
        quantizer, init, adapter = record.build_quantizer(reg), None, record.composition(reg)
    else:
        quantizer = build_plugin("quantizer", cfg.quant, reg)
        init = init_adapter(cfg, reg) if cfg.init_adapter else None
        adapter = init.composition if init else compose(cfg.adapter, reg)
    evaluators = [build_plugin("evaluator", s, reg) for s in split_list(cfg.evaluators)]
    if cfg.data is None:
        train, validation = datasets.split(datasets.bundled("train"), cfg.validation_split, cfg.train.seed)
        test = datasets.bundled("test")
    else:
        train, validation = datasets.load_splits(cfg.data, cfg.validation_data, cfg.data_format,
                                                 cfg.validation_split, cfg.train.seed, cfg.skip_bad_lines)
        test = [e for e in validation if e.answer is not None]
    if cfg.eval_limit:
        validation, test = validation[:cfg.eval_limit], test[:cfg.eval_limit]
    models.check(cfg.model)
    facts = datasets.data_facts(train)
    check_tasks(cfg, facts)
    TrainHooks([quantizer, *adapter.parts, *evaluators]).data(facts)
    return Plan(quantizer, adapter, evaluators, train, validation, test, init)


def check_tasks(cfg: RunConfig, facts) -> None:
    """``--task-sampling per-task`` needs tasks, and ``--task-weights`` names only tasks the data has."""
    from qpeft.core.settings.config import task_weight_values

    if cfg.train.task_sampling != "per-task":
        return
    if not facts.tasks:
        raise QpeftError("--task-sampling per-task needs training examples with a 'task' (docs/data.md); "
                         "none has one: drop the flag or add tasks")
    unknown = sorted(set(task_weight_values(cfg.train.task_weights)) - set(facts.tasks))
    if unknown:
        raise QpeftError(f"--task-weights names task '{unknown[0]}', which no training example has; "
                         f"tasks: {', '.join(facts.tasks)}")


def init_adapter(cfg: RunConfig, reg):
    """The adapter directory of ``--init-adapter``, read and checked before the model loads
    (PEFT's format, from any tool); the run's adapter spec becomes the one it amounts to."""
    from qpeft.core.interop import peft_import

    init = peft_import.read(cfg.init_adapter, reg, given=cfg.adapter)
    cfg.adapter = init.spec
    return init


def run_mode(cfg: RunConfig) -> str:
    """"new", "resume" or "overwrite", decided before anything is loaded or written."""
    run_dir = rundir.inside(cfg.output_dir, cfg.run_name)
    if cfg.resume:
        if not run_dir.is_dir():
            raise QpeftError(f"nothing to resume at {run_dir}; start it without --resume")
        return "resume"
    if run_dir.exists():
        if not cfg.overwrite:
            raise QpeftError(f"{run_dir} exists; pass --resume to continue it, --overwrite to "
                             "replace it, or --name to choose another")
        return "overwrite"
    return "new"


def open_run_dir(cfg: RunConfig, mode: str, record: RunRecord) -> Path:
    """The run directory with its record written; an overwritten run is swapped out
    only now, after the new run has loaded its model (build beside, swap in)."""
    if mode == "resume":
        run_record.write(cfg.run_dir, record)
        return cfg.run_dir
    with rundir.Staged(cfg.run_dir) as staged:
        run_record.write(staged.path, record)
        return staged.commit()


def run(cfg: RunConfig, say=print) -> dict:
    """Run the whole pipeline; returns the report (also written under the run directory).

    The run's name is locked for the life of the process; every input is checked and the
    model loaded before anything under the run directory is written or replaced.
    """
    p = plan(cfg)
    rundir.inside(cfg.output_dir, cfg.run_name)
    world = distributed.current()
    if not world.is_main:   # rank 0 owns the directory and speaks; the others follow it quietly
        return _run_locked(cfg, p, world, "resume" if cfg.resume else "new", evaluation._quiet)
    with rundir.RunLock(cfg.output_dir, cfg.run_name):
        return _run_locked(cfg, p, world, run_mode(cfg), say)


def _run_locked(cfg: RunConfig, p: Plan, world, mode: str, say) -> dict:
    """The stages of a run, in order (each a function below)."""
    device = distributed.device_for(cfg.device)
    record = RunRecord.started(cfg, p, cfg.run_name)
    if mode == "resume":    # what the checkpoints cannot serve is refused before anything is written
        record = run_record.resumed(cfg.run_dir, record)
    stages = Stages()
    model, tokenizer, facts = load(cfg, p, device, world, say)
    stages.done("load")
    run_dir = open_run_dir(cfg, mode, record) if world.is_main else cfg.run_dir
    world.barrier()
    ctx = evaluation.eval_context(cfg, model, tokenizer, device, p.validation, p.test,
                                  [p.quantizer, *p.adapter.parts, *p.evaluators])
    before = evaluation.evaluate_before(cfg, p, ctx, facts, run_dir, mode == "resume", world, say, device)
    stages.done("before")
    attach(cfg, p, model)
    batches, stats = training_batches(cfg, p, tokenizer)
    calibrate(cfg, p, model, batches, device, world, run_dir, mode == "resume", say)
    trainer = trainer_for(cfg, p, model, tokenizer, batches, run_dir, device, say,
                          run_record.predates_manifests(record.qpeft_version))
    stages.done("prepare")
    result = trainer.train(resume=mode == "resume")
    stages.done("train")
    saved = []    # the adapter, once written by this process
    try:
        with StopAtOnce() as stops:    # a signal now stops at once, with the line saying how to finish
            facts.update(memory.peaks(trainer.device), train_seconds=round(result.seconds, 2),
                         tokens_per_s=round(result.tokens / max(result.seconds, 1e-9), 1))
            if world.is_main:
                with stops.held():      # the adapter is written whole, then the signal acts
                    facts["adapter_disk_mb"] = save_adapter(p, model, run_dir, record, trainer)
                    saved.append(run_dir / "adapter")
            stages.done("save")
            after = evaluation.evaluate(p.evaluators, ctx(stage="after", facts=dict(facts)), say)
            after.update(evaluation.evaluate_variants(p, model, ctx, facts, say))
            facts["stage_seconds"] = stages.done("after")
            out = report.build(record, before, after, facts, result, stats, p.evaluators,
                               p.adapter.method.report_facts(model))
            if world.is_main:
                with stops.held():
                    report.write(run_dir, out, result.history)
                say(f"qpeft: done; report at {run_dir / 'report.md'}")
    except Stopped as stop:
        raise _stopped_after_training(stop.signum, trainer, run_dir, saved) from None
    return out


def _stopped_after_training(signum: int, trainer, run_dir: Path, saved: list) -> Interrupted:
    """SIGINT/SIGTERM after training finished (saving the adapter, evaluating, reporting): the
    trained state is checkpointed unless it already is (``--save-every 0``), so that
    ``--resume`` finishes the run without training again; the line says how to go on."""
    from qpeft.core.train.checkpoint import CheckpointError

    name = signal.Signals(signum).name
    where = f"{name}: stopped after training finished (step {trainer.step}/{trainer.total_steps}), " \
            "before the report was written"
    try:
        kept = trainer.checkpoint_trained()   # rank 0 writes it; the others name it
    except CheckpointError as exc:
        reason = str(exc).split(";")[0]    # what failed, without the hint for training
        if saved:
            return Interrupted(signum, f"{where}; the adapter is saved in {saved[0]} but no checkpoint could "
                                       f"be written ({reason}), so qpeft run --resume would train again from step 0; "
                                       f"evaluate the adapter with: qpeft eval {run_dir}")
        return Interrupted(signum, f"{where}; the adapter is not saved and no checkpoint could be written ({reason}); "
                                   f"qpeft run --resume {run_dir} trains again from step 0")
    return Interrupted(signum, f"{where}, with a checkpoint ({kept.name}); finish with: qpeft run --resume "
                               f"{run_dir} (it does not train again: it saves the adapter, evaluates and reports)")


def load(cfg: RunConfig, p: Plan, device, world, say):
    """Stage 1: the model, quantized layer by layer as it is read; ``(model, tokenizer, facts)``."""
    for line in choices(cfg, p, device):
        say(line)
    model, tokenizer, loaded = streaming.load_quantized(cfg.model, p.quantizer, device, progress=world.is_main,
                                                        keep_source=p.adapter.needs_source_weights,
                                                        float32_activations=p.adapter.needs_float32_activations,
                                                        cache=not cfg.no_cache, say=say)
    if loaded["base_cache"] == "read":
        say(f"  quantized base: read from the cache in {loaded['quantize_seconds']:.1f} s "
            "(verified; --no-cache quantizes afresh; see qpeft cache list)")
    facts = {"model_mb_before": round(loaded["model_mb_before"], 2),
             "quantized_model_mb": round(model_bytes(model) / 2**20, 2),
             "quantize_seconds": round(loaded["quantize_seconds"], 2), "base_cache": loaded["base_cache"]}
    return model, tokenizer, facts


def choices(cfg: RunConfig, p: Plan, device) -> list[str]:
    """A run's first lines: the model, quantizer, adapter, precision and device chosen, and why."""
    q = p.quantizer
    activations = "float32 (the adapter needs them)" if p.adapter.needs_float32_activations else q.options.compute_dtype
    why = "--device" if cfg.device not in (None, "auto") else ("auto: CUDA is available" if str(device).startswith("cuda")
                                                             else "auto: no CUDA GPU")
    return [f"qpeft: loading {cfg.model or models.EMBEDDED} on {device} ({why})",
            f"qpeft: quantizer {cfg.quant} · adapter {p.adapter.spec} · matmuls in {q.options.compute_dtype} "
            f"({q.dtype_reason}) · activations {activations}"]


def attach(cfg: RunConfig, p: Plan, model) -> None:
    """Stage 3: the adapter attached (its initialisation is part of the run's seed), and
    the weights of ``--init-adapter`` loaded into it."""
    seed_everything(cfg.train.seed)
    p.adapter.attach(model)
    if p.init is not None:
        p.init.load(model)


def training_batches(cfg: RunConfig, p: Plan, tokenizer):
    """The encoded (and, with --packing, packed) training set; ``(EncodedBatches, encode stats)``."""
    items, stats = templates.encode_all(p.train, tokenizer, evaluation._template(cfg), cfg.max_length, cfg.train_on_prompt)
    if cfg.packing and cfg.train.task_sampling == "per-task":    # each task packed alone: rows keep their task
        items = [row for group in evaluation.by_task(items).values() for row in pack(group, cfg.max_length, cfg.train.seed)]
    elif cfg.packing:
        items = pack(items, cfg.max_length, cfg.train.seed)
    return EncodedBatches(items, tokenizer.pad_token_id, cfg.train.seed), stats


def calibrate(cfg: RunConfig, p: Plan, model, batches, device, world, run_dir: Path, resuming: bool, say) -> None:
    """Stage 3b: a data-driven init (EVA…) looks at the run's first training batches
    (:mod:`qpeft.core.run.calibration`); a resumed run applies what it computed then, and an
    ``--init-adapter`` brings its own (applied when it was loaded)."""
    if p.init is not None:
        return
    if resuming:
        calibration.restore(p.adapter, model, run_dir)
        return
    micro = max(cfg.train.batch_size // (cfg.train.grad_accum * world.world), 1)
    calibration.calibrate(p.adapter, model, batches, micro, device, world, run_dir, say)


def trainer_for(cfg: RunConfig, p: Plan, model, tokenizer, batches, run_dir: Path, device, say,
                unverified_checkpoints: bool = False):
    """Stage 4: the trainer over the training ``batches``, with the validation loss as its
    periodic evaluation. ``unverified_checkpoints``: the run was started by a qpeft that
    wrote no manifests."""
    val_items = [i for i in map(evaluation.encoder(cfg, tokenizer), p.validation) if i is not None]
    plugins = [p.quantizer, *p.adapter.parts, *p.evaluators]
    route = evaluation.task_router(plugins, model)

    def validation_loss(m) -> dict:
        if route is None:
            loss, _ = mean_loss(m, val_items, tokenizer.pad_token_id, device=device)
            return {"eval_loss": loss}
        total, count = 0.0, 0           # each task's examples under that task's routing
        for task, group in evaluation.by_task(val_items).items():
            route(task)
            loss, n = mean_loss(m, group, tokenizer.pad_token_id, device=device)
            total, count = total + loss * n, count + n
        route(None)
        return {"eval_loss": total / max(count, 1)}

    trainer = Trainer(model, batches, cfg.train, run_dir, device, evaluate=validation_loss,
                      hooks=plugins, say=say,
                      unverified_checkpoints=unverified_checkpoints)
    return trainer


def save_adapter(p: Plan, model, run_dir: Path, record: RunRecord, trainer=None) -> float:
    """Stage 5: ``run_dir/adapter`` in PEFT's format (atomically); returns its size in MiB.
    When it cannot be written, the trained state is checkpointed (unless it already is) and
    the one line says what to free and how to finish the run."""
    from qpeft.core.kinds.peft_format import AdapterWriteError

    try:
        p.adapter.method.save(model, run_dir / "adapter", record.adapter_meta())
    except AdapterWriteError as exc:
        raise _unsaved(exc, trainer, run_dir) from None
    return round(sum(f.stat().st_size for f in (run_dir / "adapter").iterdir()) / 2**20, 3)


def _unsaved(exc, trainer, run_dir: Path) -> QpeftError:
    kept = run_dir / "checkpoints" / f"step-{trainer.step:06d}" if trainer is not None else None
    if kept is not None and not (kept / "COMPLETE").is_file():
        try:
            trainer.save_checkpoint()
        except QpeftError:
            kept = None
    free = f"free at least {exc.nbytes / 2**20:.2f} MB on the disk of {run_dir}"
    if kept is not None:
        return QpeftError(f"cannot write the adapter {exc.directory}: {exc.reason}; the trained state is kept "
                          f"in {kept}: {free}, then finish the run with: qpeft run --resume {run_dir}")
    return QpeftError(f"cannot write the adapter {exc.directory} nor a checkpoint: {exc.reason}; this training "
                      f"is lost: {free}, then train again with: "
                      f"qpeft run --resume {run_dir}")

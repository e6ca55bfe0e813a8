"""The training loop: `train(cfg, run_dir=...)` -> RUN_DIR/training_results.json.

Per epoch: train on the train part (BCEWithLogits, Adam, mixed precision), evaluate every validation
patch (predictions gathered across DDP ranks, aggregated per stack), early-stop on the selection key
(evaluator.selection_key: F1 of MALADE at `train.select_level`, ties on stack ROC-AUC, then validation
loss), then, on rank 0 only, append the epoch to the results file, write best.pt (when improved) and
last.pt, in that order: a kill -9 at any point leaves a results file that holds
every epoch of last.pt or one more, and `resume` redoes the epoch after last.pt.
Rank 0 holds the run directory (RUN_DIR/.lock) for the whole run; a resume keeps the run's config except
the keys of train/resume.py RESUMABLE, and onto the same store and train/val stacks.
Optional pieces are plain objects: Runtime (device, DDP), Precision, Monitor (bar, log, TensorBoard).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from stacktrain import signals
from stacktrain.errors import EvalError
from stacktrain.io import hold_dir
from stacktrain.stores.intensity import mapping_of
from stacktrain.train import checkpoint as ckpts
from stacktrain.train.config import ConfigError, TrainConfig, config_to_dict, save_config
from stacktrain.train.data import make_loader, one_class_warning, open_data, resolve_norm
from stacktrain.train.early_stopping import EarlyStopping
from stacktrain.train.evaluator import THRESHOLD, EvalResult, Evaluator, check_coverage
from stacktrain.train.models import build_model
from stacktrain.train.monitor import Monitor
from stacktrain.train.precision import Precision
from stacktrain.train.preflight import preflight
from stacktrain.train.results import RESULTS_NAME, environment_info, epoch_entry, load_results, new_results, now
from stacktrain.train.results_io import ResultsWriter
from stacktrain.train.resume import check_data_identity, config_changes, config_comment, data_identity
from stacktrain.train.runtime import Runtime, cpu_threads, deterministic_algorithms, seed_everything, setup_runtime
from stacktrain.train.split import store_identity
from stacktrain.train.step import TrainStep, to_model_input

CONFIG_NAME = "config.toml"
EVAL_FIELDS = ("stack_index", "position", "logit", "label")


def train(cfg: TrainConfig, *, run_dir: Path, resume: bool = False,
          on_epoch: Callable[[int, dict], bool] | None = None) -> Path:
    """Train as `cfg` says into `run_dir` (continuing from its last.pt when `resume`).

    `on_epoch(epoch, entry)` runs on rank 0 after each epoch's results are written; True stops the
    run with stop_reason "pruned". Returns the path of the results file.
    """
    run_dir, level = Path(run_dir), cfg.train.select_level
    results_path = run_dir / RESULTS_NAME
    preflight(cfg)  # every device/precision/loader problem at once, and the memory estimate, before anything starts
    rt = setup_runtime(cfg.train.device)
    with contextlib.ExitStack() as stack:
        stack.callback(rt.close)
        if rt.is_main:  # one process writes a run directory; it clears the temp files a kill left
            stack.enter_context(hold_dir(run_dir, "run", _busy))
        stack.enter_context(deterministic_algorithms(rt.device.type == "cpu"))
        stack.enter_context(cpu_threads(rt, cfg.loader.workers))
        store, train_ids, val_ids = open_data(cfg)
        cfg = resolve_norm(cfg, store, train_ids)
        identity = data_identity(store_identity(store), train_ids, val_ids)
        identity["intensity"] = mapping_of(store)  # predict refuses a store of other intensities
        if resume and not (run_dir / ckpts.LAST).exists() and rt.is_main:
            # killed inside its first epoch, before any last.pt: nothing to continue, so start afresh
            (run_dir / RESULTS_NAME).unlink(missing_ok=True)
            resume = False
        resume = rt.broadcast(resume)
        _check_run_dir(run_dir, resume)
        seed_everything(cfg.train.seed)
        model, net, train_net, notice = _build_model(cfg, rt)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        prec = Precision.create(cfg.train.precision, rt.device)
        pos_weight = None if cfg.optim.pos_weight is None else torch.tensor(cfg.optim.pos_weight, device=rt.device)
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        stopper = EarlyStopping(cfg.train.patience, cfg.train.min_delta)
        config = config_to_dict(cfg)
        results, start = new_results(config, environment_info(rt.device, rt.world_size)), 0
        if resume:
            last_pt = run_dir / ckpts.LAST
            ckpt = ckpts.load_checkpoint(last_pt, model_name=cfg.model.name, model_tiny=cfg.model.tiny)
            changes = config_changes(ckpt["config"], config, epoch=ckpt["epoch"] + 1, where=last_pt)
            check_data_identity(ckpt.get("data"), identity, last_pt)
            start = ckpts.restore(ckpt, model=model, optimizer=optimizer, scaler=prec.scaler,
                                  early_stopping=stopper, where=last_pt) + 1
            kept = load_results(results_path, upto_epoch=start - 1)
            results = {**kept, "config": config, "best_epoch": stopper.best_epoch}  # last.pt's, not a dropped one's
            # changes made before this epoch stay; one recorded by a resume killed before its first last.pt
            # is recorded again now
            recorded = [c for c in kept.get("config_changes", []) if c["epoch"] < start] + changes
            if recorded:
                results["config_changes"] = recorded
            if rt.is_main:
                ckpts.repair_best(run_dir, best_epoch=stopper.best_epoch, last_epoch=start - 1)
            if stopper.should_stop or start >= cfg.train.epochs:  # it had finished: make the file say why
                if rt.is_main:  # (load_results cleared the stop reason; a changed key is recorded too)
                    results["stop_reason"] = "early_stopping" if stopper.should_stop else "max_epochs"
                    _save_config(cfg, run_dir, results)
                    ResultsWriter(results_path, results)
                return results_path
        train_loader = stack.enter_context(make_loader(cfg, store, train_ids, train=True, rt=rt))
        val_loader = stack.enter_context(make_loader(cfg, store, val_ids, train=False, rt=rt))
        check_coverage(val_loader.index)  # the foreground filter never drops a validation stack
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _save_config(cfg, run_dir, results)
            writer = ResultsWriter(results_path, results)  # a resume rewrites it once, with the epochs kept
        monitor = Monitor(run_dir, enabled=rt.is_main, epochs=cfg.train.epochs,
                          log_interval=cfg.train.log_interval, device=rt.device)
        stack.callback(monitor.close)
        for line in (notice, one_class_warning(store, train_ids, val_ids)):
            if line:
                monitor.print(line)
        monitor.print(f"training {cfg.model.name}{' (tiny)' if cfg.model.tiny else ''} on {rt.device} "
                      f"x{rt.world_size} ({prec.name}, loader {train_loader.kind}): {len(train_ids)} train "
                      f"stacks, {len(train_loader)} batches/epoch/rank, {len(val_ids)} val stacks -> {run_dir}"
                      + (f" (resumed after epoch {start - 1})" if start else ""))
        for epoch in range(start, cfg.train.epochs):
            t0 = time.perf_counter()
            train_loss, throughput = train_epoch(train_net, train_loader, epoch, optimizer=optimizer,
                                                 criterion=criterion, prec=prec, rt=rt, monitor=monitor)
            evaluation = evaluate(net, val_loader, cfg, prec=prec, rt=rt, monitor=monitor, epoch=epoch)
            improved = stopper.step(evaluation.selection_key(level), epoch)
            last = epoch + 1 == cfg.train.epochs
            stop_reason = "early_stopping" if stopper.should_stop else "max_epochs" if last else None
            entry = epoch_entry(epoch=epoch, train_loss=rt.mean(train_loss), lr=optimizer.param_groups[0]["lr"],
                                evaluation=evaluation, throughput=throughput, wall_s=time.perf_counter() - t0)
            if not (math.isfinite(entry["train_loss"]) and math.isfinite(entry["val_loss"])):
                raise EvalError(f"{run_dir}: epoch {epoch} diverged (train loss {entry['train_loss']}, val loss "
                                f"{entry['val_loss']}); lower optim.lr or set optim.pos_weight, then start "
                                "afresh or --resume from the last good epoch")
            pruned = False
            if rt.is_main:
                with signals.deferred():  # Ctrl-C / SIGTERM waits for this epoch's files, then stops
                    # The epoch, then last.pt, then best.pt (a copy of it), and only then the stop reason: a kill
                    # anywhere leaves a run that --resume (or a study rerun) completes, never a "finished" run
                    # whose checkpoints disagree with its results.
                    writer.append(entry, best_epoch=stopper.best_epoch, stop_reason=None, updated_at=now())
                    ckpts.save_checkpoint(run_dir / ckpts.LAST, model=model, optimizer=optimizer, scaler=prec.scaler,
                                          epoch=epoch, early_stopping=stopper, config=config,
                                          model_name=cfg.model.name, model_tiny=cfg.model.tiny, data=identity,
                                          threshold=evaluation.threshold)
                    if improved:
                        ckpts.copy_checkpoint(run_dir / ckpts.LAST, run_dir / ckpts.BEST)
                    if stop_reason is not None:
                        writer.append(None, best_epoch=stopper.best_epoch, stop_reason=stop_reason, updated_at=now())
                    monitor.epoch_line(entry, improved=improved, level=level)
                    if on_epoch is not None and on_epoch(epoch, entry) and stop_reason is None:
                        pruned = True
                        writer.append(None, best_epoch=stopper.best_epoch, stop_reason="pruned", updated_at=now())
            if rt.broadcast(pruned) or stop_reason is not None:
                break
        best = stopper.best_score[0] if isinstance(stopper.best_score, tuple) else stopper.best_score or 0.0
        if rt.is_main:
            monitor.print(f"stopped: {writer.stop_reason}; best epoch {writer.best_epoch} (val F1 MALADE at "
                          f"{level} level {best:.4f}); results: {results_path}")
    return results_path


def train_epoch(net: nn.Module, loader, epoch: int, *, optimizer, criterion, prec: Precision, rt: Runtime,
                monitor: Monitor) -> tuple[float, dict]:
    """One pass over this rank's training batches: (mean loss, throughput stats)."""
    net.train()
    loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no sync per step
    meter = monitor.meter("train", epoch, len(loader), loader.cfg.batch_size)
    step = TrainStep(net, optimizer, criterion, prec, rt.device)
    for batch in meter.iterate(loader.epoch(epoch)):
        loss_sum += step(batch)
        meter.step(loss_sum)
    train_loss = loss_sum.item() / max(meter.steps, 1)  # waits for the device: the timing below is true
    return train_loss, {**meter.finish(rt.world_size), "optimizer_steps": meter.steps}  # the run's budget


@torch.no_grad()
def evaluate(net: nn.Module, loader, cfg: TrainConfig, *, prec: Precision, rt: Runtime, monitor: Monitor,
             epoch: int = 0, threshold: float | None = None) -> EvalResult:
    """Every validation patch once; predictions of all ranks gathered before aggregation. Stacks are
    decided at `threshold`, or by train.threshold when None (0.5, or tuned on these stacks)."""
    net.eval()
    if threshold is None:
        threshold = "tuned" if cfg.train.threshold == "tuned" else THRESHOLD
    options = dict(aggregate=cfg.train.aggregate, topk=cfg.train.topk, pos_weight=cfg.optim.pos_weight,
                   threshold=threshold, padded=loader.index.padded_fraction)
    local = Evaluator(loader.stack_ids, **options)
    meter = monitor.meter("val", epoch, len(loader), loader.cfg.batch_size)
    for batch in meter.iterate(loader.epoch(epoch)):
        images = to_model_input(batch, rt.device, prec)  # normalised on the device, like training's
        with prec.autocast():
            logits = net(images)
        local.add(batch.stack_index, batch.position, logits.float(), batch.labels)
        meter.step()
    meter.finish()
    merged = Evaluator(loader.stack_ids, **options)
    for arrays in rt.gather(local.arrays()):
        merged.add(*(arrays[k] for k in EVAL_FIELDS))
    return merged.finalize()


def _build_model(cfg: TrainConfig, rt: Runtime) -> tuple[nn.Module, nn.Module, nn.Module, str | None]:
    """(model: what checkpoints hold; net: model compiled or not, for validation; train_net: what
    trains, the model under DDP when distributed, compiled or not; a notice to print, or None).
    torch.compile is left out under DDP with SyncBatchNorm, where it graph-breaks or fails
    (pytorch/pytorch#161302, #107372)."""
    model = build_model(cfg.model.name, tiny=cfg.model.tiny, options=cfg.model.options)
    cuda = rt.device.type == "cuda"
    if rt.distributed and cuda:  # normalise over the global batch: N GPUs train like one
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fmt = torch.channels_last_3d if cuda and cfg.train.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=fmt)
    if cuda:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    compile_it, notice = cfg.train.compile, None
    if compile_it and rt.distributed and cuda:
        compile_it = False
        notice = ("train.compile = true ignored: torch.compile does not work with DDP + SyncBatchNorm "
                  "(pytorch#161302, #107372); training uncompiled")
    maybe_compile = torch.compile if compile_it else (lambda m: m)
    net = maybe_compile(model)
    if not rt.distributed:
        return model, net, net, notice
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model, device_ids=[rt.device.index] if cuda else None)
    return model, net, maybe_compile(ddp), notice  # compile the DDP wrapper, as torch advises


def _save_config(cfg: TrainConfig, run_dir: Path, results: dict) -> None:
    """config.toml: the config in force, headed by the record of the changes --resume made."""
    save_config(cfg, run_dir / CONFIG_NAME, header=config_comment(results.get("config_changes", [])))


def _busy(run_dir: Path) -> str:
    return (f"{run_dir}: another process is training into this run directory (it holds {run_dir}/.lock); wait "
            "for it to finish, or choose another --run-dir / train.run_name")


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and (run_dir / RESULTS_NAME).exists():
        raise ConfigError(f"{run_dir}: already holds a run ({RESULTS_NAME}); continue it with --resume "
                          f"{run_dir}, or choose another --run-dir / train.run_name")

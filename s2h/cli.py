"""Command line: ``s2h prune | export | bench | info`` (also ``python -m s2h ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default, except for flags (off unless given) and the ``None``
    of options whose help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction,
                                                         argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    from .trainer import PruneConfig  # torch: only when `prune` is the command

    d = PruneConfig()
    p.add_argument("--model", default=d.model,
                   help="s2h.models name (resnet20, resnet56, wrn28_10, ...) or any timm model")
    p.add_argument("--dataset", default=d.dataset,
                   choices=["fashion-mnist", "synthetic", "cifar100", "imagefolder"],
                   help="training data")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: per dataset)")
    p.add_argument("--target-flops", type=float, default=d.target_flops,
                   help="remaining FLOPs fraction in (0, 1] (0.35 keeps 35%%)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="limit an epoch to this many steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size (split over the processes under torchrun)")
    p.add_argument("--lr", type=float, default=d.lr, help="weights' learning rate (AdamW)")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help="gates' learning rate")
    p.add_argument("--gate-schedule", default=d.gate_schedule, choices=["constant", "cosine"],
                   help="gates' learning-rate schedule; cosine (default) follows the weights' "
                        "warm-up + cosine")
    p.add_argument("--resource-mode", default=d.resource_mode,
                   choices=["normalized", "quadratic"],
                   help="normalized (default): per gate, the FLOPs gradient is rescaled to "
                        "--resource-ratio x the norm of the gate's other gradients, faded "
                        "within --resource-band of the target; quadratic: lam*(r-T)^2")
    p.add_argument("--resource-ratio", type=float, default=d.resource_ratio,
                   help="normalized resource gradient / other gradients, per gate")
    p.add_argument("--resource-band", type=float, default=d.resource_band,
                   help="FLOPs-ratio band around the target in which the normalized resource "
                        "gradient fades (factor min((r-T)^2/band^2, 1))")
    p.add_argument("--gate-warmup-steps", type=int, default=d.gate_warmup_steps, metavar="N",
                   help="train the dense weights N steps before the gates train")
    p.add_argument("--importance-from", default=d.importance_from, choices=["warmup", "init"],
                   help="channel importance (L1) order: taken at the end of the gate warm-up "
                        "(default; training from scratch) or from the starting weights")
    p.add_argument("--freeze-arch-at", type=float, default=d.freeze_arch_at, metavar="F",
                   help="fraction of training after which the architecture is fixed (projected "
                        "onto the budget if above it) and only the weights train; 1: at the end")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip the weights' gradient norm (0: no clipping)")
    p.add_argument("--variant", default=d.variant,
                   choices=["s2h", "no_gap", "coupled_gap", "direct_hard"],
                   help="s2h, or one of the paper's ablations")
    p.add_argument("--method", default=d.method, choices=["s2h", "stp"],
                   help="s2h (Soft-to-Hard, default) or stp (stimulative-training pruning over "
                        "width and depth)")
    p.add_argument("--stp-trials", type=int, default=d.stp_trials,
                   help="STP: training steps per exploration round (with --stp-scoring trial: "
                        "steps each candidate is trained before a commit)")
    p.add_argument("--stp-width-step", type=int, default=d.stp_width_step,
                   help="STP: divisor steps a width candidate narrows by")
    p.add_argument("--stp-commits-per-round", type=int, default=d.stp_commits_per_round,
                   help="STP: best candidates committed per exploration round")
    p.add_argument("--stp-scoring", default=d.stp_scoring, choices=["probe", "trial"],
                   help="STP: probe scores every candidate by no-grad forwards on the first "
                        "--stp-probe-size samples of the round's batches; trial trains each "
                        "candidate in turn (a round then lasts trials x candidates steps)")
    p.add_argument("--stp-probe-size", type=int, default=d.stp_probe_size,
                   help="STP: samples per batch the candidates are scored on (probe scoring)")
    p.add_argument("--stp-expand-prob", type=float, default=d.stp_expand_prob, metavar="P",
                   help="STP: probability per step of also training a sub-network sampled "
                        "between the base and the full network (subnet mutating expansion)")
    p.add_argument("--stp-depth", action=argparse.BooleanOptionalAction, default=d.stp_depth,
                   help="STP: also explore dropping residual blocks (--no-stp-depth: width only)")
    p.add_argument("--stp-kd-weight", type=float, default=d.stp_kd_weight,
                   help="STP: weight of the sub-network(s)' KL terms")
    p.add_argument("--stp-rank", default=d.stp_rank, choices=["kd", "kd_per_flop"],
                   help="STP: how a round's candidates are ranked for a commit: kd (their KD "
                        "loss, METHOD §8) or kd_per_flop (the KD loss they add to the base's per "
                        "FLOPs ratio they save; probe scoring only)")
    p.add_argument("--stp-full-weight-after", type=float, default=d.stp_full_weight_after,
                   help="STP: weight of the full network's loss on the labels once the "
                        "architecture is fixed (1: trained as during the exploration, METHOD "
                        "§8; the default 0.5 was chosen on a validation split)")
    p.add_argument("--stp-label-weight", type=float, default=d.stp_label_weight,
                   help="STP: weight of the trained sub-network's own loss on the labels, added "
                        "to its KD term (0: it learns from the full network's output only, "
                        "METHOD §8)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay of the weights (gates: none)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="gap (distillation) weight")
    p.add_argument("--lam", type=float, default=d.lam, help="resource loss weight")
    p.add_argument("--divisor", type=int, default=d.divisor, help="width granularity")
    p.add_argument("--amp", default=d.amp, choices=["none", "bf16", "fp16"],
                   help="mixed precision")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help="also write OUT/checkpoint.pt every N steps (besides every epoch end)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to OUT/tensorboard (if the tensorboard package is installed)")
    p.add_argument("--no-plots", action="store_true", help="do not draw OUT/plots/*.png")
    p.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                   help="write a metrics.jsonl row every N steps")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every generator")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader workers")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="limit evaluation to this many test batches")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="skip training the dense reference for the final table")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args):
    from .trainer import PruneConfig

    return PruneConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir,
        target_flops=args.target_flops, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr,
        weight_decay=args.weight_decay, alpha=args.alpha, lam=args.lam, divisor=args.divisor,
        gate_schedule=args.gate_schedule, warmup_steps=args.warmup_steps,
        resource_mode=args.resource_mode, resource_ratio=args.resource_ratio,
        resource_band=args.resource_band, gate_warmup_steps=args.gate_warmup_steps,
        importance_from=args.importance_from, freeze_arch_at=args.freeze_arch_at,
        max_grad_norm=args.max_grad_norm or None, variant=args.variant,
        method=args.method, stp_trials=args.stp_trials, stp_width_step=args.stp_width_step,
        stp_commits_per_round=args.stp_commits_per_round, stp_scoring=args.stp_scoring,
        stp_probe_size=args.stp_probe_size, stp_expand_prob=args.stp_expand_prob,
        stp_depth=args.stp_depth, stp_kd_weight=args.stp_kd_weight, stp_rank=args.stp_rank,
        stp_label_weight=args.stp_label_weight,
        stp_full_weight_after=args.stp_full_weight_after,
        ckpt_every=args.ckpt_every, tensorboard=args.tensorboard, plots=not args.no_plots,
        log_every=args.log_every,
        amp=args.amp, device=args.device, out=args.out, resume=args.resume, seed=args.seed,
        workers=args.workers, eval_batches=args.eval_batches,
        dense_baseline=not args.no_dense_baseline, latency=not args.no_latency,
        progress=not args.no_progress,
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from .numerics import NonFiniteLossError
    from .trainer import run_prune

    cfg = _config(args)
    if not (0.0 < cfg.target_flops <= 1.0):
        print(f"error: --target-flops must be in (0, 1], got {cfg.target_flops}", file=sys.stderr)
        return 2
    if cfg.ckpt_every is not None and cfg.ckpt_every < 1:
        print(f"error: --ckpt-every must be >= 1, got {cfg.ckpt_every}", file=sys.stderr)
        return 2
    try:
        run_prune(cfg)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as exc:  # missing files, bad settings, --out not writable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: a checkpoint was saved (Interrupted) or not
        argv = list(getattr(args, "argv", None) or ["prune"])
        again = "s2h " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
        ckpt = os.path.join(cfg.out, "checkpoint.pt")
        if getattr(exc, "checkpoint", None):
            print(f"interrupted: checkpoint saved at step {exc.step} to {exc.checkpoint}; "
                  f"resume with: {again}", file=sys.stderr)
        elif os.path.exists(ckpt):
            print(f"interrupted: the last checkpoint is {ckpt}; resume with: {again}",
                  file=sys.stderr)
        else:
            print("interrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        return 130
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Rebuild the pruner from a checkpoint and write the exported model, with the same
    BatchNorm recalibration (same batches) as the run's own ``exported/``."""
    import torch

    from .data import build_loaders, dataset_info
    from .export import save_exported
    from .trainer import (
        RECALIBRATION_BATCHES,
        PruneConfig,
        build_model,
        build_pruner,
        freeze_for_export,
        load_checkpoint,
        recalibrate_for_export,
        seed_everything,
    )

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    known = PruneConfig.__annotations__
    cfg = PruneConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    seed_everything(cfg.seed)
    info = dataset_info(cfg.dataset, cfg.data_dir)
    model = build_model(cfg.model, info.num_classes, info.in_chans)
    example = torch.randn(2, info.in_chans, info.image_size, info.image_size)
    pruner = build_pruner(cfg, model, example, warn=False)
    model.load_state_dict(ckpt["model"])
    pruner.load_state_dict(ckpt["pruner"])
    freeze_for_export(cfg, pruner)  # as the run's exported/: projected onto the budget
    done = int(ckpt["epoch"]) >= cfg.epochs and not int(ckpt.get("batch", 0))
    where = ("the end of training" if done else
             f"epoch {int(ckpt['epoch']) + 1} of {cfg.epochs}, batch {int(ckpt.get('batch', 0))} "
             "(unfinished run: not what its exported/ will be)")
    if args.no_recalibrate:
        how = ("BatchNorm statistics as trained, NOT recalibrated: differs from the run's "
               "exported/, which re-estimates them")
    else:
        world = int(ckpt.get("world_size", 1))
        try:
            train_loader, _, _ = build_loaders(
                cfg.dataset, cfg.data_dir, cfg.batch_size // world, workers=0, seed=cfg.seed,
                test_batch_size=cfg.batch_size, rank=0, world_size=world, holdout=cfg.holdout)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: cannot recalibrate BatchNorm as the run did: {exc}\n"
                  "(--no-recalibrate exports the statistics as trained, which differ from the "
                  "run's exported/)", file=sys.stderr)
            return 2
        n = recalibrate_for_export(cfg, pruner, train_loader)
        how = (f"BatchNorm recalibrated on the same {n} training batches as the run's exported/"
               + ("" if n == RECALIBRATION_BATCHES else
                  f" (fewer than {RECALIBRATION_BATCHES}: the data set is that small)"))
    out = save_exported(pruner.export(), args.out)
    print(f"exported {cfg.model} from {where} at {pruner.hard_flops_ratio():.3f} of the dense "
          f"FLOPs to {out}; {how}")
    return 0


def _bench_dir() -> str | None:
    """The folder of the bench/ scripts: $S2H_BENCH_DIR, else the source checkout this package
    runs from, else ./bench (the scripts are not part of the installed package)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.environ.get("S2H_BENCH_DIR"), os.path.join(package_root, "bench"),
                   os.path.join(os.getcwd(), "bench")):
        if folder and os.path.isdir(folder):
            return folder
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    folder = _bench_dir()
    if folder is None:
        print("error: no bench/ folder found: the benchmark scripts are in the source "
              "repository (its bench/ folder), not in the installed package. Run `s2h bench "
              f"{args.name}` from a checkout of the repository, or set S2H_BENCH_DIR to its "
              "bench/ folder.", file=sys.stderr)
        return 2
    script = os.path.join(folder, args.name.replace("-", "_") + ".py")
    if not os.path.isfile(script):
        avail = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py"))
        print(f"error: no benchmark {args.name!r} in {folder} (available: "
              f"{', '.join(avail) or 'none'})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *args.rest])


def cmd_info(args: argparse.Namespace) -> int:
    from .info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_info(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="s2h", description="Soft-to-Hard structured pruning",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model to a FLOPs budget with the S2H loop",
                       formatter_class=_HelpFormatter)
    if argv[:1] == ["prune"]:  # its defaults import torch: not for `s2h --help` or `s2h info`
        _add_prune_args(p)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("export", help="export the pruned model of a checkpoint",
                       formatter_class=_HelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-recalibrate", action="store_true",
                   help="keep the BatchNorm statistics as trained instead of re-estimating them "
                        "on the run's training batches (no data needed; not the run's "
                        "exported/)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="run a benchmark script of the repository's bench/ "
                                      "(a source checkout, or $S2H_BENCH_DIR)")
    p.add_argument("name", help="e.g. step_flops, gather, dual_forward")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("info", help="versions, build, back-ends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


def entry() -> None:
    """The ``s2h`` command and ``python -m s2h``: :func:`main`, then exit with its status.

    Under torchrun (``WORLD_SIZE`` > 1) the process leaves without the interpreter's teardown:
    the run is finished, its files written and its process group destroyed, but gloo's worker
    threads can still abort the teardown ("terminate called without an active exception",
    SIGABRT, about one run in 25 on CPU), turning a finished run into a failed exit status.
    """
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) else 1)
    raise SystemExit(rc)


if __name__ == "__main__":
    entry()

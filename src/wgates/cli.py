"""The `wgates` command line: one subcommand per pipeline step.

Each subcommand is a pair: `add_<name>(subparsers)` declares its arguments and sets
`func` to the function that runs it. Errors meant for the user are `WgatesError`s:
printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys

from wgates.defaults import PRUNE, deployment_threads, depth_for
from wgates.errors import WgatesError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgates",
        description="Prune a trained CNN to a latency budget measured on your hardware.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# Filled below, in pipeline order; each entry adds one subcommand.
SUBCOMMANDS: list = []


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _block(text: str) -> int | str:
    """A channel block: a whole number >= 1, or "auto" (measured: `probe_block`)."""
    return text if text == "auto" else _positive_int(text)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise WgatesError(f"--input-shape {text!r} is not a shape: give e.g. 1,3,32,32")
    return shape


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the prunable channel groups of a model, with its parameters and MACs",
        description="Trace the model and print every group of coupled channels wgates would "
        "gate: its size, how many layers produce and consume it, and grouped-conv ties.",
    )
    p.add_argument("--model", default="small_cnn",
                   help="model spec, e.g. resnet20, torchvision:resnet18, timm:resnet18 or "
                   "net.py:Net (default small_cnn)")
    p.add_argument("--input-shape", type=_shape, help="N,C,H,W (default: 1 x the model's)")
    p.add_argument("--min-channels", type=int, default=1,
                   help="never prune a group below this many channels (default 1)")
    p.add_argument("--ignore", nargs="+", default=[], metavar="NAME",
                   help="module names to leave unpruned (with everything coupled to them)")
    p.add_argument("--depth", action="store_true",
                   help="also say which residual blocks `prune --depth` may drop")

    def run(args) -> int:
        import warnings

        import torch
        import torch_pruning as tp

        from wgates.gated import gate
        from wgates.models import create_model, default_input_shape

        shape = args.input_shape or (1, *default_input_shape(args.model))
        model = create_model(args.model).eval()
        example = torch.randn(shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gated = gate(model, example, ignore=args.ignore, min_channels=args.min_channels,
                         depth=args.depth)
        groups = gated.channel_groups
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example)
        width = max(len("group"), *(len(g.name) for g in groups))
        print(f"{args.model}, input {'x'.join(map(str, shape))}")
        print(f"{'group':<{width}}  {'size':>5}  {'producers':>9}  {'consumers':>9}  note")
        for i, g in enumerate(groups):
            note = ""
            if g.ties is not None:
                note = (f"grouped conv ties: {g.n_units} units of "
                        f"{g.size // g.n_units} channels")
            block = gated.droppable.get(i)
            if block is not None:
                note = f"at 0 channels drops block {block}"
            print(f"{g.name:<{width}}  {g.size:>5}  {len(g.producers):>9}  "
                  f"{len(g.consumers):>9}  {note}".rstrip())
        print(f"{len(groups)} groups, {sum(g.size for g in groups)} prunable channels, "
              f"{params / 1e6:.3f}M parameters, {macs / 1e6:.2f}M MACs")
        for w in caught:
            if str(w.message).startswith("wgates:"):
                print(str(w.message), file=sys.stderr)
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS.append(add_inspect)


def add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure sampled pruned variants on this hardware into a latency file",
        description="Measure latency (relative to the dense model, interleaved) of sampled "
        "width configurations. Resumable: re-run to continue; a larger --samples adds more.",
    )
    p.add_argument("--model", required=True, help="model spec, e.g. resnet20 or net.py:Net")
    p.add_argument("--input-shape", type=_shape, help="N,C,H,W (default: 1 x the model's)")
    p.add_argument("--backend", default="torch-cpu", help="torch-cpu, onnxruntime-cpu, torch-cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--samples", type=int, default=500,
                   help="samples wanted in the file, measured on a calm machine (ones the "
                   "host's load spoiled are replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int,
                   help="interleaved candidate/reference timings per measurement (default 60)")
    p.add_argument("--max-wait", type=float,
                   help="seconds to wait for a busy machine to calm down before keeping a "
                   "contended measurement (default 300)")
    p.add_argument("--repeat-every", type=int, default=10,
                   help="re-measure a probe configuration every N samples (noise floor)")
    p.add_argument("--channel-multiple", type=_positive_int, default=None,
                   help="sample widths in multiples of this, as pruning will deliver them "
                   "(default: the backend's grid: on onnxruntime-cpu multiples of 8 up to its "
                   "kernels' channel block, 16 with AVX-512, and whole blocks above; else 1)")
    p.add_argument("--channel-block", type=_block, default=None,
                   help="sample widths above this many channels in whole multiples of it, as "
                   "pruning will deliver them (default: the backend's grid; auto: the block "
                   "this model's latency steps in here, measured first)")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=PRUNE.depth,
                   help="let a share of the samples drop residual blocks, as `prune --depth` "
                   "may (default: as prune decides it, on at batch 1 or with a channel block)")
    p.add_argument("--out", default="latency.sqlite", help="SQLite file (created or extended)")

    def run(args) -> int:
        from wgates.latency import LatencyStore, Protocol, get_backend, profile
        from wgates.models import create_model, default_input_shape

        shape = args.input_shape or (1, *default_input_shape(args.model))
        overrides = {"rounds": args.rounds, "max_wait_s": args.max_wait}
        model = create_model(args.model)
        block = args.channel_block
        if block == "auto":
            import torch

            from wgates.latency.grid import probe_block

            found = probe_block(model, torch.randn(shape), args.backend, args.threads,
                                multiple=args.channel_multiple)
            block = found.channel_block
            print(found.summary())
        grid = get_backend(args.backend, args.threads).width_grid(args.channel_multiple, block)
        done = profile(
            model, shape, args.out, samples=args.samples,
            backend=args.backend, threads=args.threads, seed=args.seed,
            model_spec=args.model, repeat_every=args.repeat_every,
            channel_multiple=args.channel_multiple, channel_block=block,
            protocol=Protocol(**{k: v for k, v in overrides.items() if v is not None}),
            depth=depth_for(args.depth, shape[0], *grid),
        )
        store = LatencyStore(args.out)
        spoiled = done.n_samples - store.counts(done.id)[1]
        store.close()
        print(f"{args.out}: run {done.key} has {done.n_samples} samples"
              + (f" ({spoiled} measured on a contended machine, left out of the fit)"
                 if spoiled else ""))
        return 0

    p.set_defaults(func=run)


def add_fit_latency(sub) -> None:
    p = sub.add_parser(
        "fit-latency",
        help="fit LPNet on a latency file and compare it with FLOPs and lookup-table predictors",
    )
    p.add_argument("latency", help="SQLite file written by `wgates profile`")
    p.add_argument("--out", default="lpnet.pt", help="where to save the predictor")
    p.add_argument("--run", help="run key (prefix) when the file holds several fingerprints")
    p.add_argument("--plot", help="scatter plot PNG (default: --out with .png)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help="LPNet training steps")
    p.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    p.add_argument("--model", help="the profiled model's spec, for LPNet's MACs prior "
                   "(default: the one the profile recorded, when it names a known model)")
    p.add_argument("--no-prior", action="store_true",
                   help="fit the plain MLP, without the MACs prior (to compare)")
    p.add_argument("--prior-decay", type=float, nargs="+", default=None, metavar="DECAY",
                   help="weight decay(s) of the MLP towards the MACs prior; several: one fit "
                   "each, the held-out best kept (default: 10 and 0.1)")

    def run(args) -> int:
        from pathlib import Path

        from wgates.latency import LatencyStore
        from wgates.predictor import fit_and_compare, metrics_json, plot_comparison

        store = LatencyStore(args.latency, create=False)
        try:
            chosen = store.select_run(args.run)
            macs = None if args.no_prior else _macs_prior(chosen.fingerprint, args.model)
            result = fit_and_compare(
                store, chosen, holdout=args.holdout, seed=args.seed, steps=args.steps,
                macs=macs, **({} if args.prior_decay is None else
                              {"prior_decay": tuple(args.prior_decay)}),
            )
        finally:
            store.close()
        result.predictor.save(args.out)
        plot = args.plot or str(Path(args.out).with_suffix(".png"))
        plot_comparison(result, plot)
        m = result.metrics
        if args.json:
            print(metrics_json(m))
            return 0
        print(f"run {chosen.key}: {chosen.fingerprint['model']} on {chosen.fingerprint['backend']}"
              f", {m['n_train']} train / {m['n_test']} held-out samples")
        print(f"{'predictor':<24}{'MAPE':>8}{'max err':>9}{'Spearman':>10}")
        labels = {"lpnet": "LPNet", "flops": "FLOPs (a + b*x)", "lut": "lookup table (a + b*x)"}
        for name, s in m["predictors"].items():
            print(f"{labels[name]:<24}{s['mape']:>8.2%}{s['max_error']:>9.2%}{s['spearman']:>10.4f}")
        print(f"noise floor: CV {m['noise_cv']:.2%} over {m['n_repeats']} repeats, "
              f"median per-sample spread {m['median_spread']:.2%}; "
              f"{m['n_contended']} samples left out (measured on a contended machine)")
        print(f"saved {args.out}, plot {plot}")
        return 0

    p.set_defaults(func=run)


def _macs_prior(fingerprint: dict, spec: str | None):
    """LPNet's MACs prior for the profiled model: `spec`, else the model the profile
    recorded (`wgates profile --model` records its spec; `wgates prune` its class name,
    which names no model: then the plain MLP is fitted, and the reason printed)."""
    import torch

    from wgates.gated import gate
    from wgates.macs import MacsModel
    from wgates.models import check_spec, create_model

    recorded = fingerprint.get("model", "")
    if spec is None:
        try:
            check_spec(recorded)
        except WgatesError:
            print(f"note: the profile names its model {recorded!r}, not a model spec: LPNet "
                  "is fitted without its MACs prior (pass --model SPEC to use it)",
                  file=sys.stderr)
            return None
    spec = spec or recorded
    shape = fingerprint["input_shape"]
    gated = gate(create_model(spec), (torch.randn(1, *shape[1:]),))
    names = [g.name for g in gated.channel_groups]
    profiled = [name for name, *_ in fingerprint["groups"]]
    if names != profiled:
        raise WgatesError(f"--model {spec} has other channel groups than the profiled model "
                          f"({len(names)} against {len(profiled)}): give the spec it was "
                          "profiled with")
    return MacsModel.of(gated)


SUBCOMMANDS.extend([add_profile, add_fit_latency])


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a dense or pruned model to ONNX, checked against ONNX Runtime",
        description="Export --model (with --weights) or a pruned model (--pruned DIR written "
        "by the prune step, rebuilt on a fresh --model) to ONNX with a dynamic batch "
        "dimension; ONNX Runtime must match PyTorch within 1e-4.",
    )
    p.add_argument("--model", required=True, help="model spec, e.g. resnet20 or net.py:Net")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", help="weights of the dense model (.safetensors, .pt)")
    source.add_argument("--pruned", metavar="DIR", help="directory written by save_pruned")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--input-shape", type=_shape,
                   help="N,C,H,W (default: 1 x the pruned model's or the model's input)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--out", default="model.onnx", help="ONNX file to write (default model.onnx)")

    def run(args) -> int:
        import torch

        from wgates.export import export_onnx, onnx_max_difference
        from wgates.extract import PLAN_ATTR, load_pruned
        from wgates.models import create_model, default_input_shape

        model = create_model(args.model, num_classes=args.num_classes, weights=args.weights)
        shape = args.input_shape
        if args.pruned:
            model = load_pruned(model, args.pruned)
            shape = shape or (1, *getattr(model, PLAN_ATTR).input_shapes[0][1:])
        shape = shape or (1, *default_input_shape(args.model))
        example = (torch.randn(shape),)
        path = export_onnx(model.eval(), example, args.out, opset=args.opset)
        error = onnx_max_difference(model, example, path)
        print(f"wrote {path} (input {'x'.join(map(str, shape))}, batch dynamic); "
              f"max |ONNX Runtime - PyTorch| = {error:.2e} (relative to outputs above 1)")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS.append(add_export)


def add_measure(sub) -> None:
    p = sub.add_parser(
        "measure",
        help="re-measure a pruned model's latency against its dense model, independently",
        description="Time the pruned model (--pruned DIR, rebuilt on a fresh --model) "
        "interleaved with the dense one on a backend, and print the settled ratio: the median "
        "of --repeats measurements, more while they disagree. To check a run's delivered "
        "figure on a quiet machine, or to see the model at other threads and batches than it "
        "was pruned for.",
    )
    p.add_argument("--model", required=True, help="model spec, e.g. resnet20 or net.py:Net")
    p.add_argument("--pruned", required=True, metavar="DIR", help="directory of save_pruned")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--backend", default="torch-cpu",
                   help="torch-cpu | onnxruntime-cpu | torch-cuda")
    p.add_argument("--threads", type=int, nargs="+",
                   default=deployment_threads(PRUNE.threads, PRUNE.check_threads),
                   help="thread counts, each ratio against the dense model at the same count "
                   "(default: %(default)s, as `wgates prune` checks its model)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default: the one the model was pruned for)")
    p.add_argument("--repeats", type=int, default=5)

    def run(args) -> int:
        import torch

        from wgates.extract import PLAN_ATTR, load_pruned
        from wgates.latency import get_backend
        from wgates.models import create_model
        from wgates.parts import measure_threads

        for threads in args.threads:
            get_backend(args.backend, threads)  # refused before any measurement
        dense = create_model(args.model, num_classes=args.num_classes).eval()
        small = load_pruned(create_model(args.model, num_classes=args.num_classes),
                            args.pruned).eval()
        shape = getattr(small, PLAN_ATTR).input_shapes[0]
        print("threads  batch  latency ratio  spread  dense ms")
        for batch in args.batch or [shape[0]]:
            for row in measure_threads(dense, small, torch.randn(batch, *shape[1:]),
                                       args.threads, args.backend, repeats=args.repeats):
                print(f"{row['threads']:>7}  {batch:>5}  {row['ratio']:>13.3f}  "
                      f"{row['spread']:>6.3f}  {row['dense_ms']:>8.3f}")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS.append(add_measure)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Under torchrun (`torchrun --nproc_per_node=N -m wgates ...`) every
    rank runs this; `train` and `prune` join the process group first (`wgates.distributed`)."""
    args = build_parser().parse_args(argv)
    from wgates import distributed

    try:
        if getattr(args, "distributed", False) and distributed.launched():
            distributed.setup(_device(getattr(args, "device", "cpu")))
        code = int(args.func(args) or 0)
        # every rank leaves together: a gloo process group destroyed while the other rank
        # still sends (rank 0 writing the files) aborted the process at exit, 1 run in 4
        distributed.barrier("the end of the command")
        return code
    except WgatesError as err:
        who = f"rank {distributed.rank()}: " if distributed.active() else ""
        print(f"wgates: error: {who}{_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wgates: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"wgates: error: the disk is full ({err.filename or 'writing'}): free some space, "
              "then run the same command with --resume (files are written whole or not at "
              "all, so what is on disk is intact)", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()


def _one_line(err: WgatesError) -> str:
    """The error's message; one raised in a DataLoader worker process comes back re-raised
    with the worker's traceback in its text, of which only the last line is the message."""
    text = str(err)
    if "Traceback (most recent call last)" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("WgatesError: ", 1)[-1]


def _add_model_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_cnn", help="registered name, torchvision:<name>, "
                   "timm:<name> or path/to/file.py:Class (default: small_cnn)")
    p.add_argument("--weights", help="trained weights (.safetensors or .pt state dict)")
    p.add_argument("--data", default="digits",
                   help="digits | cifar10:<root> | imagefolder:<root> (default: digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--subset", type=int, help="use only this many samples per split")


def _model_and_loaders(args, batch: int = 1, device=None):
    """The model and the data, each refused in one line when wrong: the model spec before
    any data is loaded, then one forward pass on the data's shape (at batch `batch`). On a
    CUDA `device` the CIFAR images are held and augmented there (`wgates.data.loader_on`)."""
    import torch

    from wgates.data import make_loaders
    from wgates.models import check_forward, check_spec, create_model

    check_spec(args.model)
    train_loader, val_loader, info = make_loaders(
        args.data, batch_size=args.batch_size, workers=args.workers, subset=args.subset,
        device=device)
    model = create_model(args.model, num_classes=info.num_classes, weights=args.weights)
    check_forward(model, torch.zeros(batch, *info.input_shape), args.model)
    return model, train_loader, val_loader, info


def _device(name: str):
    """The torch device `name`, refused up front when it is not there (not after minutes);
    under torchrun, `cuda` is this rank's GPU (cuda:LOCAL_RANK)."""
    import torch

    from wgates import distributed

    try:
        device = torch.device(name)
    except RuntimeError:
        raise WgatesError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WgatesError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    return distributed.device_for("cuda") if name == "cuda" else device


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="where training runs: cpu | cuda (bf16 mixed precision, channels_last, "
                   "CIFAR images augmented on the GPU) | cuda:N; latency is measured on "
                   "--backend's device whatever this is")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a dense model (for users without a trained one)")
    _add_model_data_args(p)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint <out>.ckpt written after every epoch")
    p.set_defaults(func=_run_train, distributed=True)


def _run_train(args) -> int:
    """Dense training, checkpointed after every epoch to `<out>.ckpt` (model, optimizer,
    epoch, history); `--resume` continues it if the settings match. At the end the weights
    go to `<out>` (safetensors) and the history and settings to `<out>.json`."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from wgates import distributed
    from wgates.files import atomic_path, load_checkpoint, save_checkpoint, write_json
    from wgates.train import evaluate, make_optimizer, place, train

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise WgatesError(f"--out {out} must end in .safetensors (plain tensors, no pickle)")
    ckpt = out.with_name(out.name + ".ckpt")
    settings = {k: getattr(args, k) for k in
                ("model", "weights", "data", "batch_size", "subset", "epochs", "lr", "seed")}

    def read_checkpoint() -> dict | None:
        if ckpt.exists() and not args.resume:
            raise WgatesError(f"{ckpt} exists (an unfinished training): pass --resume to "
                              "continue it, or delete it to start over")
        blob = load_checkpoint(ckpt) if args.resume and ckpt.exists() else None
        differ = {k: (blob["settings"].get(k), v) for k, v in settings.items()
                  if blob is not None and blob["settings"].get(k) != v}
        if differ:
            raise WgatesError("--resume with other settings than the checkpoint's: " + ", ".join(
                f"{k} was {a!r}, now {b!r}" for k, (a, b) in differ.items())
                + f"; use the same ones, or delete {ckpt} to start over")
        return blob

    blob = distributed.once("read the checkpoint", read_checkpoint)  # every rank: rank 0's
    device = _device(args.device)
    torch.manual_seed(args.seed)
    model, train_loader, val_loader, _ = _model_and_loaders(args, device=device)
    place(model, device)
    optimizer = make_optimizer(model.parameters(), args.lr)
    history: list[dict] = []
    start = 0
    if blob is not None:
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        history, start = list(blob["history"]), int(blob["epoch"])
        if distributed.is_main():
            print(f"resuming {ckpt} after epoch {start}/{args.epochs}")

    def checkpoint(epoch: int, record: dict) -> None:
        history.append(record)
        if distributed.is_main():
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "epoch": epoch + 1, "history": history, "settings": settings},
                            ckpt)

    train(model, train_loader, args.epochs, lr=args.lr, val_loader=val_loader,
          optimizers=[optimizer], start_epoch=start, on_epoch_end=checkpoint, seed=args.seed)
    accuracy = evaluate(model, val_loader)

    def write() -> None:
        with atomic_path(out) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()},
                      str(tmp))
        write_json(out.with_suffix(".json"), {
            "settings": settings, "val_accuracy": accuracy, "history": history,
            "ranks": distributed.world_size()})
        ckpt.unlink(missing_ok=True)
        print(f"wrote {out}: val accuracy {accuracy:.4f}")

    distributed.once("write the weights", write)
    return 0


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune to a latency target, end to end (no arguments: the digits demo)"
    )
    _add_model_data_args(p)
    p.add_argument("--target-latency", default="0.5",
                   help="fraction of the dense measured latency (0.5) or a time (8ms)")
    p.add_argument("--backend", default="torch-cpu",
                   help="torch-cpu | onnxruntime-cpu | torch-cuda")
    p.add_argument("--threads", type=int, default=PRUNE.threads,
                   help="threads of the deployment, which latency is measured with")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the deployment")
    p.add_argument("--channel-multiple", type=_positive_int, default=None,
                   help="deliver every width as a multiple of this (default: the backend's "
                   "grid: on onnxruntime-cpu, whose convolutions run channels in blocks, "
                   "multiples of 8 up to one block, 16 with AVX-512, and whole blocks above; "
                   "else 1)")
    p.add_argument("--channel-block", type=_block, default=None,
                   help="deliver widths above this many channels in whole multiples of it "
                   "(default: the backend's grid); e.g. 16 for torch-cpu at batch 32 on an "
                   "AVX-512 host, whose convs cost the same at 17 to 32 channels; auto: the "
                   "block this model's latency steps in here, measured before the search")
    p.add_argument("--blocks", type=_positive_int, nargs="*", default=list(PRUNE.blocks),
                   help="after the closed loop, widen each group to the end of its block of "
                   "this many channels (each in turn, e.g. 16 8) where the measured latency "
                   "stays in the band: CPU kernels compute channels in blocks, and at batch 32 "
                   "those channels are nearly free (default: %(default)s; none: give the "
                   "option alone)")
    p.add_argument("--isolated", action=argparse.BooleanOptionalAction, default=PRUNE.isolated,
                   help="measure latency in a process of its own that never trains (default: "
                   "on; after training pruned shapes a process reads them ~2%% slow)")
    p.add_argument("--check-threads", type=int, nargs="*", default=list(PRUNE.check_threads),
                   help="thread counts the delivered model is also measured at, each against "
                   "the dense model at the same count (default: %(default)s; none: give the "
                   "option alone)")
    p.add_argument("--dense-epochs", type=int, default=3,
                   help="dense training first, when no --weights are given")
    p.add_argument("--epochs", type=int, default=PRUNE.epochs, help="gate search epochs")
    p.add_argument("--finetune-epochs", type=int, default=PRUNE.finetune_epochs)
    p.add_argument("--samples", type=int, default=PRUNE.samples,
                   help="measured variants LPNet is fitted on")
    p.add_argument("--allocation", default=PRUNE.allocation, choices=["knapsack", "gradient"],
                   help="how the search sets each group's width: a latency-aware knapsack "
                   "over the whole network (default) or the paper's latency gradient")
    p.add_argument("--ramp", type=float, default=PRUNE.ramp,
                   help="fraction of the search over which the aim falls to the target")
    p.add_argument("--floor", type=float, default=PRUNE.floor,
                   help="no group below this fraction of its width")
    p.add_argument("--importance", default=PRUNE.importance, choices=["taylor", "loss"],
                   help="what a unit is worth to the knapsack: the Taylor estimate from the "
                   "gate gradients, or the measured loss rise of each group's width")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=PRUNE.depth,
                   help="let the search also drop residual blocks (a block's inner width going "
                   "to none); where latency is overhead-bound, as at batch 1, a block costs "
                   "more than its channels, and where widths move in channel blocks a "
                   "narrower width buys latency only a block at a time (default: on at batch "
                   "1 or with a channel block, such as --channel-block 16; off otherwise)")
    p.add_argument("--predictor", help="an LPNet file from `wgates fit-latency` (skips profiling)")
    p.add_argument("--readings", help="a latency file that keeps every measurement of a pruned "
                   "model, pooled with the earlier ones of the same architecture (default: the "
                   "run directory's latency.sqlite); share one between runs on this machine so "
                   "that a repeated run decides on all the readings, not on its own noise")
    p.add_argument("--force-predictor", action="store_true",
                   help="use --predictor even though it was measured on another machine, "
                   "backend, thread count or batch (refused by default)")
    p.add_argument("--proxy", default="latency", choices=["latency", "flops", "params"])
    p.add_argument("--method", "--gates", default=PRUNE.method,
                   help="the pruning method (default %(default)s; `wgates methods` lists them; "
                   "--gates is its earlier name)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=PRUNE.distill,
                   help="search and fine-tune with knowledge distillation from the dense model "
                   "(default: on; measured +1.7 and +4.0 points on ResNet-20, "
                   "benchmarks/distill.py)")
    _add_device_arg(p)
    p.add_argument("--run-dir", default="runs/prune")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --run-dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_prune, distributed=True)


def _run_prune(args) -> int:
    import torch

    from wgates import distributed
    from wgates.baselines import method_info
    from wgates.pipeline import preflight, prune
    from wgates.report import THREADS_WHY
    from wgates.search import parse_target
    from wgates.train import place, train

    method_info(args.method)  # all three refused before any training or measuring
    parse_target(args.target_latency)
    device = _device(args.device)
    torch.manual_seed(args.seed)
    model, train_loader, val_loader, info = _model_and_loaders(args, args.latency_batch, device)
    if args.weights is None and args.dense_epochs > 0:
        # what `prune` would refuse after the dense training, refused before it: a model with
        # nothing to prune, a predictor from elsewhere, a target out of reach (measured on
        # the untrained model: latency does not depend on the weights' values)
        with torch.random.fork_rng(devices=[]):
            preflight(model, torch.randn(args.latency_batch, *info.input_shape),
                      target_latency=args.target_latency, backend=args.backend,
                      threads=args.threads, method=args.method, predictor=args.predictor,
                      force_predictor=args.force_predictor, allocation=args.allocation,
                      floor=args.floor, measure=True, channel_multiple=args.channel_multiple,
                      channel_block=args.channel_block, blocks=args.blocks,
                      readings=args.readings, depth=args.depth)
        if distributed.is_main():
            print(f"no --weights: training {args.model} on {info.name} for "
                  f"{args.dense_epochs} epochs first")
        train(place(model, device), train_loader, args.dense_epochs, lr=0.05,
              val_loader=val_loader)
    example = torch.randn(args.latency_batch, *info.input_shape)
    result = prune(
        model, example, train_loader, val_loader, target_latency=args.target_latency,
        backend=args.backend, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
        run_dir=args.run_dir, proxy=args.proxy, method=args.method, samples=args.samples,
        predictor=args.predictor, threads=args.threads, distill=args.distill,
        allocation=args.allocation, ramp=args.ramp, floor=args.floor,
        importance=args.importance, depth=args.depth,
        resume=args.resume, seed=args.seed, force_predictor=args.force_predictor,
        check_threads=args.check_threads, channel_multiple=args.channel_multiple,
        channel_block=args.channel_block, blocks=args.blocks, isolated=args.isolated,
        readings=args.readings, device=device,
    )
    if distributed.is_main():
        print(f"\n{result.method}: pruned for and measured on {result.deployment()}; target "
              f"{result.target_ratio:.3f} of dense:\n{result.table()}")
        if len(result.at_threads) > 1:
            print(f"\nat other thread counts (batch {result.batch}; each against the dense "
                  f"model at that count):\n{result.threads_table()}\n{THREADS_WHY}")
        print(f"\nrun directory: {result.run_dir} (report.md, model/, model.onnx)")
    return 0


def add_methods(sub) -> None:
    p = sub.add_parser(
        "methods", help="list the pruning methods `wgates prune --method` takes",
        description="One line per method: its name, whether it trains gates or bisects a "
        "knob, and the paper it comes from (docs/methods.md: how each is read).")

    def run(args) -> int:
        from wgates.baselines import INFO

        width = max(map(len, INFO))
        for name, info in INFO.items():
            how = "gates" if info.gates else "knob"
            default = " (default)" if name == PRUNE.method else ""
            print(f"{name:<{width}}  {how:<5}  {info.paper}{default}")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS.extend([add_train, add_prune, add_methods])


def add_unify(sub) -> None:
    p = sub.add_parser(
        "unify", help="micro-structured weight unification (ADMM) on top of a pruned model",
        description="Unify --ratio of every conv's blocks of --block input channels (one "
        "magnitude per block, signs kept; --zero: all zero) with ADMM, then fine-tune with "
        "them held (Lin et al., 2021). Reports the stored size, the accuracy and the latency "
        "measured against the input model on each --backend. No connection is removed, so "
        "dense kernels are not expected to run faster: the figures say whether any did.")
    _add_model_data_args(p)
    p.add_argument("--pruned", metavar="DIR", help="a pruned model (save_pruned's directory), "
                   "rebuilt on a fresh --model; else --weights or an untrained --model")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the data set's)")
    p.add_argument("--block", type=int, default=4, help="coefficients per block (default 4)")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of each conv's blocks unified (default 0.5)")
    p.add_argument("--zero", action="store_true", help="unify to zero: micro-structured pruning")
    p.add_argument("--admm-epochs", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=PRUNE.distill,
                   help="train with distillation from the input model (default: on)")
    p.add_argument("--backend", nargs="+", default=["torch-cpu", "onnxruntime-cpu"],
                   help="backends the latency is measured on (default: torch-cpu "
                   "onnxruntime-cpu)")
    p.add_argument("--threads", type=int, default=PRUNE.threads)
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory to write the unified model to")
    p.set_defaults(func=_run_unify)


def _run_unify(args) -> int:
    """Unify, then report: accuracy before and after, stored bytes, measured latency."""
    import copy
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from wgates.data import make_loaders
    from wgates.extract import PLAN_ATTR, load_pruned, save_pruned
    from wgates.files import write_json
    from wgates.latency import get_backend
    from wgates.models import check_spec, create_model
    from wgates.parts import measure_threads
    from wgates.train import evaluate
    from wgates.unify import check_setting, is_unified, stored_bytes, unify

    for name in args.backend:
        get_backend(name, args.threads)  # refused before any training
    check_setting(args.block, args.ratio)
    check_spec(args.model)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise WgatesError(f"--out {out} is not empty: choose another directory or empty it")
    torch.manual_seed(args.seed)
    train_loader, val_loader, info = make_loaders(
        args.data, batch_size=args.batch_size, workers=args.workers, subset=args.subset)
    classes = args.num_classes or info.num_classes
    model = create_model(args.model, num_classes=classes, weights=args.weights)
    if args.pruned:
        model = load_pruned(model, args.pruned)
    original = copy.deepcopy(model).eval()
    before = evaluate(model, val_loader)
    result = unify(model, train_loader, block=args.block, ratio=args.ratio, zero=args.zero,
                   admm_epochs=args.admm_epochs, finetune_epochs=args.finetune_epochs,
                   lr=args.lr, teacher=original if args.distill else None, seed=args.seed)
    if not is_unified(model, result):
        raise WgatesError("the chosen blocks are not unified after the fine-tune (a bug): "
                          "please report it with the command")
    example = torch.randn(args.latency_batch, *info.input_shape)
    latency = {name: measure_threads(original, model.eval(), example, [args.threads], name)[0]
               for name in args.backend}
    report = {
        "settings": {k: getattr(args, k) for k in ("model", "pruned", "weights", "data",
                                                    "block", "ratio", "zero", "admm_epochs",
                                                    "finetune_epochs", "lr", "distill")},
        "accuracy_before": before, "accuracy": evaluate(model, val_loader),
        "stored_bytes": {"float32": stored_bytes(original), "unified": stored_bytes(model,
                                                                                   result)},
        "latency": latency, "history": result.history,
    }
    if hasattr(model, PLAN_ATTR):
        save_pruned(model, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
    write_json(out / "unify.json", report)
    size = report["stored_bytes"]
    kind = "zero" if args.zero else "one magnitude"
    print(f"unified {args.ratio:.0%} of the blocks of {args.block} ({kind}): accuracy "
          f"{before:.4f} -> {report['accuracy']:.4f}; stored (zlib) {size['float32']:,} -> "
          f"{size['unified']:,} bytes ({size['unified'] / size['float32']:.2f}x)")
    for name, row in latency.items():
        print(f"{name} @{args.threads} thread(s), batch {args.latency_batch}: latency "
              f"{row['ratio']:.3f} of the input model's (spread {row['spread']:.3f})")
    print(f"wrote {out} (model, unify.json)")
    return 0


SUBCOMMANDS.append(add_unify)

"""Issue #6 on ImageNet: the CIFAR-10 comparison (same harness, benchmarks/cifar10.py) for the
paper's torchvision models, on an ImageNet-layout folder and a GPU.

    python benchmarks/imagenet.py --data /data/imagenet                # configs/imagenet.json
    python benchmarks/imagenet.py --set seeds=[0,1,2] --set 'targets=[0.5]'

Any config key can be overridden with --set key=JSON (e.g. a tiny model and CPU for a smoke).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar10 import HERE, Settings, apply_overrides, run


def load_settings(path: Path, overrides: list[str], data: str | None) -> Settings:
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = apply_overrides(config, overrides)
    if data:
        config["data"] = f"imagefolder:{data}"
    return Settings(**config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "imagenet.json")
    parser.add_argument("--data", help="ImageNet root holding train/ and val/ class folders")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--name", default="imagenet", help="results file name")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    args = parser.parse_args(argv)
    settings = load_settings(args.config, args.set, args.data)
    if not settings.data:
        parser.error("no data: pass --data <ImageNet root with train/ and val/>")
    md = run(settings, {}, args.out, args.name, args.cache, "ImageNet")
    print(md.read_text())


if __name__ == "__main__":
    main()

"""Command line: python -m ngp_train synth|train|render|eval (see `--help` of each)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, DatasetError, NgpError

log = logging.getLogger("ngp_train")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message} (see `python -m ngp_train {self.prog.split()[-1]} --help`)\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    from .contract import BACKENDS, DEVICES, LOSSES, SCENES

    p = _Parser(prog="python -m ngp_train", description="Instant-NGP training on NeRF-synthetic scenes")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    s = sub.add_parser("synth", help="write a procedural NeRF-synthetic scene")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--scene", default="default", choices=SCENES)
    s.add_argument("--size", type=int, default=64, help="image width/height in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=int, default=None)
    s.add_argument("--n-test", type=int, default=None)
    t = sub.add_parser("train", help="train on a scene (resumes from OUT/snapshot.pt)")
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--steps", type=int, default=30000)
    t.add_argument("--max-seconds", type=float, default=None, help="stop training after this much wall time")
    t.add_argument("--backend", default="auto", choices=BACKENDS)
    t.add_argument("--device", default="auto", choices=DEVICES)
    t.add_argument("--downscale", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--loss", default="l2", choices=LOSSES)
    t.add_argument("--no-eval", action="store_true", help="skip rendering the test split and summary.json")
    r = sub.add_parser("render", help="render a split from a snapshot")
    r.add_argument("--snapshot", required=True, type=Path)
    r.add_argument("--data", required=True, type=Path)
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--device", default="auto", choices=DEVICES)
    e = sub.add_parser("eval", help="PSNR/SSIM of predictions against ground truth")
    e.add_argument("--pred", required=True, type=Path)
    e.add_argument("--gt", required=True, type=Path)
    e.add_argument("--out", type=Path, default=None, help="metrics.csv path (default: next to PRED)")
    e.add_argument("--background", default="white", choices=["white", "black"])
    return p


def _cmd_synth(a: argparse.Namespace) -> int:
    from .synth import generate_scene

    path = generate_scene(a.out, a.scene, a.size, a.seed, n_train=a.n_train, n_test=a.n_test)
    print(path)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(steps=a.steps, max_seconds=a.max_seconds, backend=a.backend, device=a.device,
                      downscale=a.downscale, seed=a.seed, eval=not a.no_eval, loss=a.loss)

    def progress(step: int, total: int, loss: float, psnr: float | None, elapsed: float) -> None:
        if step % 100 == 0 or step == total:
            log.info("step %d/%d loss %.5f psnr %s %.1fs", step, total, loss,
                     "-" if psnr is None else f"{psnr:.2f}", elapsed)

    res = train(a.data, a.out, cfg, progress=progress)
    summary = {"steps": res.steps, "train_seconds": round(res.train_seconds, 3), "backend": res.backend,
               "device": res.device, "psnr_mean": res.psnr_mean, "ssim_mean": res.ssim_mean,
               "snapshot": str(res.snapshot_path)}
    print(json.dumps(summary))
    return 0


def _cmd_render(a: argparse.Namespace) -> int:
    from .render import render_split

    paths = render_split(a.snapshot, a.data, a.split, a.out, a.device)
    print(f"{len(paths)} frames written to {a.out}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .metrics import evaluate_dirs, means, write_metrics_csv

    rows = evaluate_dirs(a.pred, a.gt, background=a.background)
    out = a.out if a.out is not None else a.pred.resolve().parent / "metrics.csv"
    write_metrics_csv(rows, out)
    pm, sm = means(rows)
    print(json.dumps({"psnr_mean": pm, "ssim_mean": sm, "n_images": len(rows), "metrics_csv": str(out)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        return {"synth": _cmd_synth, "train": _cmd_train, "render": _cmd_render, "eval": _cmd_eval}[args.cmd](args)
    except (DatasetError, ConfigError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except NgpError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m ich.site_shift`: the site-shift test bed in one command: train at hospital A, test at A, B and C.

    python -m ich.site_shift --out outputs/site_shift                  # 11 minutes on 2 idle CPU cores
    python -m ich.site_shift --out DIR --away B                        # test at the sites listed only
    python -m ich.site_shift --out DIR --epochs 3 -- model=tiny         # train.py overrides after --

The phantom's site A is the default phantom; site B is another hospital (another scanner, older bleeds), site C
the same kind of patients on another scanner (ich.data.phantom.SITES). Two trainings on site A, without and with
site augmentation (data.augment.site), each tested on A's own test patients (train.py's test stage, from the
checkpoint, by evaluate.py) and on every patient of each --away site (external validation, operating point chosen
on A's validation patients). It prints and writes site_shift.md: AUROC, operating-point sensitivity and
specificity with 95% patient-bootstrap intervals at each site, the drops from A, and whether site augmentation
halves them.

Both trainings run every epoch (no early stopping: an augmented model learns more slowly, and its first epochs'
validation loss would stop it after a few), and each is tested from its checkpoint of lowest validation loss.
A small configuration so it finishes here (fewer epochs, smaller images than train.py's defaults): the figures are
the test bed's, not those of a full training; the table says which.
"""

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ich import CONFIG_DIR
from ich.cli import friendly_errors
from ich.core.results import write_json
from ich.evaluate import run as evaluate_run
from ich.evaluation.site_shift import DROPPED, shift_table, verdict, write_table
from ich.train import run as train_run

log = logging.getLogger(__name__)

TRAININGS = {"plain": "false", "site-augmented": "true"}  # name -> data.augment.site


def compose_config(name: str, overrides: list[str]):
    """conf/<name>.yaml with `overrides`, as the command line would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def phantom_overrides(args: argparse.Namespace, site: str, seed: int) -> list[str]:
    return [f"data.phantom.site={site}", f"data.phantom.seed={seed}", f"data.phantom.patients={args.patients}",
            f"data.phantom.slices={args.slices}", f"data.phantom.size={args.size}"]


def evaluate(args: argparse.Namespace, run_dir: Path, output_dir: Path, data: list[str]) -> dict[str, float]:
    """evaluate.py on a training run's best checkpoint: its own test patients (no `data`) or other data."""
    overrides = [f"ckpt_path={run_dir}", f"output_dir={output_dir}", f"bootstrap={args.bootstrap}", *data]
    return evaluate_run(compose_config("evaluate", overrides), overrides=overrides)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ich.site_shift", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/site_shift"), help="runs and site_shift.md go here")
    parser.add_argument("--home", default="A", help="the site trained on (data.phantom.site)")
    parser.add_argument("--away", nargs="+", default=["B", "C"], help="the other hospitals, tested on")
    parser.add_argument("--patients", type=int, default=80, help="patients per site (data.phantom.patients)")
    parser.add_argument("--slices", type=int, default=12, help="slices per series (data.phantom.slices)")
    parser.add_argument("--size", type=int, default=512, help="phantom pixels per side (data.phantom.size)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed of the home site; the other site's "
                        "patients are seed + 1, other people, at every other site")
    parser.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs, every one run (train.py: up "
                        "to 8 at 256 px, stopping early)")
    parser.add_argument("--image-size", type=int, default=128, help="data.image_size (train.py: 256)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples of the intervals")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both trainings, after --")
    return parser.parse_args(argv)


@friendly_errors
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.home in args.away:
        raise ValueError(f"--away lists the home site {args.home}: its own test patients are tested anyway; name "
                         "only other sites (--away B).")
    out = args.out.expanduser()
    used = [name for name in TRAININGS if (out / name).exists()]
    if used:
        raise ValueError(f"{out} already holds a test-bed run ({', '.join(used)}): pass another --out or delete it.")
    started = time.perf_counter()
    load = os.getloadavg()[0]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for training, augmented in TRAININGS.items():
        run_dir = out / training
        overrides = [*phantom_overrides(args, args.home, args.seed), f"data.image_size={args.image_size}",
                     f"trainer.max_epochs={args.epochs}", "callbacks.early_stopping=null",
                     f"data.augment.site={augmented}", f"output_dir={run_dir}",
                     f"bootstrap={args.bootstrap}", *args.overrides]
        log.info("Training %s on site %s: %s", training, args.home, " ".join(overrides))
        cfg = compose_config("train", overrides)
        model = f"{cfg.model.backbone} {'pretrained' if cfg.model.pretrained or cfg.model.weights else 'from scratch'}"
        train_run(cfg)
        results[training] = {args.home: evaluate(args, run_dir, out / f"{training}-on-{args.home}", [])}
        for away in args.away:
            results[training][away] = evaluate(args, run_dir, out / f"{training}-on-{away}",
                                               ["data=phantom", *phantom_overrides(args, away, args.seed + 1)])
    minutes = (time.perf_counter() - started) / 60
    table = shift_table(results, args.home)
    met = {name: {away: verdict(table, "plain", "site-augmented", away, name) for away in args.away}
           for name in DROPPED}
    preamble = (
        f"Site shift: trained at site {args.home}, tested on its own test patients and on all {args.patients} patients "
        f"of site {' and '.join(args.away)} (phantom seed {args.seed + 1}, other people). Small test-bed "
        f"configuration: {model}, {args.epochs} epochs at {args.image_size} px, every one run, from {args.size} px "
        f"phantoms of {args.patients} patients x {args.slices} slices (train.py's defaults: up to 8 epochs at 256 "
        f"px). Slice level, binary `any`; intervals: 95% patient bootstrap ({args.bootstrap} resamples); operating "
        f"point chosen on {args.home}'s validation patients.\n"
        f"Machine: {platform.node()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), load "
        f"{load:.1f} at the start; {datetime.now():%Y-%m-%d %H:%M}; {minutes:.1f} minutes in all.\n"
        f"Command: python -m ich.site_shift {' '.join(argv if argv is not None else sys.argv[1:])}\n"
        "Target, site augmentation halves the drop (and does no worse at the other site): "
        + "; ".join(f"{name.replace('op_', 'operating-point ')}: " + ", ".join(f"at {away} {said}"
                                                                           for away, said in by_site.items())
                    for name, by_site in met.items()) + "."
    )
    text = write_table(out / "site_shift.md", table, args.home, preamble)
    write_json(out / "site_shift.json", {f"{training}/{site}/{key}": value for training, by_site in results.items()
                                         for site, metrics in by_site.items() for key, value in metrics.items()
                                         if key.startswith("test/")})
    print(text)
    return {"table": table, "met": met, "minutes": minutes, "results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()

"""python -m ich.phantom: write the synthetic head-CT phantom (ich.data.phantom) into any folder.

    python -m ich.phantom --out DIR [--patients N --slices S --size PX --seed K --no-quirks --site A|B|C]
    python -m ich.phantom --out DIR --images [...]   # the same slices as brain-windowed PNGs (data=images)
"""

import argparse
import json

from ich.data.phantom import SITES, generate, generate_images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ich.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write stage_2_train.csv and stage_2_train/ into")
    parser.add_argument("--patients", type=int, default=40, help="one study and one series per patient")
    parser.add_argument("--slices", type=int, default=12, help="slices per series, 5 mm apart")
    parser.add_argument("--size", type=int, default=512, help="pixels per side")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    parser.add_argument("--site", choices=sorted(SITES), default="A",
                        help="the scanner and hospital that image the heads (ich.data.phantom.SITES); A as always")
    parser.add_argument("--no-quirks", dest="quirks", action="store_false", help="write only well-formed files")
    parser.add_argument("--images", action="store_true",
                        help="write brain-windowed PNGs and labels.csv (data=images) instead of DICOMs")
    args = parser.parse_args(argv)
    if args.images:
        summary = generate_images(args.out, args.patients, args.slices, args.size, args.seed, site=args.site)
        print(json.dumps(summary, indent=2))
        return summary
    summary = generate(args.out, args.patients, args.slices, args.size, args.seed, args.quirks, args.site)
    print(json.dumps({key: value for key, value in summary.items() if key != "series"}, indent=2))
    return summary


if __name__ == "__main__":
    main()

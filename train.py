"""Train or fine-tune a minidiff model.

A stub for now: training arrives with its own issue (DDPM fine-tuning, class-conditioned digits, Dreambooth,
textual inversion). `python train.py --help` says what is coming.
"""

import argparse
import sys

COMING = """modes on the way:
  ddpm                 fine-tune or train a pixel UNet on an image folder
  class-conditioned    train the course's digits model from scratch
  dreambooth           teach Stable Diffusion a new subject from a few images
  textual-inversion    learn one new token embedding"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=COMING,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print("minidiff: no training mode is implemented yet (see `python train.py --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Sample images from a minidiff model.

This is the command-line front of minidiff/pipelines.py. It is a stub for now: the sampling modes arrive with
the issues that build their models (pixel DDPM/DDIM, class labels and guidance; then Stable Diffusion text
modes). `python sample.py --help` says what is coming.
"""

import argparse
import sys

COMING = """modes on the way:
  pixel DDPM / DDIM      python sample.py --model DIR [--scheduler ddpm|ddim] [--steps N] --out PATH
  class-conditioned      ... --class-label C
  loss guidance          ... --guidance color --color "#55FFAA" --guidance-scale 40
  Stable Diffusion       ... --prompt "..." [--negative-prompt ...] [--init-image P --strength S] [--mask P]"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=COMING,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print("minidiff: no sampling mode is implemented yet (see `python sample.py --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

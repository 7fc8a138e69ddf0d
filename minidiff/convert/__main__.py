"""python -m minidiff.convert SRC DST [--dtype fp32|fp16|bf16]: see minidiff/convert/cli.py."""

import sys

from minidiff.convert.cli import main

sys.exit(main())

"""Fetch a model's weights into this directory: `python checkpoints/fetch.py [MODEL]`.

MODEL is a name under configs/models/ (default: the project's default model). Prints the path.
"""

import sys

from jaxserve.config import DEFAULT_MODEL
from jaxserve.errors import JaxserveError
from jaxserve.loading.fetch import fetch_model


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else DEFAULT_MODEL
    try:
        print(fetch_model(name))
    except JaxserveError as e:
        print(f"fetch failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

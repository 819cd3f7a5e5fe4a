"""Print which models, losses, solvers, data sets and evaluators go together, from their declared kinds.

python scripts/compat_table.py            # the markdown table in README.md
python scripts/compat_table.py --counts   # how many combinations of the config tree are valid / refused
"""

from __future__ import annotations

import argparse
import sys

from training import compat_matrix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", action="store_true", help="count valid and refused combinations instead")
    args = p.parse_args(argv)
    if args.counts:
        combos = compat_matrix.combinations()
        valid = sum(reason is None for _, _, reason in combos)
        print(f"{len(combos)} combinations: {valid} valid, {len(combos) - valid} refused")
    else:
        print(compat_matrix.compat_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Summarise py-spy collapsed stacks (bench/submission.py --profile): where the time goes.

    python bench/stacks.py /tmp/relay.stacks [--top 40]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in open(args.path, encoding="utf-8"):
        stack, _, count = line.rstrip().rpartition(" ")
        n = int(count)
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
                  for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    print("\nself time")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")
    print("\ninclusive time")
    for frame, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()

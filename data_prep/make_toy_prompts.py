"""Write the toy shapes demo's procedural prompts to data_prep/prompts/toy_shapes.txt.

    python data_prep/make_toy_prompts.py [--out data_prep/prompts/toy_shapes.txt]

The prompts come from ``fastvideo_grpo.toy.shapes.all_prompts()`` (a small grammar of counts, colours,
shapes and left-of relations); the file is generated, not hand-written, and has no external source.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastvideo_grpo.toy.shapes import all_prompts  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "data_prep", "prompts", "toy_shapes.txt"))
    args = p.parse_args(argv)
    prompts = all_prompts()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(s + "\n" for s in prompts))
    os.replace(tmp, args.out)
    print(f"wrote {len(prompts)} prompts to {args.out}")


if __name__ == "__main__":
    main()

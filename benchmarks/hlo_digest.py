"""Digests of the lowered train-step programs, to show a refactor left them unchanged.

    python -m benchmarks.hlo_digest [--suite cpu|quick] [--only dcl_cstp,ldm_unet] [--out DIR]

For each workload, prints two digests of the step's StableHLO (`step_fn.lower(...)`,
source locations stripped): `exact` (the text as emitted) and `ops` (the multiset of
operations after renaming SSA values, so the emission order of independent computations
does not count). Run it in two checkouts and compare: equal `ops` digests mean the same
operations on the same shapes, hence the same numbers and step times. `--out` also writes
the texts for a diff.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import pathlib
import re

from benchmarks import steps
from benchmarks.workloads import ldm, ssl
from benchmarks.workloads.common import Options


def _setups(opts: Options) -> dict:
  def dcl():
    c = ssl.ssl_config("dcl_cstp", opts, **opts.size(ssl.MAIN))
    return c, ssl.ssl_batch(c, opts.seed), None

  return {"dcl_cstp": dcl, "ldm_unet": lambda: ldm.unet_setup(opts)}


def digests(text: str) -> dict[str, str]:
  """{"exact", "ops", "lines"} of a StableHLO module's text."""
  text = re.sub(r"loc\([^)]*\)", "", text)
  ops = collections.Counter(re.sub(r"%[\w#]+", "%v", line).strip()
                            for line in text.splitlines())
  canon = "\n".join(f"{n} {line}" for line, n in sorted(ops.items()))
  sha = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]
  return {"exact": sha(text), "ops": sha(canon), "lines": str(len(text.splitlines()))}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.hlo_digest",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", default="cpu", choices=("quick", "cpu", "gpu"))
  p.add_argument("--only", default="dcl_cstp,ldm_unet")
  p.add_argument("--out", default="", help="folder for the StableHLO texts")
  args = p.parse_args(argv)
  opts = Options(suite=args.suite, torch=False)
  setups = _setups(opts)
  for name in filter(None, args.only.split(",")):
    config, batch, prepare = setups[name]()
    with steps.built(config, batch, prepare) as bench:
      text = bench.step_fn.lower(bench.state, bench.batch).as_text()
    d = digests(text)
    print(f"{name:10s} ops={d['ops']} exact={d['exact']} lines={d['lines']}")
    if args.out:
      out = pathlib.Path(args.out)
      out.mkdir(parents=True, exist_ok=True)
      (out / f"{name}.stablehlo.txt").write_text(text)


if __name__ == "__main__":
  main()

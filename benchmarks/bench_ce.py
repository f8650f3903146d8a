"""CPU cross-entropy benchmark: crossent vs torch eager (and torch.compile); see crossent/_bench.py.

    python benchmarks/bench_ce.py [--quick] [--compile] [--json out.json]   # same as `crossent bench`
"""
import sys

from crossent.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())

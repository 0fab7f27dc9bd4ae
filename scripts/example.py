"""The built-in example: generate a tiny synthetic Qwen3-shaped base + LoRA adapter, then merge it.

    python scripts/example.py [--out DIR]

Runs `streammerge` exactly as a user would (the CLI in a subprocess) and then `streammerge verify`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="streammerge-example-"))
    subprocess.run([sys.executable, str(HERE / "make_synthetic_model.py"), "--preset", "tiny", "--out", str(work),
                    "--quiet"], check=True)
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    cmd = [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter), "--output",
           str(merged), "--overwrite", "--verify"]
    print("$", " ".join(cmd[2:]).replace("-m streammerge", "streammerge"), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())

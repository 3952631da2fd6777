"""PPO with a value head on the built-in addition task: experiments/train_grpo.py's loop with
configs/train_ppo.yaml (same flags: --out, --tiny, --study, --seeds, --budget_s, key=value overrides).

    python experiments/train_ppo.py --out runs/ppo [key=value ...]
    python experiments/train_ppo.py --tiny --out /tmp/ppo_tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_grpo  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(train_grpo.ROOT / "configs/train_ppo.yaml")] + argv
    train_grpo.main(argv)

#!/usr/bin/env bash
# Build the pinned peer venvs that the comparisons in docs/benchmarks/ run against, under .peers/
# (git-ignored; RLHFKIT_PEERS moves it). The newest TRL (SFTTrainer, RewardTrainer, DPOTrainer) is in
# rlhfkit's own test extra; TRL-classic, the last PPOTrainer.step() API, needs its own transformers.
#   bash benchmarks/peers.sh      # ~3 min, ~1.5 GB
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${RLHFKIT_PEERS:-.peers}
if [ ! -x "$peers/trl-classic/bin/python" ]; then
  python3 -m venv "$peers/trl-classic"
  "$peers/trl-classic/bin/pip" install -q torch==2.13.0 trl==0.11.4 "transformers>=4.44,<4.47" rich peft==0.13.2 \
    vaderSentiment
fi
"$peers/trl-classic/bin/python" -c "import trl, transformers; print('trl-classic:', trl.__version__, transformers.__version__)"

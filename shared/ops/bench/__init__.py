"""``mdmt bench``: the figures that decide a user's wall time, each printed with its device and settings.

Sections (``--sections``):
- ``train``: local training img/s (the project's ``train_local``: uint8 cache -> device, augmentation on
  the device) and its ratio to a raw train step of the same backbone measured in this process with the
  batch already on the device, configured alike (dtype, batch, channels_last, compile);
- ``round``: a 7-site Flower simulation, one local epoch per round: round overhead ratio
  (round wall time - slowest site's training) / round wall time, and the bytes each site sent;
- ``bytes``: bytes per round per site of the backbone's update as fp32, fp16 and 8-bit;
- ``ingest``: ``mdmt ingest`` img/s against a bare ``pydicom`` decode of the same files, 1 core and all;
- ``scaling``: Flower simulation round time and peak memory (PSS of every process of the run) at 2, 7,
  20 and 50 virtual sites with a tiny model.
``--quick`` shrinks every section to run on a CPU in a few minutes; the printed settings say what ran.
A section whose dependencies are missing (Flower, pydicom on a bare GPU machine) says so and is skipped.

Modules: common (settings, figure records, device description, the synthetic federation), train (the train
and bytes sections), data (the ingest section), simulation (the round and scaling sections), cli (the run
loop, its JSON and the argparse subcommand).
"""

from __future__ import annotations

from mdmt.ops.bench.cli import add_arguments, cmd_bench, run_bench
from mdmt.ops.bench.common import SECTIONS, Bench, Figure, Settings

__all__ = ["SECTIONS", "Bench", "Figure", "Settings", "add_arguments", "cmd_bench", "run_bench"]

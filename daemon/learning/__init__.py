"""The learning cycle: `cycle` walks select → train → load → probe → decide → promote or reject.
The stages: `replay_plan` (settings → the replay package's plan and build), `jobs` (the trainer's
job file), `train` (the recipe, run as `python -m daemon.learning.train JOB.json`), `methods` (how it
adapts the model: LoRA, MoRA, added blocks, full fine-tuning), `augment`, `probes`
(measured through vLLM), `decide` (a pure function, thresholds from `[probes]`), `adapters`
(version folders and their view), `records` (one JSON per cycle), `schedule` (when to run).

Owns how the served model changes. Knows nothing of HTTP, the status page or how documents were
read.
"""

"""The toy world: Smooth Diffusion's whole method, and the paper's tables in miniature, on a laptop CPU.

    python -m toy --help           # the commands
    python -m toy pretrain         # the tiny SD of assets/toy-sd and the attribute classifier (~40 min)
    python -m toy evaluate         # the base model's numbers
    python -m toy data FOLDER      # toy images + captions in train.py's folder format
    python -m toy tables           # the paper's tables on the toy world (~1.5 h; --plan, --quick)

world.py       the data: captioned shapes, held-out prompts, reading captions off images
pretrain.py    the tiny SD-1.x trained from scratch (assets/toy-sd)
instruments.py the attribute classifier (the CLIP-score proxy) and the Frechet distance (the FID proxy)
report.py      the paired before/after report of `python train.py`, and `evaluate`
main_job.py    what `python train.py` does with no --model: its flags and the two regularizer forms
tables.py      the tables (two noise sets x two step counts, seeds, lambda curves, Table 2)
drag_bench.py  drag editing (drag.py) scored on drags with a known answer: `python -m toy.drag_bench`
"""

"""Benchmarks: speed and memory of our models beside diffusers', and the cost of the regularizer.

    python -m bench --quick                 # small configs, ~1 min on 2 CPU cores
    python -m bench --device cuda --gpu-check

The code is in bench/speed.py.
"""

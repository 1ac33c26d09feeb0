"""sampler.py's command line: the demos (generate, interpolate, invert, edit, istd), the evaluation of
Table 1 (evaluate.py) and the image and video files they write. `python sampler.py COMMAND --help` (or `python -m demos COMMAND`) runs them; the
algorithms they call are in sampler.py.
"""

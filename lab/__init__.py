"""The machinery that experiment.py and plot.py share, kept out of the files an idea edits.

files     atomic writes (JSON, JSON lines, text)
schema    file layout, job names, thresholds, the metric registry
ops       the op registry: what an op is, its cyclic coordinates
measures  the metric implementations (representations, Fourier, norms)
plugins   the plugin API (Plugin, Run, hook dispatch) and the builtin research plugins
cli       Config flags and their validation
runner    out_dir lock, resume, the worker pool and signals, final_info.json
stats     Wilson intervals, the seeded bootstrap, Harrell's concordance, the fixed-effects slope
onset     a measure's post-memorisation band, its onset, a threshold alarm
analysis  reading runs, phases, spikes, lead-lag (plot.py's numbers)
phases    a sweep's phase diagram
earlywarning  which measures warn of grokking beyond the configuration, and the clock test
report    plot.py's cache, process pool, tables and the notes.txt block
"""

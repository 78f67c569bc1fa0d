"""Notebook UI (the only package that imports ipywidgets): ``forms`` (ConfigForm, generated from the
config dataclasses), ``preflight`` (steps, VRAM and time before a run), ``monitor`` (TrainingMonitor
hooks with a Stop button). Import the submodules directly; this package imports nothing."""

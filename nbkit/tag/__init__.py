"""Auto-tagging and caption editing.

- ``wd14`` (+ ``wd14_image``, ``wd14_labels``): WD14 tagger on onnxruntime, kohya's options.
- ``blip``: BLIP captions through transformers, kohya's decoding settings.
- ``tags``: pure tag-list functions; ``files``: caption files; ``backup``: backups and undo.
- ``editor``: batch caption edits with dry run; ``stats``: tag frequencies and a chart.
- ``widgets``: the notebook caption editor (the only module importing ipywidgets).
- ``config``: the taggers' option dataclasses; ``cli``: ``nbkit tag`` and ``nbkit captions``.
"""

"""Getting results off the Colab VM: the Drive project folder, and Hugging Face Hub repos with model cards.

- :mod:`nbkit.export.drive`: verified copies (size + sha256, temp name then rename), waiting out Drive's
  sync lag, project size summary and cleanup of old epochs/states.
- :mod:`nbkit.export.hub`: token resolution that never shows the token, the upload plan, the upload.
- :mod:`nbkit.export.model_card`: the README.md the Hub renders (huggingface_hub's ModelCard API).
"""

"""Auto-tagging (WD14 on onnxruntime, BLIP) and caption editing."""

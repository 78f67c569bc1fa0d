"""The estimator's shipped constants: the output of ``python bench/fit_estimator.py --write``, which
runs :func:`nbkit.estimate.fit_constants.fit` on the published rows of
:mod:`nbkit.estimate.calibration`. Not edited by hand: tests/test_estimator_claims.py fails when
these differ from the fit. Rows, fit and errors: docs/estimator.md.
"""

#: CUDA context, cuBLAS/cuDNN workspaces and everything else outside the tensors and the caching
#: allocator's cache, bytes
CONTEXT_BYTES = 0.60e9
#: share of the fp16 tensor-core peak (T4: 65 TFLOPS) a training step reaches
UTILISATION_FP16 = 0.20
#: share of the fp32 peak (T4: 8.1 TFLOPS) a training step reaches
UTILISATION_FP32 = 0.40
#: seconds per micro-batch that do not shrink with the batch (launches, Python, per-tensor loops)
MICRO_BATCH_SECONDS = 0.42

"""Model files: what a trained network is on disk, read and written safely.

Our model folder (``mtkd_model.json`` + weights, sealed metadata), training checkpoints,
TorchScript and ONNX exports, MONAI bundles (safe zip extraction), and the resolver that turns
any of them, or a run folder, into a :class:`~mtkd.modelfiles.model_io.LoadedModel`. Below both
training (:mod:`mtkd.engine`) and inference (:mod:`mtkd.infer`); imports only the data and
network packages.
"""

"""Help texts of the options that several subcommands share."""

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
TRAIN_DEVICE_HELP = "override train.device (auto, cpu, cuda, cuda:N, mps)"
PROGRESS_HELP = "print machine-readable MTKD-PROGRESS lines (for the Slicer modules)"
MODEL_HELP = (
    "run or model folder, exported TorchScript/ONNX folder, training checkpoint, MONAI bundle "
    "(folder or .zip) or TorchScript file"
)

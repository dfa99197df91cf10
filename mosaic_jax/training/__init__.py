"""The training program: config defaults and validation, the train loop and its steps,
checkpoints and the workdir, multi-process start-up, TensorBoard events and the ahead-of-time
compile check."""
